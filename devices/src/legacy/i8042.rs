//! The i8042 PS/2 controller, reduced to what a microVM needs: the CPU reset
//! command (0xfe on port 0x64) that ends the VM, the keyboard-controller
//! handshakes Linux makes at boot, and a keyboard buffer through which the
//! VMM sends Ctrl+Alt+Del (`SendCtrlAltDel`).
//!
//! vm-superio's i8042 model has no keyboard buffer, so this one is ours.

use std::collections::VecDeque;

use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// Port offsets from 0x60.
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

/// Controller commands (written to port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Status register bits.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

/// Control register bits.
const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;

const KBD_ACK: u8 = 0xfa;
const SELF_TEST_OK: u8 = 0x55;
/// Ctrl, Alt and Delete key presses in scancode set 2, as Linux's atkbd
/// reads them when the controller does no translation (Firecracker's
/// `i8042.dumbkbd` command line).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
/// Bytes the keyboard buffer holds before it refuses more.
const BUFFER_SIZE: usize = 16;

/// Errors of the i8042 model.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("the i8042 keyboard buffer is full ({BUFFER_SIZE} bytes)")]
    BufferFull,
    #[error("cannot raise the keyboard interrupt: {0}")]
    Interrupt(std::io::Error),
}

/// Event counters, exported as the `i8042` metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct I8042Counters {
    pub reset_count: u64,
    pub missed_read_count: u64,
    pub missed_write_count: u64,
    pub read_count: u64,
    pub write_count: u64,
}

/// The i8042 controller on ports 0x60-0x64.
pub struct I8042 {
    reset_evt: EventFdTrigger,
    kbd_irq: EventFdTrigger,
    status: u8,
    control: u8,
    output_port: u8,
    pending_command: Option<u8>,
    buffer: VecDeque<u8>,
    counters: I8042Counters,
}

impl I8042 {
    /// Creates the controller; `reset_evt` fires when the guest resets the
    /// CPU, `kbd_irq` raises IRQ 1.
    pub fn new(reset_evt: EventFdTrigger, kbd_irq: EventFdTrigger) -> Self {
        Self {
            reset_evt,
            kbd_irq,
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            output_port: 0,
            pending_command: None,
            buffer: VecDeque::with_capacity(BUFFER_SIZE),
            counters: I8042Counters::default(),
        }
    }

    /// The event counters so far.
    pub fn counters(&self) -> I8042Counters {
        self.counters
    }

    /// Queues Ctrl+Alt+Del key presses and interrupts the guest.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if self.buffer.len() + CTRL_ALT_DEL.len() > BUFFER_SIZE {
            return Err(I8042Error::BufferFull);
        }
        for byte in CTRL_ALT_DEL {
            self.push(byte);
        }
        self.raise_kbd_irq()
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() < BUFFER_SIZE {
            self.buffer.push_back(byte);
        }
        self.status |= SB_OUT_DATA_AVAIL;
    }

    fn pop(&mut self) -> Option<u8> {
        let byte = self.buffer.pop_front();
        if self.buffer.is_empty() {
            self.status &= !SB_OUT_DATA_AVAIL;
        }
        byte
    }

    fn raise_kbd_irq(&mut self) -> Result<(), I8042Error> {
        if self.control & CB_KBD_INT != 0 && !self.buffer.is_empty() {
            self.kbd_irq.trigger().map_err(I8042Error::Interrupt)?;
        }
        Ok(())
    }

    fn command(&mut self, command: u8) {
        match command {
            CMD_RESET_CPU => {
                self.counters.reset_count += 1;
                if let Err(err) = self.reset_evt.trigger() {
                    log::error!("i8042: cannot signal the CPU reset: {err}");
                }
            }
            CMD_READ_CTR => self.push(self.control),
            CMD_READ_OUTP => self.push(self.output_port),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(0x00),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF | CMD_WRITE_AUX => {
                self.pending_command = Some(command)
            }
            CMD_DISABLE_KBD => self.status &= !SB_KBD_ENABLED,
            CMD_ENABLE_KBD => self.status |= SB_KBD_ENABLED,
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            _ => self.counters.missed_write_count += 1,
        }
    }

    /// A write to the data port; returns whether the keyboard answered
    /// (a byte the guest expects through IRQ 1, as Linux's keyboard probe
    /// does).
    fn data(&mut self, value: u8) -> bool {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTP) => self.output_port = value,
            Some(CMD_WRITE_KBD_OUTBUF) => {
                self.push(value);
                return true;
            }
            // There is no mouse: swallow bytes meant for it.
            Some(CMD_WRITE_AUX) => {}
            // A command for the keyboard itself: acknowledge it.
            _ => {
                self.push(KBD_ACK);
                return true;
            }
        }
        false
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0);
            self.counters.missed_read_count += 1;
            return;
        };
        *byte = match offset {
            DATA_OFFSET => {
                let value = self.pop().unwrap_or(0);
                // More bytes queued: interrupt again for the next one.
                if let Err(err) = self.raise_kbd_irq() {
                    crate::guest_log_here!(log::Level::Warn, "i8042: {err}");
                }
                value
            }
            COMMAND_OFFSET => self.status,
            _ => {
                self.counters.missed_read_count += 1;
                0
            }
        };
        self.counters.read_count += 1;
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            self.counters.missed_write_count += 1;
            return;
        };
        match offset {
            COMMAND_OFFSET => {
                self.status |= SB_I8042_CMD_DATA;
                self.command(*value);
            }
            DATA_OFFSET => {
                self.status &= !SB_I8042_CMD_DATA;
                if self.data(*value) {
                    if let Err(err) = self.raise_kbd_irq() {
                        crate::guest_log_here!(log::Level::Warn, "i8042: {err}");
                    }
                }
            }
            _ => self.counters.missed_write_count += 1,
        }
        self.counters.write_count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn device() -> (I8042, EventFd, EventFd) {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::new(
            EventFdTrigger::new(reset.try_clone().unwrap()),
            EventFdTrigger::new(irq.try_clone().unwrap()),
        );
        (dev, reset, irq)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_fires_the_reset_event() {
        let (mut dev, reset, _) = device();
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert!(reset.read().is_err(), "a non-reset command must not fire");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
        assert_eq!(dev.counters().reset_count, 1);
    }

    #[test]
    fn ctrl_alt_del_reaches_the_data_port_with_interrupts() {
        let (mut dev, _, irq) = device();
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_DATA_AVAIL, 0);
        dev.send_ctrl_alt_del().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut got = vec![];
        while read(&mut dev, COMMAND_OFFSET) & SB_OUT_DATA_AVAIL != 0 {
            got.push(read(&mut dev, DATA_OFFSET));
        }
        assert_eq!(got, CTRL_ALT_DEL);
        // Each read that left bytes behind raised the interrupt again.
        assert_eq!(irq.read().unwrap(), 3);
    }

    #[test]
    fn the_keyboard_acknowledges_a_command_with_an_interrupt() {
        let (mut dev, _, irq) = device();
        dev.write(DATA_OFFSET, &[0xf2]); // ATKBD_CMD_GETID
        assert_eq!(irq.read().unwrap(), 1, "no IRQ 1 for the ACK");
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
        // With the keyboard interrupt off in the control byte, none.
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[CB_POST_OK]);
        dev.write(DATA_OFFSET, &[0xf2]);
        assert!(irq.read().is_err());
    }

    #[test]
    fn handshakes_and_a_full_buffer() {
        let (mut dev, _, _) = device();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x00]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x00);
        dev.write(DATA_OFFSET, &[0xff]); // keyboard reset command
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
        for _ in 0..BUFFER_SIZE / CTRL_ALT_DEL.len() {
            dev.send_ctrl_alt_del().unwrap();
        }
        assert!(matches!(
            dev.send_ctrl_alt_del(),
            Err(I8042Error::BufferFull)
        ));
        // Wide accesses are ignored.
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        assert_eq!(dev.counters().reset_count, 0);
    }
}
