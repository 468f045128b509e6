//! MSI-X: a function's vector table and its message control, and the
//! KVM side of the vectors. A live vector (MSI-X on, neither the function
//! nor the entry masked, a message aimed at the local APICs) has a GSI
//! route; each interrupt source (a queue's call eventfd, the config
//! eventfd) that selects a live vector is bound to its GSI as an irqfd, so
//! the backend interrupts the guest with no VMM in the path. A masked
//! vector only unbinds its sources: their eventfds keep the count, and
//! binding them again on unmask injects at once (the pending bit).

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{msi_gsi, slot_gsis, MsiMessage, MsiRouter};

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// A vector number that selects no vector.
pub const NO_VECTOR: u16 = 0xffff;
/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CONTROL_MASK: u16 = 1 << 14;
/// Vector control: the entry is masked.
const ENTRY_MASKED: u32 = 1;
/// Messages for the local APICs: 0xfee0_0000 to 0xfeef_ffff.
const APIC_ADDRESS_MASK: u32 = 0xfff0_0000;
const APIC_ADDRESS: u32 = 0xfee0_0000;

/// One table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    pub message: MsiMessage,
    pub vector_control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        Self {
            message: MsiMessage::default(),
            vector_control: ENTRY_MASKED,
        }
    }
}

/// The table and message control, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub enabled: bool,
    pub function_masked: bool,
    pub entries: Vec<MsixEntry>,
}

/// A function's MSI-X table.
#[derive(Debug, Clone)]
pub struct Msix {
    state: MsixState,
}

impl Msix {
    /// A table of `vectors` entries, all masked, MSI-X off.
    pub fn new(vectors: u16) -> Self {
        Self {
            state: MsixState {
                enabled: false,
                function_masked: false,
                entries: vec![MsixEntry::default(); usize::from(vectors)],
            },
        }
    }

    /// How many vectors the table has.
    pub fn len(&self) -> u16 {
        self.state.entries.len() as u16
    }

    /// Whether the table has no vector.
    pub fn is_empty(&self) -> bool {
        self.state.entries.is_empty()
    }

    /// Message control as the capability shows it.
    pub fn control(&self) -> u16 {
        let mut control = self.len().saturating_sub(1);
        if self.state.enabled {
            control |= CONTROL_ENABLE;
        }
        if self.state.function_masked {
            control |= CONTROL_MASK;
        }
        control
    }

    /// Takes the writable bits of message control.
    pub fn set_control(&mut self, control: u16) {
        self.state.enabled = control & CONTROL_ENABLE != 0;
        self.state.function_masked = control & CONTROL_MASK != 0;
    }

    /// Reads the table at `offset` (aligned dwords or qwords, inside an
    /// entry); false for any other access, which reads all-ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) -> bool {
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            data.fill(0xff);
            return false;
        };
        let e = &self.state.entries[entry];
        let words = [
            e.message.addr_lo,
            e.message.addr_hi,
            e.message.data,
            e.vector_control,
        ];
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&words[field + i].to_le_bytes());
        }
        true
    }

    /// A guest's write to the table; false (and nothing changes) for an
    /// access [`Msix::read_table`] would refuse.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            return false;
        };
        let e = &mut self.state.entries[entry];
        for (i, chunk) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            match field + i {
                0 => e.message.addr_lo = value,
                1 => e.message.addr_hi = value,
                2 => e.message.data = value,
                _ => e.vector_control = value & ENTRY_MASKED,
            }
        }
        true
    }

    /// (entry, dword within it) of a well-formed access.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let aligned = matches!(len, 4 | 8) && offset.is_multiple_of(len as u64);
        let entry = usize::try_from(offset / ENTRY_SIZE).ok()?;
        (aligned && entry < self.state.entries.len())
            .then_some((entry, (offset % ENTRY_SIZE / 4) as usize))
    }

    /// The message of vector `vector` if it is live: MSI-X on, neither the
    /// function nor the entry masked, and aimed at the local APICs (KVM
    /// could refuse a whole routing table for anything else).
    pub fn live(&self, vector: u16) -> Option<MsiMessage> {
        let e = self.state.entries.get(usize::from(vector))?;
        let live = self.state.enabled
            && !self.state.function_masked
            && e.vector_control & ENTRY_MASKED == 0
            && e.message.addr_hi == 0
            && e.message.addr_lo & APIC_ADDRESS_MASK == APIC_ADDRESS;
        live.then_some(e.message)
    }

    /// The table, for a snapshot.
    pub fn state(&self) -> MsixState {
        self.state.clone()
    }

    /// Takes a snapshot's table; it must have as many vectors as this one.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), String> {
        if state.entries.len() != self.state.entries.len() {
            return Err(format!(
                "the snapshot's MSI-X table has {} vectors, the device {}",
                state.entries.len(),
                self.state.entries.len()
            ));
        }
        self.state = state.clone();
        for entry in &mut self.state.entries {
            entry.vector_control &= ENTRY_MASKED;
        }
        Ok(())
    }
}

/// The interrupt sources of one function and what they are bound to.
pub struct MsixInterrupts {
    router: Arc<dyn MsiRouter>,
    slot: u8,
    /// Each source's eventfd and the GSI it is bound to.
    sources: Vec<(EventFd, Option<u32>)>,
    /// The routes last committed.
    routes: Vec<(u32, MsiMessage)>,
}

impl MsixInterrupts {
    /// The sources of the function in `slot`, none bound yet.
    pub fn new(router: Arc<dyn MsiRouter>, slot: u8, sources: Vec<EventFd>) -> Self {
        Self {
            router,
            slot,
            sources: sources.into_iter().map(|fd| (fd, None)).collect(),
            routes: Vec::new(),
        }
    }

    /// The eventfd of source `index`.
    pub fn source(&self, index: usize) -> Option<&EventFd> {
        self.sources.get(index).map(|(fd, _)| fd)
    }

    /// Brings KVM in line with `msix` and the vector each source selects
    /// (`vectors[i]` for source `i`): unbinds what changed, commits the
    /// routes of the live vectors, binds what is new. Returns the first
    /// error; the rest is still applied.
    pub fn update(&mut self, msix: &Msix, vectors: &[u16]) -> io::Result<()> {
        let slot = self.slot;
        let routes: Vec<(u32, MsiMessage)> = (0..msix.len())
            .filter_map(|v| msix.live(v).map(|message| (msi_gsi(slot, v), message)))
            .collect();
        let wanted: Vec<Option<u32>> = (0..self.sources.len())
            .map(|i| {
                let vector = vectors.get(i).copied().unwrap_or(NO_VECTOR);
                msix.live(vector).map(|_| msi_gsi(slot, vector))
            })
            .collect();
        let mut result = Ok(());
        let mut keep = |r: io::Result<()>| {
            if let Err(err) = r {
                if result.is_ok() {
                    result = Err(err);
                }
            }
        };
        for ((fd, bound), want) in self.sources.iter_mut().zip(&wanted) {
            if let Some(gsi) = *bound {
                if *want != Some(gsi) {
                    keep(self.router.unregister_irqfd(fd, gsi));
                    *bound = None;
                }
            }
        }
        if routes != self.routes {
            keep(self.router.set_msi_routes(slot_gsis(slot), &routes));
            self.routes = routes;
        }
        for ((fd, bound), want) in self.sources.iter_mut().zip(&wanted) {
            if let (None, Some(gsi)) = (*bound, *want) {
                match self.router.register_irqfd(fd, gsi) {
                    Ok(()) => *bound = Some(gsi),
                    Err(err) => keep(Err(err)),
                }
            }
        }
        result
    }

    /// Unbinds every source and drops the function's routes (the device
    /// leaves its slot).
    pub fn release(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for (fd, bound) in &mut self.sources {
            if let Some(gsi) = bound.take() {
                if let Err(err) = self.router.unregister_irqfd(fd, gsi) {
                    result = Err(err);
                }
            }
        }
        if !self.routes.is_empty() {
            self.routes.clear();
            self.router.set_msi_routes(slot_gsis(self.slot), &[])?;
        }
        result
    }

    /// How many sources are bound now.
    pub fn bound(&self) -> usize {
        self.sources.iter().filter(|(_, b)| b.is_some()).count()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::ops::Range;
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    /// Records what KVM would hold.
    #[derive(Default)]
    pub(crate) struct FakeRouter {
        pub routes: Mutex<BTreeMap<u32, MsiMessage>>,
        pub irqfds: Mutex<BTreeMap<i32, u32>>,
        pub commits: Mutex<usize>,
    }

    impl MsiRouter for FakeRouter {
        fn set_msi_routes(&self, gsis: Range<u32>, routes: &[(u32, MsiMessage)]) -> io::Result<()> {
            let mut table = self.routes.lock().unwrap();
            table.retain(|gsi, _| !gsis.contains(gsi));
            table.extend(routes.iter().copied());
            *self.commits.lock().unwrap() += 1;
            Ok(())
        }
        fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
            let mut irqfds = self.irqfds.lock().unwrap();
            if irqfds.contains_key(&fd.as_raw_fd()) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            irqfds.insert(fd.as_raw_fd(), gsi);
            Ok(())
        }
        fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
            let mut irqfds = self.irqfds.lock().unwrap();
            match irqfds.get(&fd.as_raw_fd()) {
                Some(g) if *g == gsi => {
                    irqfds.remove(&fd.as_raw_fd());
                    Ok(())
                }
                _ => Err(io::Error::from_raw_os_error(libc::ENOENT)),
            }
        }
    }

    fn program(msix: &mut Msix, vector: u16, data: u32) {
        let at = u64::from(vector) * ENTRY_SIZE;
        assert!(msix.write_table(at, &0xfee0_0000_u32.to_le_bytes()));
        assert!(msix.write_table(at + 8, &data.to_le_bytes()));
        assert!(msix.write_table(at + 12, &0u32.to_le_bytes()));
    }

    fn sources(n: usize) -> Vec<EventFd> {
        (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect()
    }

    #[test]
    fn the_table_takes_aligned_dwords_and_qwords_inside_it() {
        let mut msix = Msix::new(3);
        assert_eq!(msix.control(), 2);
        assert!(msix.write_table(16, &[1, 0, 0, 0, 2, 0, 0, 0]));
        let mut data = [0; 8];
        assert!(msix.read_table(16, &mut data));
        assert_eq!(data, [1, 0, 0, 0, 2, 0, 0, 0]);
        assert!(!msix.write_table(18, &[0; 4]), "unaligned");
        assert!(!msix.write_table(16, &[0; 2]), "too small");
        assert!(!msix.write_table(3 * ENTRY_SIZE, &[0; 4]), "past the end");
        let mut word = [0; 4];
        assert!(!msix.read_table(u64::MAX - 3, &mut word));
        assert_eq!(word, [0xff; 4]);
        msix.write_table(12, &0xffff_fffe_u32.to_le_bytes());
        msix.read_table(12, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0, "only the mask bit sticks");
    }

    #[test]
    fn sources_follow_their_vectors_masks_and_the_enable_bit() {
        let router = Arc::new(FakeRouter::default());
        let mut msix = Msix::new(3);
        let mut irqs = MsixInterrupts::new(router.clone(), 2, sources(3));
        program(&mut msix, 0, 0x40);
        program(&mut msix, 1, 0x41);
        irqs.update(&msix, &[1, 1, 0]).unwrap();
        assert_eq!(irqs.bound(), 0, "MSI-X is off");
        msix.set_control(CONTROL_ENABLE);
        irqs.update(&msix, &[1, 1, 0]).unwrap();
        assert_eq!(irqs.bound(), 3);
        assert_eq!(router.routes.lock().unwrap().len(), 2);
        assert_eq!(router.routes.lock().unwrap()[&msi_gsi(2, 1)].data, 0x41);
        // Masking vector 1 unbinds its two sources, not the other.
        msix.write_table(ENTRY_SIZE + 12, &1u32.to_le_bytes());
        irqs.update(&msix, &[1, 1, 0]).unwrap();
        assert_eq!(irqs.bound(), 1);
        // A vector past the table or NO_VECTOR binds nothing.
        irqs.update(&msix, &[7, NO_VECTOR, 0]).unwrap();
        assert_eq!(irqs.bound(), 1);
        msix.set_control(CONTROL_ENABLE | CONTROL_MASK);
        irqs.update(&msix, &[0, 0, 0]).unwrap();
        assert_eq!(irqs.bound(), 0);
        irqs.release().unwrap();
        assert!(router.routes.lock().unwrap().is_empty());
    }

    #[test]
    fn a_message_outside_the_apic_range_is_never_routed() {
        let router = Arc::new(FakeRouter::default());
        let mut msix = Msix::new(1);
        let mut irqs = MsixInterrupts::new(router.clone(), 1, sources(1));
        msix.set_control(CONTROL_ENABLE);
        msix.write_table(0, &[0; 4]);
        msix.write_table(4, &[0xff; 4]);
        msix.write_table(12, &[0; 4]);
        irqs.update(&msix, &[0]).unwrap();
        assert_eq!(irqs.bound(), 0);
        assert!(router.routes.lock().unwrap().is_empty());
    }

    #[test]
    fn toggling_never_grows_the_bindings_or_repeats_commits() {
        let router = Arc::new(FakeRouter::default());
        let mut msix = Msix::new(2);
        let mut irqs = MsixInterrupts::new(router.clone(), 3, sources(2));
        program(&mut msix, 0, 0x40);
        for i in 0..10_000 {
            msix.set_control(if i % 2 == 0 { CONTROL_ENABLE } else { 0 });
            irqs.update(&msix, &[0, 0]).unwrap();
            assert!(router.irqfds.lock().unwrap().len() <= 2);
        }
        let commits = *router.commits.lock().unwrap();
        irqs.update(&msix, &[0, 0]).unwrap();
        assert_eq!(*router.commits.lock().unwrap(), commits, "nothing changed");
    }

    #[test]
    fn a_restored_table_must_have_the_same_size() {
        let mut msix = Msix::new(2);
        assert!(msix.restore(&Msix::new(3).state()).is_err());
        let mut other = Msix::new(2);
        other.set_control(CONTROL_ENABLE);
        msix.restore(&other.state()).unwrap();
        assert_eq!(msix.control(), CONTROL_ENABLE | 1);
    }
}
