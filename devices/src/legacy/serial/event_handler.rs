//! Moves host input (the VMM's stdin) into the guest's receive FIFO from the
//! main event loop, pausing while the FIFO is full.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::SerialDevice;

/// Event-loop subscriber feeding a readable, non-blocking source into the UART.
pub struct SerialInput<R: Read + AsRawFd + Send> {
    serial: Arc<Mutex<SerialDevice>>,
    source: R,
    input_ready_fd: i32,
    source_registered: bool,
}

impl<R: Read + AsRawFd + Send> SerialInput<R> {
    /// Creates the subscriber for `serial`, reading from `source`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, source: R) -> Self {
        let input_ready_fd = lock(&serial).input_ready.evt.as_raw_fd();
        Self {
            serial,
            source,
            input_ready_fd,
            source_registered: false,
        }
    }

    fn pump(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let room = lock(&self.serial).uart.fifo_capacity().min(buf.len());
        if room == 0 {
            self.set_source_registered(ops, false);
            return;
        }
        match self.source.read(&mut buf[..room]) {
            Ok(0) => {
                log::debug!("serial: input closed");
                self.set_source_registered(ops, false);
            }
            Ok(n) => {
                if let Err(err) = lock(&self.serial).enqueue_input(&buf[..n]) {
                    log::warn!("serial: cannot queue input: {err}");
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => {
                log::warn!("serial: input read failed: {err}");
                self.set_source_registered(ops, false);
            }
        }
    }

    fn set_source_registered(&mut self, ops: &mut EventOps, registered: bool) {
        if registered == self.source_registered {
            return;
        }
        let events = Events::new(&self.source, EventSet::IN);
        let result = if registered {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.source_registered = registered,
            Err(err) => log::error!("serial: cannot update the input registration: {err:?}"),
        }
    }
}

impl<R: Read + AsRawFd + Send> MutEventSubscriber for SerialInput<R> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new_raw(self.input_ready_fd, EventSet::IN)) {
            log::error!("serial: cannot register the input-ready event: {err:?}");
        }
        self.set_source_registered(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_ready_fd {
            let _ = lock(&self.serial).input_ready.evt.read();
            self.set_source_registered(ops, true);
        } else if events.event_set().contains(EventSet::IN) {
            self.pump(ops);
        } else {
            // Hang-up or error on the source without data: stop polling it.
            self.set_source_registered(ops, false);
        }
    }
}

fn lock(serial: &Mutex<SerialDevice>) -> std::sync::MutexGuard<'_, SerialDevice> {
    serial
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
