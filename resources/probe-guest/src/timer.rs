//! The probe's clock for delays and deadlines: kvm-clock where the VMM
//! offers it (every KVM VMM does), else PIT channel 2 (QEMU TCG), else
//! none, when deadlines fall back to counting spins (QEMU microvm).
//! `probe.clock=kvmclock|pit` forces one source.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::{cmdline, kvmclock, pit};

/// Where time comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    KvmClock,
    Pit,
    Absent,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::KvmClock => "kvmclock",
            Source::Pit => "pit",
            Source::Absent => "none",
        }
    }
}

/// Not chosen yet: [`source`] then falls back to the PIT.
const UNSET: u8 = 0;
static SOURCE: AtomicU8 = AtomicU8::new(UNSET);

fn encode(source: Source) -> u8 {
    match source {
        Source::KvmClock => 1,
        Source::Pit => 2,
        Source::Absent => 3,
    }
}

/// Picks the clock from `probe.clock` and what the VMM offers.
pub fn init(cmdline: &[u8]) -> Source {
    let wanted = cmdline::last_value(cmdline, "probe.clock").flatten();
    let kvmclock_allowed = wanted.is_none_or(|w| w == b"kvmclock");
    let pit_allowed = wanted.is_none_or(|w| w == b"pit");
    let source = if kvmclock_allowed && kvmclock::enable() {
        Source::KvmClock
    } else if pit_allowed && pit::present() {
        Source::Pit
    } else {
        Source::Absent
    };
    SOURCE.store(encode(source), Ordering::Relaxed);
    source
}

/// The chosen clock.
pub fn source() -> Source {
    match SOURCE.load(Ordering::Relaxed) {
        1 => Source::KvmClock,
        3 => Source::Absent,
        _ => Source::Pit,
    }
}

/// True if there is a real clock (not only spin counts).
pub fn present() -> bool {
    match source() {
        Source::KvmClock => true,
        Source::Pit => pit::present(),
        Source::Absent => false,
    }
}

const NS_PER_MS: u64 = 1_000_000;

/// Nanoseconds on kvm-clock, if that is the clock (`None` otherwise).
pub fn now_ns() -> Option<u64> {
    (source() == Source::KvmClock).then(kvmclock::now_ns)
}

/// Busy-waits 10 ms.
pub fn sleep_10ms() -> Result<(), pit::Error> {
    sleep_10ms_polling(|| {})
}

/// Busy-waits 10 ms, calling `poll` meanwhile (e.g. to serve a network
/// device while ticking).
pub fn sleep_10ms_polling(mut poll: impl FnMut()) -> Result<(), pit::Error> {
    match source() {
        Source::KvmClock => {
            let end = kvmclock::now_ns().saturating_add(10 * NS_PER_MS);
            while kvmclock::now_ns() < end {
                poll();
            }
            Ok(())
        }
        Source::Pit => pit::sleep_10ms_polling(poll),
        Source::Absent => Err(pit::Error::Absent),
    }
}

/// A real-time deadline for polling loops: expires `ms` milliseconds
/// after its start, but never before `min_spins` calls to
/// [`Deadline::expired`] (so a missing clock cannot cut it short) and
/// always after `max_spins` calls (in case the clock never moves).
pub enum Deadline {
    Clock {
        end_ns: u64,
        spins: u64,
        min_spins: u64,
        max_spins: u64,
    },
    Pit(pit::Deadline),
}

impl Deadline {
    /// Starts a deadline `ms` milliseconds from now.
    pub fn start(ms: u32, min_spins: u64) -> Deadline {
        Deadline::start_with(ms, min_spins, pit::SPINS_PER_CHECK, u64::MAX)
    }

    /// Like [`Deadline::start`]; a PIT is read only every
    /// `spins_per_check` spins (each read is a VM exit).
    pub fn start_with(ms: u32, min_spins: u64, spins_per_check: u64, max_spins: u64) -> Deadline {
        match source() {
            Source::KvmClock => Deadline::Clock {
                end_ns: kvmclock::now_ns().saturating_add(u64::from(ms) * NS_PER_MS),
                spins: 0,
                min_spins,
                max_spins,
            },
            _ => Deadline::Pit(pit::Deadline::start_with(
                ms,
                min_spins,
                spins_per_check,
                max_spins,
            )),
        }
    }

    /// Call once per spin; true when the deadline has passed.
    pub fn expired(&mut self) -> bool {
        match self {
            Deadline::Clock {
                end_ns,
                spins,
                min_spins,
                max_spins,
            } => {
                *spins = spins.wrapping_add(1);
                *spins >= *max_spins || (*spins >= *min_spins && kvmclock::now_ns() >= *end_ns)
            }
            Deadline::Pit(deadline) => deadline.expired(),
        }
    }
}
