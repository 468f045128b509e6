//! The serial port as seen by the guest, on top of vm-superio's UART model.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::legacy::EventFdTrigger;

/// Where the guest's console output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// Signals the input handler when the guest drained the receive FIFO, so
/// that it can resume reading the host input it paused on a full FIFO.
pub(super) struct InputReady {
    pub(super) evt: EventFd,
}

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        crate::guest_log_here!(log::Level::Warn, "serial: lost an output byte");
    }
    fn in_buffer_empty(&self) {
        if let Err(err) = self.evt.write(1) {
            log::error!("serial: cannot signal the input handler: {err}");
        }
    }
}

/// The UART's registers and receive FIFO, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// A 16550A UART on eight consecutive I/O ports.
pub struct SerialDevice {
    pub(super) uart: Serial<EventFdTrigger, Arc<InputReady>, SerialOutput>,
    pub(super) input_ready: Arc<InputReady>,
    missed_writes: u64,
}

impl SerialDevice {
    /// Creates the UART; `irq` is triggered for the guest's interrupt line.
    pub fn new(irq: EventFdTrigger, out: SerialOutput) -> io::Result<Self> {
        let input_ready = Arc::new(InputReady {
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        });
        Ok(Self {
            uart: Serial::with_events(irq, input_ready.clone(), out),
            input_ready,
            missed_writes: 0,
        })
    }

    /// The registers and the receive FIFO.
    pub fn state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Takes saved registers and receive FIFO, keeping this device's
    /// interrupt line and output.
    pub fn restore(&mut self, state: &SerialDeviceState) -> io::Result<()> {
        let saved = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let trigger = self.uart.interrupt_evt().try_clone()?;
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(io::sink()));
        match Serial::from_state(&saved, trigger, self.input_ready.clone(), out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(err) => Err(io::Error::other(format!(
                "a saved serial port that does not fit: {err:?}"
            ))),
        }
    }

    /// Output bytes the guest wrote that the output file could not take.
    pub fn missed_writes(&self) -> u64 {
        self.missed_writes
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = self.uart.fifo_capacity().min(bytes.len());
        self.uart
            .enqueue_raw_bytes(&bytes[..room])
            .map_err(|err| io::Error::other(format!("{err:?}")))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] if offset < 8 => *byte = self.uart.read(offset as u8),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([value], true) = (data, offset < 8) {
            // A full output FIFO drops the byte rather than stall the vCPU.
            if let Err(err) = self.uart.write(offset as u8, *value) {
                self.missed_writes += 1;
                crate::guest_log_here!(
                    log::Level::Warn,
                    "serial: write to register {offset} failed: {err:?}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_writes_reach_the_output_and_input_reaches_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let mut dev = SerialDevice::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(out.clone()),
        )
        .unwrap();
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");

        dev.write(1, &[0x01]); // IER: interrupt on received data
        assert_eq!(dev.enqueue_input(b"x").unwrap(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        assert_eq!(&byte, b"x");
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_ignored() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(EventFdTrigger::new(irq), Box::new(io::sink())).unwrap();
        let mut wide = [0xffu8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        dev.write(9, &[1]);
        dev.write(0, &[1, 2]);
    }
}
