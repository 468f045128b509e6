//! A backend process's life: logging, the listening socket, the seccomp
//! filters, the end on SIGTERM/SIGINT, and serving one frontend, with one
//! exit-status convention:
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the frontend disconnected, or SIGTERM/SIGINT |
//! | 1 | the device or the connection failed while serving |
//! | 2 | unusable flags or set-up (a file, a socket, a filter) |
//! | 3 | the guest broke the device ([`EXIT_BROKEN`]) |

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::process::ExitCode;
use std::sync::Arc;

use backend_stats::{CounterSet, Stats, StatsPage};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::SFlag;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};

use crate::cli::CommonArgs;
use crate::device::{Device, Served};
use crate::{BackendMemory, BackendVring};

/// The exit status of a backend whose device a guest broke.
pub const EXIT_BROKEN: i32 = 3;

/// Why a backend process ends early.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Flags or set-up the backend cannot use (exit status 2).
    #[error("{0}")]
    Setup(String),
    /// A failure while running (exit status 1).
    #[error("{0}")]
    Runtime(String),
}

impl Failure {
    pub fn setup(message: impl std::fmt::Display) -> Self {
        Self::Setup(message.to_string())
    }

    pub fn runtime(message: impl std::fmt::Display) -> Self {
        Self::Runtime(message.to_string())
    }

    fn code(&self) -> u8 {
        match self {
            Failure::Setup(_) => 2,
            Failure::Runtime(_) => 1,
        }
    }
}

/// One backend process, named in every line it logs.
#[derive(Debug, Clone, Copy)]
pub struct Process {
    name: &'static str,
}

impl Process {
    /// Starts logging: warnings and errors by default (`RUST_LOG` for
    /// more). virtio-queue logs an error for each bad chain a guest posts,
    /// with no limit: it is off unless `RUST_LOG` names it; backends report
    /// a broken ring themselves, rate-limited.
    /// The backend's own lines (its crate's and this one's) are logged
    /// from `info` up, each as `<name>: <message>` (`<name>: <level>:
    /// <message>` for warnings and errors), on stderr, which the VMM passes
    /// on to its own log.
    ///
    /// SIGTERM and SIGINT are blocked from here on (and in every thread
    /// started later): one that arrives while the backend sets up waits
    /// for [`Process::confine`]'s waiter, and still ends the process
    /// cleanly.
    pub fn start(name: &'static str) -> Self {
        use std::io::Write;
        let blocked = termination_signals().thread_block();
        let own_crate = name.replace('-', "_");
        env_logger::Builder::new()
            .filter_level(log::LevelFilter::Warn)
            .filter_module(&own_crate, log::LevelFilter::Info)
            .filter_module("vhost_user_common", log::LevelFilter::Info)
            .filter_module("virtio_queue", log::LevelFilter::Off)
            .format(move |buf, record| match record.level() {
                log::Level::Info => writeln!(buf, "{name}: {}", record.args()),
                level => writeln!(
                    buf,
                    "{name}: {}: {}",
                    level.as_str().to_lowercase(),
                    record.args()
                ),
            })
            .parse_env(env_logger::Env::default())
            .init();
        if let Err(err) = blocked {
            log::warn!("cannot block SIGTERM during set-up: {err}");
        }
        Self { name }
    }

    pub fn name(self) -> &'static str {
        self.name
    }

    /// Logs `failure` and returns its exit status.
    pub fn exit(self, failure: Failure) -> ExitCode {
        log::error!("{failure}");
        ExitCode::from(failure.code())
    }

    /// Says what the process does.
    pub fn announce(self, what: impl std::fmt::Display) {
        log::info!("{what}");
    }

    /// The socket frontends connect to: `--socket PATH`, or an inherited
    /// listening socket (`--fd N`, checked to be a socket).
    pub fn listener(self, args: &CommonArgs) -> Result<Listener, Failure> {
        match (&args.socket, args.fd) {
            (Some(path), _) => Listener::new(path, true).map_err(|err| {
                Failure::setup(format_args!("cannot listen on {}: {err}", path.display()))
            }),
            (None, Some(fd)) => {
                let owned = fd
                    .take()
                    .map_err(|err| Failure::setup(format_args!("--fd {fd}: {err}")))?;
                let is_socket = nix::sys::stat::fstat(owned.as_raw_fd()).is_ok_and(|stat| {
                    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK
                });
                if !is_socket {
                    return Err(Failure::setup(format_args!("--fd {fd} is not a socket")));
                }
                // SAFETY: the fd is an open socket this process now owns.
                Ok(unsafe { Listener::from_raw_fd(owned.into_raw_fd()) })
            }
            (None, None) => Err(Failure::setup("give --socket PATH or --fd N")),
        }
    }

    /// The device's counters: in the VMM's page (`--stats-fd N`), or in
    /// private memory.
    pub fn stats<C: CounterSet>(self, args: &CommonArgs) -> Result<Stats<C>, Failure> {
        let Some(fd) = args.stats_fd else {
            return Ok(Stats::private());
        };
        let owned = fd
            .take()
            .map_err(|err| Failure::setup(format_args!("--stats-fd {fd}: {err}")))?;
        StatsPage::map_shared(owned)
            .map(Stats::new)
            .map_err(|err| Failure::setup(format_args!("--stats-fd {fd}: {err}")))
    }

    /// The seccomp filters (kinds "main" and "worker"): the built-in ones,
    /// those of `--seccomp-filter`, or none with `--no-seccomp`.
    pub fn seccomp(
        self,
        args: &CommonArgs,
        builtin: &[u8],
    ) -> Result<tessera_seccomp::Filters, Failure> {
        tessera_seccomp::load(
            builtin,
            args.no_seccomp,
            args.seccomp_filter.as_deref(),
            &["main", "worker"],
        )
        .map_err(Failure::setup)
    }

    /// Confines the calling thread, and every thread it starts from then
    /// on, with the "main" filter; then ends the process cleanly on
    /// SIGTERM or SIGINT: `on_signal` runs (log counters, flush), the
    /// process says why and exits with status 0. The signals are blocked
    /// in this thread, so threads started later inherit the mask and only
    /// the waiter gets them.
    pub fn confine(
        self,
        seccomp: &tessera_seccomp::Filters,
        on_signal: impl FnOnce() + Send + 'static,
    ) -> Result<(), Failure> {
        seccomp.apply("main").map_err(Failure::runtime)?;
        let signals = termination_signals();
        signals
            .thread_block()
            .map_err(|err| Failure::runtime(format_args!("cannot block SIGTERM: {err}")))?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let name = signals.wait().map_or("a signal", Signal::as_str);
                on_signal();
                log::info!("{name}: exiting");
                std::process::exit(0);
            })
            .map_err(|err| Failure::runtime(format_args!("cannot wait for SIGTERM: {err}")))?;
        Ok(())
    }

    /// The vhost-user daemon that serves `device`.
    pub fn daemon<D: Device>(
        self,
        device: Arc<D>,
        mem: vm_memory::GuestMemoryAtomic<BackendMemory>,
    ) -> Result<VhostUserDaemon<Served<D>>, Failure> {
        VhostUserDaemon::new(self.name.into(), Served(device), mem)
            .map_err(|err| Failure::runtime(format_args!("cannot create the daemon: {err}")))
    }

    /// Serves the frontend `daemon` accepted (or was handed) until it
    /// disconnects, then runs `after` (stop the workers, log the counters,
    /// flush). `Ok` if the frontend hung up; a [`Failure::Runtime`] if the
    /// connection failed or `after` did.
    pub fn serve<T>(
        self,
        daemon: &mut VhostUserDaemon<T>,
        started: Result<(), vhost_user_backend::Error>,
        after: impl FnOnce() -> Result<(), Failure>,
    ) -> Result<(), Failure>
    where
        T: VhostUserBackend<
                Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion,
                Vring = BackendVring,
            > + Clone
            + 'static,
    {
        let served = match started {
            Err(err) => Err(Failure::runtime(format_args!(
                "cannot accept a frontend: {err}"
            ))),
            Ok(()) => match daemon.wait() {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected,
                )) => Ok(()),
                Err(err) => Err(Failure::runtime(format_args!(
                    "the vhost-user connection failed: {err}"
                ))),
            },
        };
        after()?;
        served?;
        self.announce("the frontend disconnected; exiting");
        Ok(())
    }
}

/// The signals that end a backend cleanly.
fn termination_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
}

/// A backend's `main`: parses its flags, starts logging as `name`, runs
/// `run` and turns its outcome into the exit status.
pub fn main<C: clap::Parser>(
    name: &'static str,
    run: impl FnOnce(Process, &C) -> Result<(), Failure>,
) -> ExitCode {
    let cli = C::parse();
    let process = Process::start(name);
    match run(process, &cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => process.exit(failure),
    }
}
