//! The i8042 under a hostile guest: any sequence of reads and writes of
//! any width on its ports (0x60 data, 0x64 command/status, and the ones
//! between). The controller must never panic, its output buffer must stay
//! bounded (at most 16 bytes reach the guest between two writes), and
//! Ctrl+Alt+Del from the VMM must keep working or be refused cleanly.
#![no_main]

use arbitrary::Arbitrary;
use devices::legacy::i8042::I8042;
use devices::legacy::EventFdTrigger;
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u8, width: u8 },
    Write { offset: u8, bytes: Vec<u8> },
    CtrlAltDel,
}

fn trigger() -> EventFdTrigger {
    EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))
}

fuzz_target!(|ops: Vec<Op>| {
    let mut dev = I8042::new(trigger(), trigger(), trigger());
    for op in ops {
        match op {
            Op::Read { offset, width } => {
                let mut data = vec![0u8; usize::from(width % 9)];
                dev.read(u64::from(offset % 8), &mut data);
            }
            Op::Write { offset, bytes } => {
                dev.write(u64::from(offset % 8), &bytes[..bytes.len().min(8)]);
                // Drain: the buffer holds at most 16 bytes.
                let mut drained = 0;
                let mut status = [0u8];
                loop {
                    dev.read(4, &mut status);
                    if status[0] & 1 == 0 {
                        break;
                    }
                    dev.read(0, &mut [0u8]);
                    drained += 1;
                    assert!(drained <= 16, "the output buffer grew past 16 bytes");
                }
            }
            Op::CtrlAltDel => {
                let _ = dev.send_ctrl_alt_del();
            }
        }
    }
});
