//! The boot timer: Firecracker's convention for measuring boot time.
//!
//! When the guest writes the byte 123 at the device's base, the VMM logs the
//! wall-clock and CPU time elapsed since the process started.

use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// The value a guest writes to mark the end of its boot.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Process-relative start times that boot time is measured from.
pub struct BootTimer {
    start_wall: Instant,
    start_cpu: Duration,
}

impl BootTimer {
    /// Creates the timer; `start_wall` and `start_cpu` are taken when the
    /// process starts.
    pub fn new(start_wall: Instant, start_cpu: Duration) -> Self {
        Self {
            start_wall,
            start_cpu,
        }
    }

    /// The log line Firecracker prints, which existing tooling parses.
    pub fn report(wall: Duration, cpu: Duration) -> String {
        let wall_us = wall.as_micros();
        let cpu_us = cpu.as_micros();
        format!(
            "Guest-boot-time = {wall_us:>6} us {} ms, {cpu_us:>6} CPU us {} CPU ms",
            wall_us / 1000,
            cpu_us / 1000
        )
    }
}

/// CPU time this process has used so far.
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a
    // constant the kernel knows; the call writes nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [BOOT_TIMER_MAGIC] {
            let wall = self.start_wall.elapsed();
            let cpu = process_cpu_time().saturating_sub(self.start_cpu);
            log::info!("{}", Self::report(wall, cpu));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_matches_firecracker_format() {
        let line = BootTimer::report(Duration::from_micros(41_234), Duration::from_micros(9_876));
        assert_eq!(
            line,
            "Guest-boot-time =  41234 us 41 ms,   9876 CPU us 9 CPU ms"
        );
    }
}
