//! Pseudo devices that exist only between the VMM and its guests.

mod boot_timer;

pub use boot_timer::{process_cpu_time, BootTimer, BOOT_TIMER_MAGIC};
