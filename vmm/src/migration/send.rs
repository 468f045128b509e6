//! The source of a live migration. A thread of its own sends guest memory
//! while the guest runs: all of it first, then, round by round, the pages
//! the dirty logs say were written since (KVM's for the vCPUs, the
//! backends' shared log for the devices), until what is left fits the
//! downtime at the measured bandwidth. Then it asks the VMM thread to stop
//! the guest (vCPUs paused, each backend's queues stopped once its requests
//! in flight are done) and hand over the state, sends the last pages and
//! the state, and waits for the destination's word. Until that word the
//! source owns the guest: on any failure or a cancel the VMM thread lets
//! it run on, with nothing lost.

use std::io::{BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::vhost_user::DirtyLog;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_config::{MigrationPhase, MigrationSendParams, MigrationStatus, MigrationUrl};
use vmm_sys_util::eventfd::EventFd;

use super::stream::{self, Message, StreamError, MAX_PAGES, PAGE};
use crate::snapshot::dirty::{self, DirtyPages};
use crate::vstate::vm::Vm;

/// Pre-copy rounds before the guest is stopped whatever is left.
const MAX_ROUNDS: u32 = 30;
/// How long the source waits for the destination's answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the thread waits for the VMM thread to stop the guest.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of a migration's source, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("{step}: {source}")]
    Stream {
        step: &'static str,
        source: StreamError,
    },
    #[error("the destination refused the microVM: {0}")]
    Refused(String),
    #[error("the destination failed to start the microVM: {0}")]
    DestinationFailed(String),
    #[error("{step}: the destination answered {answer:?}")]
    Unexpected { step: &'static str, answer: String },
    #[error("cannot read the dirty logs: {0}")]
    DirtyLog(String),
    #[error("cannot read guest memory at {addr:#x}: {reason}")]
    Memory { addr: u64, reason: String },
    #[error("the VMM could not stop the guest: {0}")]
    Stop(String),
    #[error("cancelled")]
    Cancelled,
}

/// What the migration thread asks of the VMM thread.
#[derive(Debug)]
pub enum ToVmm {
    /// Pause the guest, stop the devices' queues, hand over the state.
    Stop,
    /// The migration ended: the guest runs on the destination (`true`:
    /// this process ends), or it failed after `Stop` (`false`: run on).
    Finish { running_there: bool },
}

/// The VMM thread's answer to [`ToVmm::Stop`].
pub enum Stopped {
    /// The state file's bytes and the pages written since the last round.
    State {
        state: Vec<u8>,
        dirty: DirtyPages,
    },
    Failed(String),
}

/// What the thread needs of the running microVM.
pub struct Source {
    pub mem: GuestMemoryMmap,
    pub vm: Arc<Vm>,
    pub dirty_log: Option<Arc<DirtyLog>>,
    /// The `Hello` payload: the configuration and memory layout.
    pub hello: Vec<u8>,
    /// A page never touched holds zeros (see `Vmm::fresh_memory`): the
    /// first round need not read it.
    pub fresh_memory: bool,
}

/// The VMM thread's handle on an outgoing migration.
pub struct Outgoing {
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    requests: Receiver<ToVmm>,
    answers: Sender<Stopped>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Outgoing {
    /// Starts sending the microVM `source` describes as `params` say.
    pub fn start(source: Source, params: MigrationSendParams) -> std::io::Result<Self> {
        let status = Arc::new(Mutex::new(MigrationStatus {
            phase: MigrationPhase::Connecting,
            ..Default::default()
        }));
        let cancel = Arc::new(AtomicBool::new(false));
        let (request_tx, requests) = std::sync::mpsc::channel();
        let (answers, answer_rx) = std::sync::mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let sender = Sending {
            source,
            params,
            status: status.clone(),
            cancel: cancel.clone(),
            requests: request_tx,
            answers: answer_rx,
            wake: wake.try_clone()?,
            stopped_at: None,
        };
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || sender.run())?;
        Ok(Self {
            status,
            cancel,
            requests,
            answers,
            wake,
            thread: Some(thread),
        })
    }

    /// Wakes the VMM thread's event loop when the migration asks it
    /// something.
    pub fn wake_fd(&self) -> std::io::Result<EventFd> {
        self.wake.try_clone()
    }

    /// The next request of the migration thread, if one waits.
    pub fn next_request(&self) -> Option<ToVmm> {
        self.requests.try_recv().ok()
    }

    /// Answers [`ToVmm::Stop`].
    pub fn answer(&self, stopped: Stopped) {
        let _ = self.answers.send(stopped);
    }

    pub fn status(&self) -> MigrationStatus {
        lock(&self.status).clone()
    }

    /// Whether it still runs.
    pub fn is_running(&self) -> bool {
        !matches!(
            lock(&self.status).phase,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }

    /// `PUT /migration/cancel`: the thread stops at its next step, unless
    /// the guest already stopped for the last one.
    pub fn cancel(&self) -> bool {
        if lock(&self.status).phase == MigrationPhase::Downtime {
            return false;
        }
        self.cancel.store(true, Ordering::Release);
        true
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection to the destination.
trait Connection: Read + Write + Send {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl Connection for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Connection for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

fn connect(url: &MigrationUrl) -> Result<Box<dyn Connection>, SendError> {
    let failed = |source| SendError::Connect {
        url: url.to_string(),
        source,
    };
    Ok(match url {
        MigrationUrl::Unix(path) => Box::new(UnixStream::connect(path).map_err(failed)?),
        MigrationUrl::Tcp(addr) => {
            let stream = std::net::TcpStream::connect(addr).map_err(failed)?;
            stream.set_nodelay(true).map_err(failed)?;
            Box::new(stream)
        }
    })
}

/// The migration thread.
struct Sending {
    source: Source,
    params: MigrationSendParams,
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    requests: Sender<ToVmm>,
    answers: Receiver<Stopped>,
    wake: EventFd,
    /// When the VMM thread was asked to stop the guest.
    stopped_at: Option<Instant>,
}

impl Sending {
    fn run(mut self) {
        let outcome = self.migrate();
        let running_there = outcome.is_ok();
        {
            let mut status = lock(&self.status);
            match &outcome {
                Ok(()) => status.phase = MigrationPhase::Completed,
                Err(SendError::Cancelled) => status.phase = MigrationPhase::Cancelled,
                Err(err) => {
                    status.phase = MigrationPhase::Failed;
                    status.error = Some(err.to_string());
                }
            }
        }
        match &outcome {
            Ok(()) => log::info!("migration: the microVM runs on the destination"),
            Err(err) => log::error!("migration failed; the microVM runs on here: {err}"),
        }
        if self.stopped_at.is_some() || running_there {
            self.ask(ToVmm::Finish { running_there });
        }
    }

    fn ask(&self, request: ToVmm) {
        let _ = self.requests.send(request);
        let _ = self.wake.write(1);
    }

    fn check_cancel(&self) -> Result<(), SendError> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(SendError::Cancelled);
        }
        Ok(())
    }

    fn migrate(&mut self) -> Result<(), SendError> {
        let stream_err = |step| move |source| SendError::Stream { step, source };
        let mut connection = connect(&self.params.destination)?;
        connection
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| stream_err("set a timeout")(e.into()))?;
        stream::write_preamble(&mut connection)
            .map_err(|e| stream_err("send the preamble")(e.into()))?;
        stream::write_message(&mut connection, &Message::Hello(self.source.hello.clone()))
            .map_err(|e| stream_err("send the configuration")(e.into()))?;
        match stream::read_message(&mut connection)
            .map_err(stream_err("wait for the destination"))?
        {
            Message::Accept => {}
            Message::Refuse(reason) => return Err(SendError::Refused(reason)),
            other => {
                return Err(SendError::Unexpected {
                    step: "the configuration",
                    answer: format!("{other:?}"),
                })
            }
        }
        lock(&self.status).phase = MigrationPhase::PreCopy;
        let mut out = Paced::new(BufWriter::with_capacity(1 << 20, connection), &self.params);
        // From here on the logs hold what the rounds must send again.
        self.take_dirty()?;
        let mut pending = DirtyPages::all(&self.source.mem);
        // A page never touched holds zeros, unless guest memory came from
        // a snapshot's memory file: the first round need not read it.
        let mut resident = if self.source.fresh_memory {
            Some(
                dirty::resident(&self.source.mem)
                    .map_err(|e| SendError::DirtyLog(e.to_string()))?,
            )
        } else {
            None
        };
        let max_downtime = Duration::from_millis(self.params.max_downtime_ms);
        loop {
            self.check_cancel()?;
            let round_started = Instant::now();
            let sent_before = out.sent;
            self.send_pages(&mut out, &pending, resident.take().as_ref())?;
            // The round ends when the destination has it all in guest
            // memory: nothing of it is left in the socket for the pause.
            stream::write_message(&mut out, &Message::Sync)
                .and_then(|()| out.flush())
                .map_err(|e| stream_err("send guest memory")(e.into()))?;
            match stream::read_message(out.inner.get_mut())
                .map_err(stream_err("wait for the round to land"))?
            {
                Message::Synced => {}
                other => {
                    return Err(SendError::Unexpected {
                        step: "a round",
                        answer: format!("{other:?}"),
                    })
                }
            }
            let elapsed = round_started.elapsed().max(Duration::from_millis(1));
            let rate = (out.sent - sent_before) as f64 / elapsed.as_secs_f64();
            pending = self.take_dirty()?;
            let left = pending.count();
            let expected = Duration::from_secs_f64((left * PAGE) as f64 / rate.max(1.0));
            let round = {
                let mut status = lock(&self.status);
                status.round += 1;
                status.bytes_sent = out.sent;
                status.pages_left = left;
                status.dirty_pages_per_s = (left as f64 / elapsed.as_secs_f64()) as u64;
                status.expected_downtime_ms = expected.as_millis() as u64;
                status.round
            };
            log::info!(
                "migration round {round}: {:.1} MiB sent in {elapsed:?}, {left} pages dirtied \
                 meanwhile, {} ms expected downtime",
                (out.sent - sent_before) as f64 / f64::from(1 << 20),
                expected.as_millis()
            );
            if expected <= max_downtime || round >= MAX_ROUNDS {
                break;
            }
        }
        self.check_cancel()?;
        let (state, dirty) = self.stop_guest()?;
        pending.merge(&dirty);
        self.send_pages(&mut out, &pending, None)?;
        stream::write_message(&mut out, &Message::State(state))
            .and_then(|()| out.flush())
            .map_err(|e| stream_err("send the state")(e.into()))?;
        lock(&self.status).bytes_sent = out.sent;
        let mut connection = out
            .into_inner()
            .map_err(|e| stream_err("send the state")(e.into()))?;
        match stream::read_message(&mut connection)
            .map_err(stream_err("wait for the destination to run the microVM"))?
        {
            Message::Running => {
                let downtime = self.stopped_at.map(|t| t.elapsed().as_millis() as u64);
                let mut status = lock(&self.status);
                status.downtime_ms = downtime;
                log::info!(
                    "migration done: {:.1} MiB in {} rounds, {} ms from the pause to the \
                     destination's word",
                    status.bytes_sent as f64 / f64::from(1 << 20),
                    status.round,
                    downtime.unwrap_or(0)
                );
                Ok(())
            }
            Message::Failed(reason) => Err(SendError::DestinationFailed(reason)),
            other => Err(SendError::Unexpected {
                step: "the state",
                answer: format!("{other:?}"),
            }),
        }
    }

    /// Asks the VMM thread to stop the guest; returns its state and the
    /// pages written since the last round.
    fn stop_guest(&mut self) -> Result<(Vec<u8>, DirtyPages), SendError> {
        lock(&self.status).phase = MigrationPhase::Downtime;
        self.stopped_at = Some(Instant::now());
        self.ask(ToVmm::Stop);
        match self.answers.recv_timeout(STOP_TIMEOUT) {
            Ok(Stopped::State { state, dirty }) => {
                let mut all = self.take_dirty()?;
                all.merge(&dirty);
                Ok((state, all))
            }
            Ok(Stopped::Failed(reason)) => Err(SendError::Stop(reason)),
            Err(RecvTimeoutError::Timeout) => Err(SendError::Stop("no answer in time".into())),
            Err(RecvTimeoutError::Disconnected) => {
                Err(SendError::Stop("the VMM thread is gone".into()))
            }
        }
    }

    fn take_dirty(&self) -> Result<DirtyPages, SendError> {
        dirty::take_tracked(
            &self.source.vm,
            &self.source.mem,
            self.source.dirty_log.as_deref(),
        )
        .map_err(|e| SendError::DirtyLog(e.to_string()))
    }

    /// Sends the `pages` of guest memory: pages of zeros as `Zeros`, the
    /// others as `Pages`. A page that is not `resident` (if given) is
    /// zeros without a look.
    fn send_pages(
        &self,
        out: &mut Paced<impl Write>,
        pages: &DirtyPages,
        resident: Option<&DirtyPages>,
    ) -> Result<(), SendError> {
        let mem = &self.source.mem;
        let mut batch = Batch::default();
        for (index, region) in mem.iter().enumerate() {
            let start = region.start_addr().0;
            for (first, count) in pages.runs(index, region.len() / PAGE) {
                for page in first..first + count {
                    if page % u64::from(MAX_PAGES) == 0 {
                        self.check_cancel()?;
                    }
                    let addr = start + page * PAGE;
                    if resident.is_some_and(|r| !r.is_marked(index, page)) {
                        batch.add(out, addr, None)?;
                        continue;
                    }
                    let mut buf = [0u8; PAGE as usize];
                    mem.read_slice(&mut buf, GuestAddress(addr)).map_err(|e| {
                        SendError::Memory {
                            addr,
                            reason: e.to_string(),
                        }
                    })?;
                    batch.add(out, addr, Some(&buf))?;
                }
                batch.flush(out)?;
                self.check_cancel()?;
            }
        }
        batch.flush(out)
    }
}

/// Consecutive pages waiting to go as one message.
#[derive(Default)]
struct Batch {
    addr: u64,
    zeros: bool,
    pages: u32,
    data: Vec<u8>,
}

impl Batch {
    /// Adds the page at `addr`: its bytes, or `None` for a page of zeros.
    fn add(
        &mut self,
        out: &mut Paced<impl Write>,
        addr: u64,
        page: Option<&[u8]>,
    ) -> Result<(), SendError> {
        let page = page.filter(|p| p.iter().any(|&b| b != 0));
        let zeros = page.is_none();
        let follows = self.pages > 0
            && self.zeros == zeros
            && addr == self.addr + u64::from(self.pages) * PAGE
            && self.pages < MAX_PAGES;
        if !follows {
            self.flush(out)?;
            self.addr = addr;
            self.zeros = zeros;
        }
        self.pages += 1;
        if let Some(page) = page {
            self.data.extend_from_slice(page);
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut Paced<impl Write>) -> Result<(), SendError> {
        if self.pages == 0 {
            return Ok(());
        }
        let (addr, pages) = (self.addr, self.pages);
        let message = if self.zeros {
            Message::Zeros { addr, pages }
        } else {
            Message::Pages { addr, pages }
        };
        stream::write_message(out, &message)
            .and_then(|()| out.write_all(&self.data))
            .map_err(|e| SendError::Stream {
                step: "send guest memory",
                source: e.into(),
            })?;
        self.pages = 0;
        self.data.clear();
        Ok(())
    }
}

/// A writer that counts what it sends and keeps under the bandwidth cap.
struct Paced<W: Write> {
    inner: W,
    sent: u64,
    started: Instant,
    bytes_per_s: Option<f64>,
}

impl<W: Write> Paced<W> {
    fn new(inner: W, params: &MigrationSendParams) -> Self {
        Self {
            inner,
            sent: 0,
            started: Instant::now(),
            bytes_per_s: params
                .max_bandwidth_mib_s
                .filter(|&m| m > 0)
                .map(|m| (m << 20) as f64),
        }
    }
}

impl<W: Write> Paced<BufWriter<W>> {
    fn into_inner(self) -> std::io::Result<W> {
        self.inner.into_inner().map_err(|e| e.into_error())
    }
}

impl<W: Write> Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(rate) = self.bytes_per_s {
            let due = Duration::from_secs_f64(self.sent as f64 / rate);
            if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        let n = self.inner.write(buf)?;
        self.sent += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
