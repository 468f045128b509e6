//! The counters a vhost-user backend keeps for the VMM's metrics.
//!
//! The backend process serves the guest's queues; the VMM writes the
//! metrics. They share one page of memory per device ([`StatsPage`]): the
//! VMM creates it as a memfd sealed at its size (so neither side can make
//! the other fault by shrinking it), hands its fd to every backend it
//! starts for the device, and reads it at each metrics flush. The backend
//! adds to the counters in place, lock-free; a backend started again for
//! the same device goes on counting where the last one stopped. No
//! message crosses the vhost-user connection, and nothing the backend
//! writes there is more than a number in its own device's metrics.
//!
//! Each device kind names its counters once ([`BlockCounter`],
//! [`NetCounter`], [`VsockCounter`]); a counter's place in the page is
//! its position in that list, on both sides.

mod counters;
mod page;

pub use counters::{BlockCounter, CounterSet, NetCounter, VsockCounter};
pub use page::{StatsError, StatsPage, PAGE_LEN, SLOTS};

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A backend's view of its page: typed counters to add to.
#[derive(Debug)]
pub struct Stats<C> {
    page: Arc<StatsPage>,
    set: PhantomData<C>,
}

impl<C> Clone for Stats<C> {
    fn clone(&self) -> Self {
        Self {
            page: self.page.clone(),
            set: PhantomData,
        }
    }
}

impl<C: CounterSet> Stats<C> {
    pub fn new(page: StatsPage) -> Self {
        Self {
            page: Arc::new(page),
            set: PhantomData,
        }
    }

    /// Counters in private memory, for a backend nobody reads (started
    /// by hand, without `--stats-fd`).
    pub fn private() -> Self {
        Self::new(StatsPage::private())
    }

    pub fn inc(&self, counter: C) {
        self.add(counter, 1);
    }

    pub fn add(&self, counter: C, n: u64) {
        self.page
            .slot(counter.slot())
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Everything counted so far (by this backend and the earlier ones).
    pub fn get(&self, counter: C) -> u64 {
        self.page.slot(counter.slot()).load(Ordering::Relaxed)
    }
}

/// The VMM's view of a device's page: each read reports what was added
/// since the previous one.
#[derive(Debug)]
pub struct StatsReader {
    page: Arc<StatsPage>,
    keys: &'static [&'static str],
    flushed: Vec<AtomicU64>,
}

impl StatsReader {
    /// Reads `page` as the counters of `C`.
    pub fn new<C: CounterSet>(page: Arc<StatsPage>) -> Self {
        Self {
            page,
            keys: C::KEYS,
            flushed: C::KEYS.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Each counter's name and its increase since the previous call. The
    /// backend writes the page: a counter that went down (a backend
    /// writing nonsense) reports 0 and counts on from its new value.
    pub fn deltas(&self) -> Vec<(&'static str, u64)> {
        self.keys
            .iter()
            .zip(&self.flushed)
            .enumerate()
            .map(|(slot, (key, flushed))| {
                let total = self.page.slot(slot).load(Ordering::Relaxed);
                let before = flushed.swap(total, Ordering::Relaxed);
                (*key, total.saturating_sub(before))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_reads_what_a_backend_adds_through_the_fd() {
        let vmm_page = Arc::new(StatsPage::create().unwrap());
        let reader = StatsReader::new::<BlockCounter>(vmm_page.clone());
        let fd = vmm_page.fd().unwrap().try_clone_to_owned().unwrap();
        let backend = Stats::<BlockCounter>::new(StatsPage::map_shared(fd).unwrap());
        backend.add(BlockCounter::ReadBytes, 4096);
        backend.inc(BlockCounter::ReadCount);
        let deltas = reader.deltas();
        assert!(deltas.contains(&("read_bytes", 4096)), "{deltas:?}");
        assert!(deltas.contains(&("read_count", 1)), "{deltas:?}");
        assert!(deltas.contains(&("write_count", 0)), "{deltas:?}");
        assert!(reader.deltas().iter().all(|(_, n)| *n == 0));

        // A backend started again for the device counts on.
        let fd = vmm_page.fd().unwrap().try_clone_to_owned().unwrap();
        let next = Stats::<BlockCounter>::new(StatsPage::map_shared(fd).unwrap());
        next.inc(BlockCounter::ReadCount);
        assert_eq!(next.get(BlockCounter::ReadCount), 2);
        assert!(reader.deltas().contains(&("read_count", 1)));
    }

    #[test]
    fn a_counter_that_goes_down_reports_nothing() {
        let page = Arc::new(StatsPage::private());
        let reader = StatsReader::new::<NetCounter>(page.clone());
        page.slot(0).store(10, Ordering::Relaxed);
        assert_eq!(reader.deltas()[0].1, 10);
        page.slot(0).store(3, Ordering::Relaxed);
        assert_eq!(reader.deltas()[0].1, 0);
        page.slot(0).store(5, Ordering::Relaxed);
        assert_eq!(reader.deltas()[0].1, 2);
    }
}
