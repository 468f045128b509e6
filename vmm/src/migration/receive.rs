//! The destination of a live migration, in a fresh process: it listens,
//! takes one source, checks the configuration the source sends (and says
//! no before the source stops its guest), writes each page that arrives
//! into new guest memory, and, with the state, builds the microVM as a
//! snapshot load does (fresh backends take the devices' queues over) and
//! starts it. The source hears `Running` only once the vCPUs run here.
//!
//! Everything in the stream is checked: its framing (`stream.rs`), every
//! page range against guest memory, the state file's checksum and the
//! state against the configuration.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_config::{MigrationReceiveParams, MigrationUrl};

use super::stream::{self, Message, StreamError, MAX_PAGES, PAGE};
use super::Hello;
use crate::builder::{self, BootOptions};
use crate::resources::VmResources;
use crate::runtime::Vmm;
use crate::snapshot::load::{self, LoadSnapshotError, Overrides, Start};
use crate::snapshot::{file, MicrovmState};

/// How long the destination waits for the next message once the source
/// connected.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of a migration's destination, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot listen on {url}: {source}")]
    Listen { url: String, source: std::io::Error },
    #[error("{step}: {source}")]
    Stream {
        step: &'static str,
        source: StreamError,
    },
    #[error("the source's configuration is refused: {0}")]
    Refused(String),
    #[error("the source gave up: {0}")]
    Aborted(String),
    #[error("{0} pages at {1:#x} lie outside guest memory")]
    PagesOutside(u32, u64),
    #[error("the source sent {0} where guest memory or the state was expected")]
    Unexpected(String),
    #[error("the state does not decode: {0}")]
    State(#[from] file::StateFileError),
    #[error("{0}")]
    Build(#[from] LoadSnapshotError),
}

/// A connection from the source.
trait Connection: Read + std::io::Write + Send {}
impl Connection for std::os::unix::net::UnixStream {}
impl Connection for std::net::TcpStream {}

/// Waits for the source on `url` and takes its connection.
fn accept(url: &MigrationUrl) -> Result<Box<dyn Connection>, ReceiveError> {
    let failed = |source| ReceiveError::Listen {
        url: url.to_string(),
        source,
    };
    Ok(match url {
        MigrationUrl::Unix(path) => {
            let listener = UnixListener::bind(path).map_err(failed)?;
            let accepted = listener.accept().map_err(failed);
            // One source only: the path goes with the listener.
            let _ = std::fs::remove_file(path);
            let (stream, _) = accepted?;
            stream
                .set_read_timeout(Some(READ_TIMEOUT))
                .map_err(failed)?;
            Box::new(stream)
        }
        MigrationUrl::Tcp(addr) => {
            let listener = std::net::TcpListener::bind(addr).map_err(failed)?;
            let (stream, _) = listener.accept().map_err(failed)?;
            stream
                .set_read_timeout(Some(READ_TIMEOUT))
                .map_err(failed)?;
            stream.set_nodelay(true).map_err(failed)?;
            Box::new(stream)
        }
    })
}

fn stream_err(step: &'static str) -> impl FnOnce(StreamError) -> ReceiveError {
    move |source| ReceiveError::Stream { step, source }
}

/// `PUT /migration/receive`: takes a microVM from a source and runs it.
/// `current` is what this process was given before (logger, metrics,
/// serial output), as for a snapshot load.
pub fn receive_microvm(
    params: &MigrationReceiveParams,
    options: &BootOptions,
    current: &VmResources,
) -> Result<Vmm, ReceiveError> {
    log::info!("migration: waiting for a source on {}", params.listen);
    let mut connection = accept(&params.listen)?;
    stream::read_preamble(&mut connection).map_err(stream_err("read the preamble"))?;
    let hello = match stream::read_message(&mut connection)
        .map_err(stream_err("read the configuration"))?
    {
        Message::Hello(json) => json,
        other => return Err(ReceiveError::Unexpected(format!("{other:?}"))),
    };
    let checked = check_hello(&hello, params, current).and_then(|(resources, memory)| {
        let mem = builder::create_guest_memory(&resources, false)
            .map_err(|err| format!("cannot create guest memory: {err}"))?;
        Ok((resources, memory, mem))
    });
    let (resources, memory, mem) = match checked {
        Ok(checked) => checked,
        Err(reason) => {
            let _ = stream::write_message(&mut connection, &Message::Refuse(reason.clone()));
            return Err(ReceiveError::Refused(reason));
        }
    };
    stream::write_message(&mut connection, &Message::Accept)
        .map_err(|e| stream_err("accept the source")(e.into()))?;
    log::info!(
        "migration: receiving {} MiB of guest memory",
        resources.machine_config.mem_size_mib
    );
    let state = receive_memory(connection.as_mut(), &mem)?;
    let state: MicrovmState = file::decode(&state, "the migration stream")?;
    let started = load::assemble(
        state,
        resources,
        (mem, None),
        &memory,
        options,
        Start {
            resume_vm: true,
            clock_realtime: false,
            fresh_memory: true,
        },
    );
    match started {
        Ok(vmm) => {
            stream::write_message(&mut connection, &Message::Running)
                .map_err(|e| stream_err("say the microVM runs")(e.into()))?;
            log::info!("migration: the microVM runs here");
            vmm.announce_guest();
            Ok(vmm)
        }
        Err(err) => {
            let _ = stream::write_message(&mut connection, &Message::Failed(err.to_string()));
            Err(err.into())
        }
    }
}

/// The configuration with this side's overrides, and the memory layout,
/// if this host can run it.
fn check_hello(
    json: &[u8],
    params: &MigrationReceiveParams,
    current: &VmResources,
) -> Result<(VmResources, Vec<(u64, u64)>), String> {
    let hello: Hello =
        serde_json::from_slice(json).map_err(|err| format!("the configuration: {err}"))?;
    let overrides = Overrides {
        network: &params.network_overrides,
        drives: &params.drive_overrides,
        vsock: params.vsock_override.as_ref(),
    };
    let mut resources =
        load::resources_from_config(&hello.config, &overrides).map_err(|e| e.to_string())?;
    resources.logger.clone_from(&current.logger);
    resources.metrics.clone_from(&current.metrics);
    resources.serial.clone_from(&current.serial);
    // The stream carries no MMDS store: the destination's own serves.
    resources.mmds.clone_from(&current.mmds);
    let expected =
        crate::arch::layout::ram_regions((resources.machine_config.mem_size_mib as u64) << 20);
    if hello.memory != expected {
        return Err(format!(
            "its memory layout {:x?} is not the one of its machine configuration, {expected:x?}",
            hello.memory
        ));
    }
    let kvm = builder::open_kvm(resources.machine_config.vcpu_count).map_err(|e| e.to_string())?;
    let host_cpu =
        builder::host_cpu_features(&kvm, &resources.machine_config).map_err(|e| e.to_string())?;
    hello
        .cpu
        .check_runs_on(&host_cpu)
        .map_err(|e| e.to_string())?;
    Ok((resources, hello.memory))
}

/// Writes the pages that arrive into `mem` until the state comes; returns
/// the state's bytes. New guest memory holds zeros: a `Zeros` message
/// writes only over pages an earlier message filled (so that an idle
/// guest's memory is not touched here at all).
fn receive_memory(
    connection: &mut dyn Connection,
    mem: &GuestMemoryMmap,
) -> Result<Vec<u8>, ReceiveError> {
    let mut buf = vec![0u8; (u64::from(MAX_PAGES) * PAGE) as usize];
    let mut filled = Filled::new(mem);
    loop {
        match stream::read_message(&mut *connection).map_err(stream_err("receive guest memory"))? {
            Message::Pages { addr, pages } => {
                let len = (u64::from(pages) * PAGE) as usize;
                check_range(mem, addr, pages)?;
                connection
                    .read_exact(&mut buf[..len])
                    .map_err(|e| stream_err("receive guest memory")(e.into()))?;
                mem.write_slice(&buf[..len], GuestAddress(addr))
                    .map_err(|_| ReceiveError::PagesOutside(pages, addr))?;
                filled.mark(addr, pages);
            }
            Message::Zeros { addr, pages } => {
                check_range(mem, addr, pages)?;
                for page in 0..u64::from(pages) {
                    let at = addr + page * PAGE;
                    if filled.take(at) {
                        mem.write_slice(&[0u8; PAGE as usize], GuestAddress(at))
                            .map_err(|_| ReceiveError::PagesOutside(pages, addr))?;
                    }
                }
            }
            Message::Sync => stream::write_message(&mut *connection, &Message::Synced)
                .map_err(|e| stream_err("acknowledge a round")(e.into()))?,
            Message::State(state) => return Ok(state),
            Message::Abort(reason) => return Err(ReceiveError::Aborted(reason)),
            other => return Err(ReceiveError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// Which pages of guest memory a `Pages` message filled, by guest page
/// number (32 KiB for a 1 GiB guest).
struct Filled(Vec<u64>);

impl Filled {
    fn new(mem: &GuestMemoryMmap) -> Self {
        let end = mem.last_addr().0 / PAGE + 1;
        Self(vec![0; end.div_ceil(64) as usize])
    }

    fn mark(&mut self, addr: u64, pages: u32) {
        for page in addr / PAGE..addr / PAGE + u64::from(pages) {
            if let Some(word) = self.0.get_mut((page / 64) as usize) {
                *word |= 1 << (page % 64);
            }
        }
    }

    /// Whether the page at `addr` was filled; it no longer is.
    fn take(&mut self, addr: u64) -> bool {
        let page = addr / PAGE;
        self.0.get_mut((page / 64) as usize).is_some_and(|word| {
            let was = *word & (1 << (page % 64)) != 0;
            *word &= !(1 << (page % 64));
            was
        })
    }
}

/// `pages` pages at `addr` lie in one region of guest memory, page-aligned.
fn check_range(mem: &GuestMemoryMmap, addr: u64, pages: u32) -> Result<(), ReceiveError> {
    let len = u64::from(pages) * PAGE;
    let inside = addr.is_multiple_of(PAGE)
        && addr
            .checked_add(len)
            .is_some_and(|_| mem.get_slice(GuestAddress(addr), len as usize).is_ok());
    if inside {
        Ok(())
    } else {
        Err(ReceiveError::PagesOutside(pages, addr))
    }
}
