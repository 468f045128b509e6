//! Shared harness for the integration tests and the benchmark: finds the
//! built binaries and guest artifacts, writes VM configuration files, runs
//! `tessera` with a deadline and parses what the guest printed.

pub mod api;
pub mod blkio_client;
pub mod console;
pub mod fleet;
pub mod jail;
pub mod journal;
pub mod nested;
pub mod netns;
pub mod vsock;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A binary built from this workspace, next to the running test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` in the same profile",
        bin.display()
    );
    bin
}

/// The guest artifacts built by `resources/build-guest.sh`.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub dir: PathBuf,
}

impl GuestArtifacts {
    pub fn probe(&self) -> PathBuf {
        self.file("probe-guest.elf")
    }
    pub fn vmlinux(&self) -> PathBuf {
        self.file("vmlinux")
    }
    pub fn bzimage(&self) -> PathBuf {
        self.file("bzImage")
    }
    pub fn initramfs(&self) -> PathBuf {
        self.file("initramfs.cpio.gz")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.file("rootfs.ext4")
    }
    fn file(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        assert!(
            path.exists(),
            "guest artifact {} is missing",
            path.display()
        );
        path
    }
}

/// The guest artifacts: `$TESSERA_GUEST_DIR`, or built (and cached) by
/// running `resources/build-guest.sh` once per test process.
pub fn guest_artifacts() -> &'static GuestArtifacts {
    static ARTIFACTS: OnceLock<GuestArtifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TESSERA_GUEST_DIR") {
            return GuestArtifacts { dir: dir.into() };
        }
        eprintln!("TESSERA_GUEST_DIR is not set: running resources/build-guest.sh");
        GuestArtifacts {
            dir: run_build_script("resources/build-guest.sh", &[]),
        }
    })
}

/// Runs one of the repository's artifact scripts (progress on stderr, the
/// output directory as the last stdout line) and returns that directory.
pub fn run_build_script(script: &str, envs: &[(&str, &Path)]) -> PathBuf {
    let mut command = Command::new(repo_root().join(script));
    for (key, value) in envs {
        command.env(key, value);
    }
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {script}: {err}"));
    assert!(out.status.success(), "{script} failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("{script} printed no output directory"));
    PathBuf::from(dir.trim())
}

/// A new sparse file of `len` bytes at `path` (a disk or memory file for
/// a test); returns the path.
pub fn sparse_file(path: &Path, len: u64) -> PathBuf {
    std::fs::File::create(path)
        .and_then(|file| file.set_len(len))
        .unwrap_or_else(|err| panic!("cannot make {}: {err}", path.display()));
    path.to_path_buf()
}

/// Waits until `path` exists (a socket a process is about to create).
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Waits until a Unix socket listens at `path` (in this network
/// namespace). The path appears at bind(), just before listen(): a client
/// that connects in between is refused.
pub fn wait_for_listener(path: &Path, timeout: Duration) -> bool {
    /// `__SO_ACCEPTCON` in /proc/net/unix's Flags column: listening.
    const ACCEPTCON: u32 = 1 << 16;
    let Some(wanted) = path.to_str() else {
        return false;
    };
    let listening = || {
        std::fs::read_to_string("/proc/net/unix").is_ok_and(|table| {
            table.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(7) == Some(&wanted)
                    && fields
                        .get(3)
                        .and_then(|flags| u32::from_str_radix(flags, 16).ok())
                        .is_some_and(|flags| flags & ACCEPTCON != 0)
            })
        })
    };
    let deadline = Instant::now() + timeout;
    while !listening() {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Whether `out` holds a whole line (newline included) that starts with
/// `prefix`: output is read as it comes, so a line may be cut short.
pub fn has_line(out: &str, prefix: &str) -> bool {
    out.split_inclusive('\n')
        .any(|line| line.ends_with('\n') && line.trim_start_matches('\r').starts_with(prefix))
}

/// Whether the host CPU has hardware virtualization (Intel VT-x or AMD-V).
pub fn host_has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// A VM configuration in Firecracker's config-file schema.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    pub smt: bool,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>, boot_args: &str) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            boot_args: boot_args.to_string(),
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
        }
    }

    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpu_count = n;
        self
    }

    pub fn mem_mib(mut self, mib: usize) -> Self {
        self.mem_size_mib = mib;
        self
    }

    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut boot = serde_json::json!({
            "kernel_image_path": self.kernel,
            "boot_args": self.boot_args,
        });
        if let Some(initrd) = &self.initrd {
            boot["initrd_path"] = serde_json::json!(initrd);
        }
        serde_json::json!({
            "boot-source": boot,
            "machine-config": {
                "vcpu_count": self.vcpu_count,
                "mem_size_mib": self.mem_size_mib,
                "smt": self.smt,
            }
        })
    }
}

/// The result of one `tessera` run.
#[derive(Debug)]
pub struct RunOutput {
    /// None when the run was killed at its deadline or by `stop_when`.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub pid: u32,
}

impl RunOutput {
    /// The `probe.<key>=<value>` lines the probe guest printed, by key
    /// (`probe.done` has an empty value).
    pub fn probe_report(&self) -> BTreeMap<String, String> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("probe."))
            .map(|l| l.split_once('=').unwrap_or((l, "")))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The exit code, panicking with the output when the run did not exit.
    pub fn code(&self) -> i32 {
        match self.status {
            Some(status) => status.code().unwrap_or_else(|| {
                panic!(
                    "tessera died from a signal: {status:?}\n{}",
                    self.describe()
                )
            }),
            None => panic!("tessera did not exit in time\n{}", self.describe()),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

fn drain<R: Read + Send + 'static>(
    mut source: R,
    sink: Arc<Mutex<Vec<u8>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = source.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

/// A spawned process whose stdout and stderr are collected in the background.
pub struct Running {
    child: Child,
    start: Instant,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Running {
    /// Spawns `command` with stdin closed and output captured.
    pub fn spawn(command: Command) -> Self {
        Self::spawn_with_stdin(command, Stdio::null())
    }

    /// Spawns `command` with the given stdin and output captured.
    pub fn spawn_with_stdin(mut command: Command, stdin: Stdio) -> Self {
        let start = Instant::now();
        // A harness that aborts (the bench is built with panic = "abort",
        // so no Drop runs) must not leave its VMs running: the child dies
        // with the thread that started it.
        // SAFETY: prctl is async-signal-safe and touches no memory.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the command");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            drain(child.stdout.take().unwrap(), out.clone()),
            drain(child.stderr.take().unwrap(), err.clone()),
        ];
        Self {
            child,
            start,
            out,
            err,
            readers,
        }
    }

    /// Time since the process was spawned.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until the process exits, `deadline` (from spawn) passes, or
    /// `stop_when(stdout, stderr)` holds. Returns true if the process exited.
    pub fn wait_until(
        &mut self,
        deadline: Duration,
        stop_when: impl Fn(&str, &str) -> bool,
    ) -> bool {
        loop {
            if self.child.try_wait().expect("wait").is_some() {
                return true;
            }
            if self.start.elapsed() > deadline || stop_when(&self.stdout(), &self.stderr()) {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the process if it still runs and returns what it printed.
    pub fn finish(mut self) -> RunOutput {
        let status = match self.child.try_wait().expect("wait") {
            Some(status) => Some(status),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                None
            }
        };
        let elapsed = self.start.elapsed();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        RunOutput {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed,
            pid: self.child.id(),
        }
    }
}

impl Drop for Running {
    /// A test that fails half-way must not leave its VM running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `command` until it exits, `deadline` passes, or `stop_when` returns
/// true for the output so far (stdout, stderr); the process is then killed.
pub fn run_with_deadline(
    command: Command,
    deadline: Duration,
    stop_when: impl Fn(&str, &str) -> bool,
) -> RunOutput {
    let mut running = Running::spawn(command);
    running.wait_until(deadline, stop_when);
    running.finish()
}

/// A `tessera --no-api --config-file` command for `config`. The config
/// file lives in `dir`, which must outlive the run.
pub fn tessera_command(config: &VmConfig, dir: &Path, extra_args: &[&str]) -> Command {
    let path = dir.join("vm-config.json");
    std::fs::write(&path, config.to_json().to_string()).expect("write config");
    let mut command = Command::new(workspace_bin("tessera"));
    command
        .arg("--no-api")
        .arg("--config-file")
        .arg(&path)
        .args(extra_args);
    command
}

/// Boots `config` and waits for tessera to exit by itself.
pub fn boot(config: &VmConfig, extra_args: &[&str], deadline: Duration) -> RunOutput {
    let dir = tempfile::tempdir().expect("tempdir");
    run_with_deadline(
        tessera_command(config, dir.path(), extra_args),
        deadline,
        |_, _| false,
    )
}

/// The kernel command line for the probe guest.
pub fn probe_cmdline(extra: &str) -> String {
    format!("console=ttyS0 {extra}").trim().to_string()
}

/// The parent of process `pid`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|ppid| ppid.parse().ok())
}

/// The first process for which `wanted(pid, command line)` holds (the
/// command line's NULs as spaces), waiting up to 10 s for one to appear.
fn find_process(wanted: impl Fn(u32, &str) -> bool) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if wanted(pid, &String::from_utf8_lossy(&cmdline).replace('\0', " ")) {
                return Some(pid);
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The pid of a child of `parent` whose command line contains `needle`,
/// waiting up to 10 s for it to appear.
pub fn child_pid(parent: u32, needle: &str) -> Option<u32> {
    find_process(|pid, cmdline| parent_of(pid) == Some(parent) && cmdline.contains(needle))
}

/// The pid of a process below `ancestor` (a child, or a child's child: a
/// VMM's backends are children of its backend starter) whose command line
/// contains `needle`; waits up to 10 s for it to appear.
pub fn descendant_pid(ancestor: u32, needle: &str) -> Option<u32> {
    find_process(|pid, cmdline| {
        let below = parent_of(pid)
            .is_some_and(|parent| parent == ancestor || parent_of(parent) == Some(ancestor));
        below && cmdline.contains(needle) && !cmdline.contains("--backend-starter")
    })
}

/// Whether a test that needs something a host may lack can run here: true
/// when `available`. Otherwise the test fails under `TESSERA_STRICT=1`;
/// without it, it prints `not run: <why>` and the caller returns (so a
/// host without root, QEMU or cgroup v2 runs the rest).
pub fn can_run(available: bool, why: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        std::env::var("TESSERA_STRICT").as_deref() != Ok("1"),
        "TESSERA_STRICT=1 and this test cannot run: {why}"
    );
    eprintln!("not run: {why}");
    false
}
