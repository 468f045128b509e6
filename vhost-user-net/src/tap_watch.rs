//! Whether a pair's worker wakes for frames on its TAP. Not while the
//! guest has given no RX buffers or the RX limiter holds frames back: each
//! frame would wake the worker (and cost the sender a cross-CPU wake-up)
//! for nothing. The RX kick or the limiter's timer serves the TAP then,
//! and watching starts again once frames can move.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// One pair's TAP in its worker's epoll set (edge-triggered).
pub struct TapWatch {
    tap: RawFd,
    event: u64,
    epoll: OnceLock<RawFd>,
    /// What the last RX pass asked for.
    wanted: AtomicBool,
    /// Whether the TAP is in the epoll set.
    watched: AtomicBool,
}

impl TapWatch {
    pub fn new(tap: RawFd, event: u64) -> Self {
        Self {
            tap,
            event,
            epoll: OnceLock::new(),
            wanted: AtomicBool::new(true),
            watched: AtomicBool::new(false),
        }
    }

    /// Puts the TAP in the worker's epoll set `epoll` (which outlives the
    /// worker's events), once.
    pub fn start(&self, epoll: RawFd) -> io::Result<()> {
        if self.epoll.set(epoll).is_err() {
            return Err(io::Error::other("the TAP is watched already"));
        }
        self.apply()
    }

    /// Records whether the worker should wake for the TAP; [`apply`]
    /// makes it so.
    ///
    /// [`apply`]: Self::apply
    pub fn want(&self, watched: bool) {
        self.wanted.store(watched, Ordering::Relaxed);
    }

    /// Adds the TAP to the epoll set or removes it, as last wanted. An
    /// edge-triggered add of a TAP that holds frames reports them at once.
    pub fn apply(&self) -> io::Result<()> {
        let Some(&epoll) = self.epoll.get() else {
            return Ok(());
        };
        let wanted = self.wanted.load(Ordering::Relaxed);
        if self.watched.load(Ordering::Relaxed) == wanted {
            return Ok(());
        }
        let op = if wanted {
            libc::EPOLL_CTL_ADD
        } else {
            libc::EPOLL_CTL_DEL
        };
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: self.event,
        };
        // SAFETY: epoll and the TAP are open descriptors of this process for
        // as long as the worker runs; `event` is a valid epoll_event.
        if unsafe { libc::epoll_ctl(epoll, op, self.tap, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.watched.store(wanted, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;
    use vmm_sys_util::epoll::{Epoll, EpollEvent};

    fn ready(epoll: &Epoll) -> usize {
        let mut events = [EpollEvent::default(); 4];
        epoll.wait(0, &mut events).unwrap()
    }

    #[test]
    fn an_unwatched_tap_wakes_no_one_and_reports_its_frames_when_watched_again() {
        let (tap, sender) = UnixDatagram::pair().unwrap();
        let epoll = Epoll::new().unwrap();
        let watch = TapWatch::new(tap.as_raw_fd(), 7);
        watch.start(epoll.as_raw_fd()).unwrap();
        sender.send(b"one").unwrap();
        assert_eq!(ready(&epoll), 1);

        watch.want(false);
        watch.apply().unwrap();
        sender.send(b"two").unwrap();
        assert_eq!(ready(&epoll), 0);

        // Applying the same wish twice is no error (no second add).
        watch.want(true);
        watch.apply().unwrap();
        watch.apply().unwrap();
        let mut events = [EpollEvent::default(); 4];
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 1);
        assert_eq!(events[0].data(), 7);
    }
}
