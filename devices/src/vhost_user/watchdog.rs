//! The reply watchdog: a backend that is stopped (not dead) must not hold
//! the vCPU or VMM thread that talks to it forever.
//!
//! The vhost crate retries a receive that times out, so socket timeouts do
//! not help. Instead every exchange arms a deadline here, and one watchdog
//! thread shuts the connection down when a deadline passes: the blocked
//! receive then sees end-of-file, the exchange fails, and the device's
//! backend monitor reports the backend as gone.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a backend may take to take or answer one message.
pub const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Armed {
    next_token: u64,
    /// token → (socket, deadline)
    deadlines: BTreeMap<u64, (RawFd, Instant)>,
}

type Shared = Arc<(Mutex<Armed>, Condvar)>;

static WATCHDOG: OnceLock<Shared> = OnceLock::new();

/// Starts the process's watchdog thread (once; later calls do nothing).
/// The thread runs `confine` first (it installs its seccomp filter) and
/// watches nothing if that fails.
pub fn start(confine: impl FnOnce() -> Result<(), String> + Send + 'static) -> std::io::Result<()> {
    if WATCHDOG.get().is_some() {
        return Ok(());
    }
    let shared: Shared = Arc::default();
    let watched = shared.clone();
    std::thread::Builder::new()
        .name("vu_watchdog".into())
        .spawn(move || match confine() {
            Ok(()) => watch(&watched),
            Err(err) => log::error!("the vhost-user reply watchdog cannot start: {err}"),
        })?;
    let _ = WATCHDOG.set(shared);
    Ok(())
}

fn watch(shared: &Shared) {
    let (lock, wake) = &**shared;
    let mut armed = lock.lock().unwrap_or_else(|poison| poison.into_inner());
    loop {
        let now = Instant::now();
        let expired: Vec<u64> = armed
            .deadlines
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            if let Some((fd, _)) = armed.deadlines.remove(&token) {
                log::error!(
                    "a vhost-user backend did not answer within {BACKEND_REPLY_TIMEOUT:?}; hanging up on it"
                );
                // SAFETY: the exchange that armed this deadline still owns
                // the socket (it disarms before the fd can be closed), and
                // shutdown only ends the connection, it frees nothing.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        let earliest = armed
            .deadlines
            .values()
            .map(|(_, deadline)| *deadline)
            .min();
        armed = match earliest {
            None => wake
                .wait(armed)
                .unwrap_or_else(|poison| poison.into_inner()),
            Some(deadline) => {
                match wake.wait_timeout(armed, deadline.saturating_duration_since(now)) {
                    Ok((guard, _)) => guard,
                    Err(poison) => poison.into_inner().0,
                }
            }
        };
    }
}

/// A deadline for one exchange on `fd`; dropping it disarms the deadline.
pub struct ReplyDeadline {
    token: Option<u64>,
}

/// Arms a deadline for an exchange on `fd`, if the watchdog runs.
pub fn arm(fd: RawFd) -> ReplyDeadline {
    let Some(shared) = WATCHDOG.get() else {
        return ReplyDeadline { token: None };
    };
    let (lock, wake) = &**shared;
    let mut armed = lock.lock().unwrap_or_else(|poison| poison.into_inner());
    let token = armed.next_token;
    armed.next_token += 1;
    armed
        .deadlines
        .insert(token, (fd, Instant::now() + BACKEND_REPLY_TIMEOUT));
    wake.notify_one();
    ReplyDeadline { token: Some(token) }
}

impl Drop for ReplyDeadline {
    fn drop(&mut self) {
        if let (Some(token), Some(shared)) = (self.token, WATCHDOG.get()) {
            let (lock, _) = &**shared;
            lock.lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .deadlines
                .remove(&token);
        }
    }
}
