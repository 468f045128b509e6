//! The i8042 PS/2 controller, reduced to what a microVM needs: the CPU reset
//! command (0xfe on port 0x64) that ends the VM, the keyboard-controller
//! handshakes Linux makes at boot, and a keyboard buffer through which the
//! VMM sends Ctrl+Alt+Del (`SendCtrlAltDel`).
//!
//! The controller's AUX (mouse) side is there, with no mouse behind it:
//! the loopback command answers on IRQ 12 and the AUX enable bits read
//! back, so Linux's AUX probe finishes at once instead of waiting out its
//! 250 ms interrupt test (about a fifth of a microVM's boot to init), and
//! a byte sent to the mouse comes back as a timed-out resend request, as
//! from a controller with an empty mouse port.
//!
//! The keyboard behind it answers as an MF2 keyboard does: an ACK for
//! every byte, its ID after `GETID` and its self-test result after a
//! reset. Without the ID, Linux's keyboard probe waits 500 ms for it, and
//! a reboot or power-off waits for that probe (Firecracker's keyboard only
//! acknowledges).
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
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Status register bits.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;
/// The byte in the output buffer came from the AUX port.
const SB_AUX_DATA: u8 = 0x20;
/// The AUX device did not answer.
const SB_TIMEOUT: u8 = 0x40;

/// Control register bits.
const CB_KBD_INT: u8 = 0x01;
const CB_AUX_INT: u8 = 0x02;
const CB_POST_OK: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;
const CB_AUX_DISABLED: u8 = 0x20;

/// What an empty mouse port answers a byte sent to it (with [`SB_TIMEOUT`]).
const AUX_RESEND: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
/// Keyboard commands followed by a parameter byte: set LEDs, select or
/// query the scan code set, set the typematic rate.
const KBD_CMD_SET_LEDS: u8 = 0xed;
const KBD_CMD_SCAN_SET: u8 = 0xf0;
const KBD_CMD_SET_RATE: u8 = 0xf3;
const KBD_CMD_GET_ID: u8 = 0xf2;
const KBD_CMD_RESET: u8 = 0xff;
/// An MF2 keyboard's ID, as it sends it without translation.
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// The keyboard's basic assurance test passed (after a reset).
const KBD_BAT_OK: u8 = 0xaa;
/// The scan code set the keyboard reports: set 2, untranslated.
const KBD_SCAN_SET: u8 = 0x02;
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
    #[error("cannot raise the {0} interrupt: {1}")]
    Interrupt(&'static str, std::io::Error),
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

/// A byte in the output buffer, with the status bits it is read with
/// (none from the keyboard, [`SB_AUX_DATA`] from the AUX port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Output {
    byte: u8,
    status: u8,
}

/// The controller's registers and output buffer, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    status: u8,
    control: u8,
    output_port: u8,
    pending_command: Option<u8>,
    buffer: Vec<Output>,
    /// A keyboard command waiting for its parameter byte.
    #[serde(default)]
    keyboard_command: Option<u8>,
}

/// The i8042 controller on ports 0x60-0x64.
pub struct I8042 {
    reset_evt: EventFdTrigger,
    kbd_irq: EventFdTrigger,
    aux_irq: EventFdTrigger,
    /// The status bits that do not depend on the output buffer.
    status: u8,
    control: u8,
    output_port: u8,
    pending_command: Option<u8>,
    keyboard_command: Option<u8>,
    buffer: VecDeque<Output>,
    counters: I8042Counters,
}

impl I8042 {
    /// Creates the controller; `reset_evt` fires when the guest resets the
    /// CPU, `kbd_irq` raises IRQ 1 and `aux_irq` IRQ 12.
    pub fn new(
        reset_evt: EventFdTrigger,
        kbd_irq: EventFdTrigger,
        aux_irq: EventFdTrigger,
    ) -> Self {
        Self {
            reset_evt,
            kbd_irq,
            aux_irq,
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            output_port: 0,
            pending_command: None,
            keyboard_command: None,
            buffer: VecDeque::with_capacity(BUFFER_SIZE),
            counters: I8042Counters::default(),
        }
    }

    /// The registers and the output buffer.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output_port: self.output_port,
            pending_command: self.pending_command,
            buffer: self.buffer.iter().copied().collect(),
            keyboard_command: self.keyboard_command,
        }
    }

    /// Takes saved registers and output buffer (at most its capacity).
    pub fn restore(&mut self, state: &I8042State) {
        self.status = state.status;
        self.control = state.control;
        self.output_port = state.output_port;
        self.pending_command = state.pending_command;
        self.keyboard_command = state.keyboard_command;
        self.buffer = state.buffer.iter().copied().take(BUFFER_SIZE).collect();
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
            self.push(byte, 0);
        }
        self.raise_irq()
    }

    /// Queues `byte`, read with the status bits `status`.
    fn push(&mut self, byte: u8, status: u8) {
        if self.buffer.len() < BUFFER_SIZE {
            self.buffer.push_back(Output { byte, status });
        }
    }

    /// The status register: the output buffer's state and its next byte's
    /// source.
    fn status(&self) -> u8 {
        match self.buffer.front() {
            Some(next) => self.status | SB_OUT_DATA_AVAIL | next.status,
            None => self.status,
        }
    }

    /// Interrupts the guest for the next byte in the output buffer, on the
    /// line of its port, if the control byte enables that line.
    fn raise_irq(&mut self) -> Result<(), I8042Error> {
        let Some(next) = self.buffer.front() else {
            return Ok(());
        };
        let (trigger, enabled, name) = if next.status & SB_AUX_DATA != 0 {
            (&self.aux_irq, CB_AUX_INT, "AUX")
        } else {
            (&self.kbd_irq, CB_KBD_INT, "keyboard")
        };
        if self.control & enabled != 0 {
            trigger
                .trigger()
                .map_err(|err| I8042Error::Interrupt(name, err))?;
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
            CMD_READ_CTR => self.push(self.control, 0),
            CMD_READ_OUTP => self.push(self.output_port, 0),
            CMD_SELF_TEST => self.push(SELF_TEST_OK, 0),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(0x00, 0),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF | CMD_WRITE_AUX_OUTBUF
            | CMD_WRITE_AUX => self.pending_command = Some(command),
            CMD_DISABLE_KBD => {
                self.status &= !SB_KBD_ENABLED;
                self.control |= CB_KBD_DISABLED;
            }
            CMD_ENABLE_KBD => {
                self.status |= SB_KBD_ENABLED;
                self.control &= !CB_KBD_DISABLED;
            }
            CMD_DISABLE_AUX => self.control |= CB_AUX_DISABLED,
            CMD_ENABLE_AUX => self.control &= !CB_AUX_DISABLED,
            _ => self.counters.missed_write_count += 1,
        }
    }

    /// A write to the data port; returns whether a port answered (a byte
    /// the guest expects through its interrupt, as Linux's keyboard and
    /// AUX probes do).
    fn data(&mut self, value: u8) -> bool {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTP) => self.output_port = value,
            Some(CMD_WRITE_KBD_OUTBUF) => {
                self.push(value, 0);
                return true;
            }
            // The loopback test: the byte comes back as if from the mouse.
            Some(CMD_WRITE_AUX_OUTBUF) => {
                self.push(value, SB_AUX_DATA);
                return true;
            }
            // No mouse answers: the controller reports the timeout.
            Some(CMD_WRITE_AUX) => {
                self.push(AUX_RESEND, SB_AUX_DATA | SB_TIMEOUT);
                return true;
            }
            _ => {
                self.keyboard(value);
                return true;
            }
        }
        false
    }

    /// A byte for the keyboard itself: a command or a command's parameter.
    /// The keyboard acknowledges each, and answers the commands that ask.
    fn keyboard(&mut self, value: u8) {
        self.push(KBD_ACK, 0);
        if let Some(command) = self.keyboard_command.take() {
            if command == KBD_CMD_SCAN_SET && value == 0 {
                self.push(KBD_SCAN_SET, 0);
            }
            return;
        }
        match value {
            KBD_CMD_SET_LEDS | KBD_CMD_SCAN_SET | KBD_CMD_SET_RATE => {
                self.keyboard_command = Some(value);
            }
            KBD_CMD_GET_ID => KBD_ID.into_iter().for_each(|byte| self.push(byte, 0)),
            KBD_CMD_RESET => self.push(KBD_BAT_OK, 0),
            _ => {}
        }
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
                let value = self.buffer.pop_front().map_or(0, |output| output.byte);
                // More bytes queued: interrupt again for the next one.
                if let Err(err) = self.raise_irq() {
                    crate::guest_log_here!(log::Level::Warn, "i8042: {err}");
                }
                value
            }
            COMMAND_OFFSET => self.status(),
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
                    if let Err(err) = self.raise_irq() {
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
        let (dev, reset, irq, _) = device_with_aux();
        (dev, reset, irq)
    }

    /// The controller with its reset event, IRQ 1 and IRQ 12.
    fn device_with_aux() -> (I8042, EventFd, EventFd, EventFd) {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let aux = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::new(
            EventFdTrigger::new(reset.try_clone().unwrap()),
            EventFdTrigger::new(irq.try_clone().unwrap()),
            EventFdTrigger::new(aux.try_clone().unwrap()),
        );
        (dev, reset, irq, aux)
    }

    fn write_ctr(dev: &mut I8042, value: u8) {
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[value]);
    }

    fn read_ctr(dev: &mut I8042) -> u8 {
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        read(dev, DATA_OFFSET)
    }

    /// Linux's AUX probe (i8042_check_aux): loopback, the AUX enable bit
    /// read back, then the loopback again with the AUX interrupt on, which
    /// it waits 250 ms for.
    #[test]
    fn the_aux_loopback_answers_on_irq_12_and_the_aux_bits_read_back() {
        let (mut dev, _, kbd, aux) = device_with_aux();
        write_ctr(&mut dev, CB_POST_OK);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_AUX_OUTBUF]);
        dev.write(DATA_OFFSET, &[0x5a]);
        assert_eq!(
            read(&mut dev, COMMAND_OFFSET) & (SB_OUT_DATA_AVAIL | SB_AUX_DATA),
            SB_OUT_DATA_AVAIL | SB_AUX_DATA
        );
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x5a);
        assert!(aux.read().is_err(), "no IRQ 12 while the CTR disables it");

        dev.write(COMMAND_OFFSET, &[CMD_DISABLE_AUX]);
        assert_ne!(read_ctr(&mut dev) & CB_AUX_DISABLED, 0);
        dev.write(COMMAND_OFFSET, &[CMD_ENABLE_AUX]);
        assert_eq!(read_ctr(&mut dev) & CB_AUX_DISABLED, 0);

        write_ctr(&mut dev, CB_POST_OK | CB_KBD_INT | CB_AUX_INT);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_AUX_OUTBUF]);
        dev.write(DATA_OFFSET, &[0xa5]);
        assert_eq!(aux.read().unwrap(), 1, "no IRQ 12 for the loopback byte");
        assert!(
            kbd.read().is_err(),
            "the loopback byte is not the keyboard's"
        );
        assert_eq!(read(&mut dev, DATA_OFFSET), 0xa5);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_DATA_AVAIL, 0);
    }

    #[test]
    fn a_byte_for_the_absent_mouse_comes_back_as_a_timed_out_resend() {
        let (mut dev, _, _, aux) = device_with_aux();
        write_ctr(&mut dev, CB_POST_OK | CB_AUX_INT);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_AUX]);
        dev.write(DATA_OFFSET, &[0xff]); // PSMOUSE_CMD_RESET_BAT
        assert_eq!(aux.read().unwrap(), 1);
        let status = read(&mut dev, COMMAND_OFFSET);
        assert_eq!(
            status & (SB_AUX_DATA | SB_TIMEOUT),
            SB_AUX_DATA | SB_TIMEOUT
        );
        assert_eq!(read(&mut dev, DATA_OFFSET), AUX_RESEND);
        // The keyboard's bytes after it carry no AUX bits.
        dev.write(DATA_OFFSET, &[0xf2]);
        assert_eq!(
            read(&mut dev, COMMAND_OFFSET) & (SB_AUX_DATA | SB_TIMEOUT),
            0
        );
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
        dev.write(DATA_OFFSET, &[0xf4]); // ATKBD_CMD_ENABLE
        assert_eq!(irq.read().unwrap(), 1, "no IRQ 1 for the ACK");
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
        // With the keyboard interrupt off in the control byte, none.
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[CB_POST_OK]);
        dev.write(DATA_OFFSET, &[0xf4]);
        assert!(irq.read().is_err());
    }

    /// Everything in the output buffer, in order.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut got = vec![];
        while read(dev, COMMAND_OFFSET) & SB_OUT_DATA_AVAIL != 0 {
            got.push(read(dev, DATA_OFFSET));
        }
        got
    }

    /// Linux's atkbd probe: GETID, then LEDs and typematic rate with their
    /// parameters (which are acknowledged, never taken for commands).
    #[test]
    fn the_keyboard_answers_its_id_and_takes_parameters_as_parameters() {
        let (mut dev, _, irq) = device();
        dev.write(DATA_OFFSET, &[KBD_CMD_GET_ID]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(drain(&mut dev), [KBD_ACK, KBD_ID[0], KBD_ID[1]]);
        // Each byte left behind by a read raised IRQ 1 again.
        assert_eq!(irq.read().unwrap(), 2);
        dev.write(DATA_OFFSET, &[KBD_CMD_SET_RATE]);
        dev.write(DATA_OFFSET, &[KBD_CMD_GET_ID]); // a rate, not GETID
        dev.write(DATA_OFFSET, &[KBD_CMD_SET_LEDS]);
        dev.write(DATA_OFFSET, &[KBD_CMD_RESET]); // LEDs, not a reset
        assert_eq!(drain(&mut dev), [KBD_ACK; 4]);
        dev.write(DATA_OFFSET, &[KBD_CMD_SCAN_SET]);
        dev.write(DATA_OFFSET, &[0]);
        assert_eq!(drain(&mut dev), [KBD_ACK, KBD_ACK, KBD_SCAN_SET]);
    }

    #[test]
    fn a_snapshot_keeps_a_command_waiting_for_its_parameter() {
        let (mut dev, _, _) = device();
        dev.write(DATA_OFFSET, &[KBD_CMD_SET_LEDS]);
        drain(&mut dev);
        let (mut restored, _, _) = device();
        restored.restore(&dev.state());
        restored.write(DATA_OFFSET, &[KBD_CMD_GET_ID]);
        assert_eq!(drain(&mut restored), [KBD_ACK]);
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
        dev.write(DATA_OFFSET, &[KBD_CMD_RESET]);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_BAT_OK);
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
