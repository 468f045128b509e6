//! MMDS in a running microVM: the VMM keeps the store and its API; each
//! interface named in `mmds-config` has its `vhost-user-net` backend answer
//! the guest (ARP, TCP, HTTP) from a copy of the store that the VMM hands
//! it over the control channel: the settings at attach, the whole store
//! again after every change. Backends that take over get both replayed.

use devices::vhost_user::VhostUserDevice as _;
use serde_json::Value;
use tessera_backend_control::{
    mmds_store, ControlMessage, MmdsSettings, MmdsVersion, TOKEN_KEY_LEN,
};
use vmm_config::{MmdsConfig, MmdsError, MmdsStore};

use crate::runtime::Vmm;

/// How the microVM's interfaces serve MMDS.
#[derive(Debug)]
pub struct MmdsService {
    settings: MmdsSettings,
    interfaces: Vec<String>,
    /// Bumped by every store sent, so that a backend never mixes pieces
    /// of two stores.
    generation: u32,
}

impl MmdsService {
    /// The service `config` asks for; the session tokens are sealed with
    /// `token_key` (random per process: a loaded or migrated microVM's old
    /// tokens fail, as with Firecracker).
    pub fn new(config: &MmdsConfig, token_key: [u8; TOKEN_KEY_LEN], instance_id: &str) -> Self {
        Self {
            settings: MmdsSettings {
                version: match config.version {
                    vmm_config::MmdsVersion::V1 => MmdsVersion::V1,
                    vmm_config::MmdsVersion::V2 => MmdsVersion::V2,
                },
                imds_compat: config.imds_compat,
                ipv4_address: config.ipv4(),
                token_key,
                instance_id: instance_id.to_string(),
            },
            interfaces: config.network_interfaces.clone(),
            generation: 0,
        }
    }

    /// Whether interface `id` serves MMDS.
    pub fn serves(&self, id: &str) -> bool {
        self.interfaces.iter().any(|i| i == id)
    }

    /// The settings an interface's backend is given.
    pub fn config_message(&self) -> ControlMessage {
        ControlMessage::MmdsConfig(self.settings.clone())
    }

    /// The messages that carry `store` as it is now (a new generation).
    pub fn store_messages(&mut self, store: &MmdsStore) -> Vec<ControlMessage> {
        self.generation = self.generation.wrapping_add(1);
        mmds_store(self.generation, &store.guest_json())
    }
}

impl Vmm {
    /// `PUT /mmds` on a running microVM: refused unless an interface
    /// serves MMDS (Firecracker's "not initialized").
    pub fn put_mmds(&mut self, value: Value) -> Result<(), MmdsError> {
        self.change_mmds(|store| store.put(value))
    }

    /// `PATCH /mmds` on a running microVM.
    pub fn patch_mmds(&mut self, patch: &Value) -> Result<(), MmdsError> {
        self.change_mmds(|store| store.patch(patch))
    }

    /// `GET /mmds` on a running microVM.
    pub fn get_mmds(&self) -> Result<Value, MmdsError> {
        if self.devices.mmds.is_none() {
            return Err(MmdsError::NotInitialized);
        }
        Ok(self.resources.mmds.get())
    }

    /// Changes the store and hands it to every interface that serves it;
    /// a backend that is away gets it when it comes back.
    fn change_mmds(
        &mut self,
        change: impl FnOnce(&mut MmdsStore) -> Result<(), MmdsError>,
    ) -> Result<(), MmdsError> {
        let service = self
            .devices
            .mmds
            .as_mut()
            .ok_or(MmdsError::NotInitialized)?;
        change(&mut self.resources.mmds)?;
        let messages = service.store_messages(&self.resources.mmds);
        for transport in &self.devices.net {
            let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
            let id = transport.device().id().to_string();
            if !service.serves(&id) {
                continue;
            }
            if let Err(err) = transport.device_mut().queues_mut().send_controls(&messages) {
                log::warn!("interface {id}: the MMDS store did not reach its backend: {err}");
            }
        }
        Ok(())
    }
}

/// A fresh random token key.
pub fn random_token_key() -> std::io::Result<[u8; TOKEN_KEY_LEN]> {
    let mut key = [0u8; TOKEN_KEY_LEN];
    getrandom::fill(&mut key).map_err(std::io::Error::other)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_store_sent_is_a_new_generation_of_the_whole_store() {
        let config = MmdsConfig {
            version: vmm_config::MmdsVersion::V2,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: None,
            imds_compat: false,
        };
        let mut service = MmdsService::new(&config, [1; TOKEN_KEY_LEN], "vm");
        assert!(service.serves("eth0") && !service.serves("eth1"));
        let mut store = MmdsStore::new(1 << 20);
        store.put(serde_json::json!({"k": "v"})).unwrap();
        let generation = |messages: &[ControlMessage]| match &messages[0] {
            ControlMessage::MmdsData(piece) => (piece.generation, piece.total),
            other => panic!("{other:?}"),
        };
        assert_eq!(generation(&service.store_messages(&store)), (1, 9));
        assert_eq!(generation(&service.store_messages(&store)), (2, 9));
        let ControlMessage::MmdsConfig(settings) = service.config_message() else {
            panic!("not the settings");
        };
        assert_eq!(settings.ipv4_address, vmm_config::DEFAULT_MMDS_IPV4);
        assert_eq!(settings.version, MmdsVersion::V2);
    }
}
