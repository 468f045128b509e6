//! Polled delays with the i8254 PIT channel 2, as Linux's
//! `pit_calibrate_tsc` does: gate on (port 0x61 bit 0), speaker off
//! (bit 1), channel 2 in mode 0 (command 0xb0), program the count through
//! port 0x42 and poll OUT2 (port 0x61 bit 5). No interrupts are involved.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::io::{inb, outb};

const PORT_CHANNEL2: u16 = 0x42;
const PORT_COMMAND: u16 = 0x43;
const PORT_SPEAKER: u16 = 0x61;
const GATE2: u8 = 0x01;
const SPEAKER: u8 = 0x02;
const OUT2: u8 = 0x20;
/// Channel 2, lobyte/hibyte access, mode 0 (interrupt on terminal count).
const CMD_CH2_ONESHOT: u8 = 0xb0;
/// Input clock of the PIT in Hz.
pub const PIT_HZ: u32 = 1_193_182;
/// Count for a 10 ms one-shot.
const COUNT_10MS: u16 = ((PIT_HZ + 50) / 100) as u16;
/// Polls of OUT2 before a one-shot is declared dead (several seconds).
const MAX_POLLS: u32 = 20_000_000;

/// Why a PIT delay failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// OUT2 reads high right after programming (in mode 0 it must be low):
    /// there is no PIT channel 2 / port 0x61 (reads as 0xff).
    Absent,
    /// OUT2 never went high.
    Timeout,
}

impl Error {
    /// Short name used in output lines.
    pub fn name(self) -> &'static str {
        match self {
            Error::Absent => "absent",
            Error::Timeout => "timeout",
        }
    }
}

/// Attempts at programming a one-shot before the PIT is declared absent
/// (a retry only happens if the vCPU stalled for the whole 10 ms).
const ATTEMPTS: u32 = 3;

/// Whether [`enable_gate`] already ran (single CPU, no interrupts).
static GATE_ENABLED: AtomicBool = AtomicBool::new(false);

/// Opens the channel 2 gate and silences the speaker, once (port 0x61 is
/// only touched if a delay is actually needed).
fn enable_gate() {
    if GATE_ENABLED.load(Ordering::Relaxed) {
        return;
    }
    GATE_ENABLED.store(true, Ordering::Relaxed);
    // SAFETY: port 0x61 is the system control port B; setting GATE2 and
    // clearing the speaker bit only affects PIT channel 2 and the speaker.
    unsafe {
        let value = inb(PORT_SPEAKER);
        outb(PORT_SPEAKER, (value & !SPEAKER) | GATE2);
    }
}

/// Starts a one-shot of `count` PIT ticks; OUT2 goes high when it ends.
pub fn start(count: u16) {
    enable_gate();
    let [low, high] = count.to_le_bytes();
    // SAFETY: ports 0x43/0x42 are the PIT command and channel 2 data
    // registers; programming channel 2 has no memory effects.
    unsafe {
        outb(PORT_COMMAND, CMD_CH2_ONESHOT);
        outb(PORT_CHANNEL2, low);
        outb(PORT_CHANNEL2, high);
    }
}

/// True once the one-shot started by [`start`] has expired.
pub fn expired() -> bool {
    // SAFETY: reading port 0x61 has no side effects.
    unsafe { inb(PORT_SPEAKER) & OUT2 != 0 }
}

/// True if PIT channel 2 and port 0x61 seem to exist: OUT2 reads low
/// right after a 10 ms one-shot is programmed (an absent port reads 0xff).
/// Leaves the one-shot running; does not wait for it.
pub fn present() -> bool {
    (0..ATTEMPTS).any(|_| {
        start(COUNT_10MS);
        !expired()
    })
}

/// Busy-waits 10 ms, calling `poll` between reads of OUT2 (e.g. to serve
/// a network device while ticking).
pub fn sleep_10ms_polling(mut poll: impl FnMut()) -> Result<(), Error> {
    for _ in 0..ATTEMPTS {
        start(COUNT_10MS);
        if expired() {
            continue;
        }
        for _ in 0..MAX_POLLS {
            if expired() {
                return Ok(());
            }
            poll();
        }
        return Err(Error::Timeout);
    }
    Err(Error::Absent)
}

/// A real-time deadline for polling loops that do not otherwise trap:
/// checks the PIT only every few thousand spins. Expires after roughly
/// `ms` milliseconds (in ~50 ms steps), and never before `min_spins`
/// calls to [`Deadline::expired`], so a missing PIT cannot cut it short.
pub struct Deadline {
    chunks_left: u32,
    spins: u64,
    min_spins: u64,
    spins_per_check: u64,
    /// Spins until the next OUT2 check.
    until_check: u64,
    max_spins: u64,
}

/// Count of one ~50 ms deadline chunk.
const CHUNK_COUNT: u16 = 59_659;
const CHUNK_MS: u32 = 50;
pub const SPINS_PER_CHECK: u64 = 4096;

impl Deadline {
    /// A deadline `ms` milliseconds from now; reads OUT2 every `spins_per_check`
    /// spins (each read is a port access: a VM exit) and expires after
    /// `max_spins` spins whatever the PIT says (in case OUT2 never rises).
    /// A slowly spinning (emulated) guest wants frequent checks: each
    /// check that sees OUT2 high only counts one 50 ms chunk.
    pub fn start_with(ms: u32, min_spins: u64, spins_per_check: u64, max_spins: u64) -> Deadline {
        start(CHUNK_COUNT);
        let spins_per_check = spins_per_check.max(1);
        Deadline {
            chunks_left: ms.div_ceil(CHUNK_MS).max(1),
            spins: 0,
            min_spins,
            spins_per_check,
            until_check: spins_per_check,
            max_spins,
        }
    }

    /// Call once per spin; true when the deadline has passed.
    pub fn expired(&mut self) -> bool {
        self.spins = self.spins.wrapping_add(1);
        if self.spins >= self.max_spins {
            return true;
        }
        // A countdown rather than `spins % spins_per_check`: a division
        // per spin is costly where instructions are emulated.
        self.until_check -= 1;
        if self.until_check > 0 {
            return false;
        }
        self.until_check = self.spins_per_check;
        if !expired() {
            return false;
        }
        self.chunks_left = self.chunks_left.saturating_sub(1);
        if self.chunks_left > 0 {
            start(CHUNK_COUNT);
            return false;
        }
        self.spins >= self.min_spins
    }
}
