//! The VMM's vhost-user frontends against the real backends, in one
//! process: each backend's daemon serves a socket in a thread, the
//! frontend negotiates with it as the VMM does, and the tests check what
//! the guest would be offered (features, config space, queue pairs)
//! without a VM.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devices::vhost_user::blk::VhostUserBlock;
use devices::vhost_user::net::VhostUserNet;
use devices::vhost_user::{VhostUserDevice, VhostUserFrontend};
use devices::virtio::VirtioDevice;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vhost_user_common::device::Served;
use vhost_user_common::{BackendMemory, BackendVring};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// vhost-user's PROTOCOL_FEATURES bit: between the VMM and the backend only.
const PROTOCOL_FEATURES: u64 = 1 << 30;

fn has(features: u64, bit: u32) -> bool {
    features & 1 << bit != 0
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

/// Serves `backend` on `socket` in a thread, for one frontend.
fn serve<T>(backend: T, mem: GuestMemoryAtomic<BackendMemory>, socket: &Path)
where
    T: VhostUserBackend<Bitmap = BitmapMmapRegion, Vring = BackendVring>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let mut listener = Listener::new(socket, true).unwrap();
    std::thread::spawn(move || {
        let mut daemon = VhostUserDaemon::new("test".into(), backend, mem).unwrap();
        if daemon.start(&mut listener).is_ok() {
            let _ = daemon.wait();
        }
    });
}

fn connect(socket: &Path, max_queues: u64) -> VhostUserFrontend {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match VhostUserFrontend::connect(socket, max_queues) {
            Ok(frontend) => return frontend,
            Err(err) if std::time::Instant::now() > deadline => panic!("{err}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A block device whose backend serves a 1 MiB image with `queues` queues.
fn block_device(dir: &Path, backend_queues: usize, max_queues: u64) -> VhostUserBlock {
    use vhost_user_blk::backend::{BackendConfig, BlockBackend};
    use vhost_user_blk::disk::Disk;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk = Disk::open(&image, false, false).unwrap();
    let mem = GuestMemoryAtomic::new(BackendMemory::new());
    let config = BackendConfig {
        queues: backend_queues,
        threads: 1,
        queue_size: 256,
        poll: Duration::ZERO,
        serial: b"d1".to_vec(),
        io_uring: false,
        seccomp: tessera_seccomp::Filters::disabled(),
        stats: backend_stats::Stats::private(),
    };
    let backend = Arc::new(BlockBackend::new(disk, config, mem.clone()).unwrap());
    let socket = dir.join("blk.sock");
    serve(Served(backend), mem, &socket);
    let frontend = connect(&socket, max_queues);
    VhostUserBlock::new("d1", frontend, guest_memory()).unwrap()
}

#[test]
fn a_drive_offers_the_backends_block_features_and_not_its_protocol_bit() {
    let dir = tempfile::tempdir().unwrap();
    let device = block_device(dir.path(), 1, 1);
    assert_eq!(device.device_type(), 2);
    let features = device.features();
    assert!(has(features, VIRTIO_F_VERSION_1));
    assert!(has(features, VIRTIO_BLK_F_FLUSH));
    assert_eq!(features & PROTOCOL_FEATURES, 0);
}

#[test]
fn a_drive_config_space_is_the_backends_with_only_the_queues_set_up() {
    let dir = tempfile::tempdir().unwrap();
    // The backend could serve 4 queues; this frontend sets up 2.
    let mut device = block_device(dir.path(), 4, 2);
    let mut capacity = [0u8; 8];
    device.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 2048, "1 MiB in sectors");
    let mut num_queues = [0u8; 2];
    device.read_config(34, &mut num_queues);
    assert_eq!(u16::from_le_bytes(num_queues), 2);
    assert_eq!(device.queue_max_sizes().len(), 2);
}

/// A network device whose backend serves `backend_pairs` pairs (and no
/// TAP: nothing here reaches one), asked for `pairs`.
fn net_device(dir: &Path, backend_pairs: usize, pairs: u16, mac: Option<[u8; 6]>) -> VhostUserNet {
    use vhost_user_net::backend::{NetBackend, NetConfig};
    let mem = GuestMemoryAtomic::new(BackendMemory::new());
    let config = NetConfig {
        mac: None,
        mtu: None,
        queue_pairs: backend_pairs,
        queue_size: 256,
        seccomp: tessera_seccomp::Filters::disabled(),
        stats: backend_stats::Stats::private(),
    };
    let backend = Arc::new(NetBackend::new(Vec::new(), config, mem.clone()).unwrap());
    let socket = dir.join("net.sock");
    serve(Served(backend), mem, &socket);
    let frontend = connect(&socket, 2 * u64::from(pairs));
    VhostUserNet::new("eth0", frontend, guest_memory(), mac, pairs).unwrap()
}

#[test]
fn an_interface_gets_only_the_pairs_its_backend_serves_and_its_control_queue_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let device = net_device(dir.path(), 1, 2, None);
    assert_eq!(device.queue_pairs(), 1);
    let features = device.features();
    assert!(!has(features, VIRTIO_NET_F_MQ));
    assert!(has(features, VIRTIO_NET_F_CTRL_VQ));
    assert!(has(features, VIRTIO_NET_F_GUEST_ANNOUNCE));
    let (index, _, _) = device.ctrl_eventfds();
    assert_eq!(index, 2, "after one RX/TX pair");
    assert_eq!(device.queue_max_sizes().len(), 3);
    assert_eq!(features & PROTOCOL_FEATURES, 0);
}

#[test]
fn several_pairs_bring_mq_and_a_control_queue_the_vmm_serves() {
    let dir = tempfile::tempdir().unwrap();
    let device = net_device(dir.path(), 2, 2, None);
    assert_eq!(device.queue_pairs(), 2);
    let features = device.features();
    assert!(has(features, VIRTIO_NET_F_MQ));
    assert!(has(features, VIRTIO_NET_F_CTRL_VQ));
    let (index, _, _) = device.ctrl_eventfds();
    assert_eq!(index, 4, "after two RX/TX pairs");
    assert_eq!(device.queue_max_sizes().len(), 5);
}

#[test]
fn the_vmm_offers_the_configured_mac_when_the_backend_has_none() {
    let dir = tempfile::tempdir().unwrap();
    let mac = [6, 0, 10, 80, 0, 2];
    let mut device = net_device(dir.path(), 1, 1, Some(mac));
    assert!(has(device.features(), VIRTIO_NET_F_MAC));
    let mut space = [0u8; 10];
    device.read_config(0, &mut space);
    assert_eq!(space[0..6], mac);
    assert_eq!(
        u16::from_le_bytes([space[8], space[9]]),
        1,
        "max_virtqueue_pairs"
    );
}

/// A network backend without a config space (no CONFIG protocol feature),
/// as Cloud Hypervisor's and DPDK's are; it offers MAC, MTU and STATUS
/// all the same.
struct NoConfigNet;

impl VhostUserBackend for NoConfigNet {
    type Bitmap = BitmapMmapRegion;
    type Vring = BackendVring;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | PROTOCOL_FEATURES
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_STATUS
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: GuestMemoryAtomic<BackendMemory>) -> std::io::Result<()> {
        Ok(())
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: vmm_sys_util::epoll::EventSet,
        _vrings: &[BackendVring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_interface_on_a_backend_without_a_config_space_gets_its_config_from_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let mem = GuestMemoryAtomic::new(BackendMemory::new());
    serve(Arc::new(NoConfigNet), mem, &socket);
    let frontend = connect(&socket, 2);
    assert!(!frontend.has_config());
    let mac = [6, 0, 10, 80, 0, 3];
    let mut device = VhostUserNet::new("eth0", frontend, guest_memory(), Some(mac), 1).unwrap();
    let features = device.features();
    // Nothing could answer MTU or STATUS: not offered. The MAC is the VMM's.
    assert!(has(features, VIRTIO_NET_F_MAC));
    assert!(!has(features, VIRTIO_NET_F_MTU));
    assert!(!has(features, VIRTIO_NET_F_STATUS));
    // Without a status field there is nowhere to say "announce".
    assert!(!has(features, VIRTIO_NET_F_GUEST_ANNOUNCE));
    let mut space = [0u8; 10];
    device.read_config(0, &mut space);
    assert_eq!(space[0..6], mac);
    assert_eq!(u16::from_le_bytes([space[8], space[9]]), 1);

    // Without guest_mac there is no MAC to offer either.
    let socket = dir.path().join("net2.sock");
    serve(
        Arc::new(NoConfigNet),
        GuestMemoryAtomic::new(BackendMemory::new()),
        &socket,
    );
    let device = VhostUserNet::new("eth1", connect(&socket, 2), guest_memory(), None, 1).unwrap();
    assert!(!has(device.features(), VIRTIO_NET_F_MAC));
}

#[test]
fn a_drive_needs_a_backend_with_a_config_space() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let mem = GuestMemoryAtomic::new(BackendMemory::new());
    serve(Arc::new(NoConfigNet), mem, &socket);
    let err = VhostUserBlock::new("rootfs", connect(&socket, 1), guest_memory())
        .err()
        .expect("no capacity to read");
    assert!(err.to_string().contains("CONFIG"), "{err}");
}

#[test]
fn a_drive_backend_without_a_config_space_cannot_take_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut device = block_device(dir.path(), 1, 1);
    let socket = dir.path().join("replacement.sock");
    serve(
        Arc::new(NoConfigNet),
        GuestMemoryAtomic::new(BackendMemory::new()),
        &socket,
    );
    let err = device
        .queues_mut()
        .reconnect(connect(&socket, 1))
        .expect_err("the capacity would be lost");
    assert!(err.to_string().contains("CONFIG"), "{err}");
}
