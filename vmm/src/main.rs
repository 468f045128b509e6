//! The `tessera` binary: parses the command line, sets up logging and the
//! API socket, builds the microVM (from `--config-file` at once, or on the
//! API's `InstanceStart`) and runs it until the guest ends.

use std::path::{Path, PathBuf};
use std::process;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_server::server::DEFAULT_MAX_PAYLOAD_SIZE;
use api_server::ApiServer;
use clap::Parser;
use vmm::metrics::{self, metrics};
use vmm::resources::VmResources;
use vmm::rpc_interface::{apply_observability, run_preboot, ApiEndpoint, RuntimeWork};
use vmm::{build_microvm, logger, BootOptions, ExitCode};

/// The filters compiled from resources/seccomp/tessera.json.
const SECCOMP_FILTERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bpf"));

/// Firecracker's default API socket, for drop-in use.
const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// Tessera: a microVM monitor, command-line compatible with Firecracker.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, about)]
struct Cli {
    /// Path of the API Unix socket (default: /run/firecracker.socket).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Boot at once from a Firecracker-style JSON configuration file.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run without the API socket; needs --config-file.
    #[arg(long, conflicts_with = "api_sock")]
    no_api: bool,
    /// Log `Guest-boot-time` when the guest writes 123 to 0xd0000000.
    #[arg(long)]
    boot_timer: bool,
    /// Every virtio device on PCI with MSI-X instead of virtio-mmio
    /// (Firecracker's flag and help text).
    #[arg(long, help = "Enables PCIe support.")]
    enable_pci: bool,
    /// Instance id, shown in every log line and by `GET /`.
    #[arg(long, default_value = "anonymous-instance", value_name = "ID")]
    id: String,
    /// Append log lines to this file or FIFO instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Log level: Off, Error, Warning, Info, Debug or Trace.
    #[arg(long, default_value = "Info", value_name = "LEVEL")]
    level: String,
    /// Write metrics as JSON lines to this file or FIFO.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// The largest API request body accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_PAYLOAD_SIZE, value_name = "N")]
    http_api_max_payload_size: usize,
    /// The largest metadata store (`/mmds`), in bytes, as compact JSON
    /// (default: --http-api-max-payload-size).
    #[arg(long, value_name = "N")]
    mmds_size_limit: Option<usize>,
    /// A JSON file the metadata store starts with.
    #[arg(long, value_name = "PATH")]
    metadata: Option<PathBuf>,
    /// Write the guest console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    serial_out: Option<PathBuf>,
    /// The vhost-user-blk binary started for drives with `path_on_host`
    /// (default: the one next to this executable).
    #[arg(long, value_name = "PATH")]
    vhost_user_blk_bin: Option<PathBuf>,
    /// The vhost-user-net binary started for interfaces with
    /// `host_dev_name` (default: the one next to this executable).
    #[arg(long, value_name = "PATH")]
    vhost_user_net_bin: Option<PathBuf>,
    /// The vhost-user-vsock binary started for the vsock device (default:
    /// the one next to this executable).
    #[arg(long, value_name = "PATH")]
    vhost_user_vsock_bin: Option<PathBuf>,
    /// Set by the jailer: wall-clock start of the jailer, in microseconds.
    #[arg(long, value_name = "US", hide = true)]
    start_time_us: Option<u64>,
    /// Set by the jailer: the jailer's CPU time at exec, in microseconds.
    #[arg(long, value_name = "US", hide = true)]
    start_time_cpu_us: Option<u64>,
    /// Set by the jailer: the CPU time of the jailer's parent, in microseconds.
    #[arg(long, value_name = "US", hide = true)]
    parent_cpu_time_us: Option<u64>,
    /// Set by the jailer: the socket on which it starts jailed device
    /// backends for this VMM.
    #[arg(long, value_name = "FD")]
    backend_launcher_fd: Option<tessera_types::InheritedFd>,
    /// Internal: run as the backend starter for this backend binary (see
    /// `device_manager::backend_starter`).
    #[arg(long, value_name = "PATH", hide = true)]
    backend_starter: Option<PathBuf>,
    /// Run without seccomp filters (for debugging only).
    #[arg(long, conflicts_with = "seccomp_filter")]
    no_seccomp: bool,
    /// Load the seccomp filters from this JSON file instead of the built-in ones.
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
}

/// Reports a fatal error on stderr (and in the log file, if there is one)
/// and exits with `code`.
fn fail(code: ExitCode, message: impl std::fmt::Display) -> ! {
    eprintln!("tessera: {message}");
    log::logger().flush();
    process::exit(code as i32);
}

fn main() {
    // Boot time is measured from here, as close to process start as we get.
    let start_wall = Instant::now();
    let start_cpu = devices::pseudo::process_cpu_time();
    let cli = parse_cli();
    if let Some(binary) = cli.backend_starter {
        process::exit(vmm::device_manager::backend_starter::run(
            binary,
            cli.no_seccomp,
        ));
    }
    let start_wall = jailer_start(cli.start_time_us).unwrap_or(start_wall);
    start_logging(&cli);
    let mut resources = initial_resources(&cli);
    let seccomp = Arc::new(
        tessera_seccomp::load(
            SECCOMP_FILTERS,
            cli.no_seccomp,
            cli.seccomp_filter.as_deref(),
            &["vmm", "api", "vcpu"],
        )
        .unwrap_or_else(|err| fail(ExitCode::ArgParsing, err)),
    );
    let api = (!cli.no_api).then(|| start_api(&cli, &seccomp, start_wall, start_cpu));
    let sock = api.as_ref().map(|(_, sock)| sock.clone());
    let options = boot_options(&cli, sock.as_deref(), seccomp, start_wall, start_cpu);
    let endpoint = api.map(|(endpoint, _)| endpoint);
    let mut vmm = match (&cli.config_file, &endpoint) {
        // With the API and no configuration file, configure through the API.
        (None, Some(endpoint)) => run_preboot(endpoint, &mut resources, &options, &cli.id)
            .unwrap_or_else(|| fail(ExitCode::UnexpectedError, "the API thread stopped")),
        _ => build_microvm(&resources, &options).unwrap_or_else(|err| {
            fail(
                err.exit_code(),
                format_args!("cannot start the microVM: {err}"),
            )
        }),
    };
    let mut runtime = RuntimeWork::attach(&mut vmm, endpoint, &cli.id)
        .unwrap_or_else(|err| fail(ExitCode::UnexpectedError, err));
    let code = vmm.run(|vmm| runtime.run(vmm));
    if vmm.migrated_away() {
        runtime.finish();
    }
    if let Err(err) = metrics::flush(vmm.device_metrics()) {
        log::warn!("final metrics flush failed: {err}");
    }
    drop(vmm);
    if let Some(sock) = sock {
        let _ = std::fs::remove_file(sock);
    }
    log::info!("tessera exiting with status {}", code as i32);
    process::exit(code as i32);
}

/// The command line, or the process ends with Firecracker's status for a
/// bad one (`--help` and `--version` end it with 0).
fn parse_cli() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => {
            let _ = err.print();
            process::exit(ExitCode::ArgParsing as i32);
        }
    }
}

/// Under the jailer, boot time counts from the jailer's start, as with
/// Firecracker (`--start-time-us` is CLOCK_MONOTONIC, like `Instant`).
fn jailer_start(start_time_us: Option<u64>) -> Option<Instant> {
    let us = start_time_us?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let now_us = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000;
    Instant::now().checked_sub(Duration::from_micros(now_us.checked_sub(us)?))
}

/// The log (`--level`, `--log-path`) and metrics (`--metrics-path`).
fn start_logging(cli: &Cli) {
    let level =
        logger::parse_level(&cli.level).unwrap_or_else(|err| fail(ExitCode::ArgParsing, err));
    if let Err(err) = logger::init(&cli.id, level, cli.log_path.as_deref()) {
        fail(ExitCode::ArgParsing, err);
    }
    if let Some(path) = &cli.metrics_path {
        metrics::configure(path).unwrap_or_else(|err| fail(ExitCode::ArgParsing, err));
    }
}

/// The configuration file's resources (its logger and metrics applied), or
/// none yet for the API to fill.
fn initial_resources(cli: &Cli) -> VmResources {
    let mut resources = match &cli.config_file {
        Some(path) => VmResources::from_file(path).unwrap_or_else(|err| {
            fail(
                ExitCode::BadConfiguration,
                format_args!("{}: {err}", path.display()),
            )
        }),
        None if cli.no_api => fail(ExitCode::ArgParsing, "--no-api needs --config-file FILE"),
        None => VmResources::default(),
    };
    if let Err(err) = apply_observability(&resources) {
        fail(ExitCode::BadConfiguration, err);
    }
    resources.mmds = initial_metadata(cli);
    resources
}

/// The metadata store: its limit, and `--metadata`'s contents.
fn initial_metadata(cli: &Cli) -> vmm_config::MmdsStore {
    let limit = cli.mmds_size_limit.unwrap_or(cli.http_api_max_payload_size);
    let mut store = vmm_config::MmdsStore::new(limit);
    if let Some(path) = &cli.metadata {
        let value = std::fs::read_to_string(path)
            .map_err(|err| err.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|err| err.to_string()))
            .unwrap_or_else(|err| {
                fail(
                    ExitCode::BadConfiguration,
                    format_args!("--metadata {}: {err}", path.display()),
                )
            });
        if let Err(err) = store.put(value) {
            fail(
                ExitCode::BadConfiguration,
                format_args!("--metadata {}: {err}", path.display()),
            );
        }
    }
    store
}

/// Binds the API socket and starts its thread (under the "api" filter);
/// records the start-up time metrics once it answers.
fn start_api(
    cli: &Cli,
    seccomp: &Arc<tessera_seccomp::Filters>,
    start_wall: Instant,
    start_cpu: Duration,
) -> (ApiEndpoint, PathBuf) {
    let sock = cli
        .api_sock
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCK));
    let (endpoint, channel) =
        ApiEndpoint::new().unwrap_or_else(|err| fail(ExitCode::UnexpectedError, err));
    ApiServer::bind(&sock, cli.http_api_max_payload_size, channel)
        .and_then(|server| {
            let filters = seccomp.clone();
            server.spawn(move || filters.apply("api").map_err(|err| err.to_string()))
        })
        .unwrap_or_else(|err| fail(ExitCode::ArgParsing, err));
    let m = metrics();
    m.startup_time_us
        .store(start_wall.elapsed().as_micros() as u64, Ordering::Relaxed);
    m.startup_time_cpu_us.store(
        devices::pseudo::process_cpu_time()
            .saturating_sub(start_cpu)
            .as_micros() as u64,
        Ordering::Relaxed,
    );
    log::info!("API socket {} is ready", sock.display());
    (endpoint, sock)
}

/// What building the microVM needs beyond its resources.
fn boot_options(
    cli: &Cli,
    api_sock: Option<&Path>,
    seccomp: Arc<tessera_seccomp::Filters>,
    start_wall: Instant,
    start_cpu: Duration,
) -> BootOptions {
    let backend_launcher = cli.backend_launcher_fd.map(|fd| {
        Arc::new(jailer::launch::LaunchChannel::new(
            fd.take().unwrap_or_else(|err| {
                fail(
                    ExitCode::ArgParsing,
                    format_args!("--backend-launcher-fd {fd}: {err}"),
                )
            }),
        ))
    });
    let sock_dir = api_sock
        .and_then(Path::parent)
        .filter(|dir| !dir.as_os_str().is_empty());
    // A jailed VMM has no /tmp, but it can create sockets where its API
    // socket is, or in the /run the jailer made for it.
    let backend_run_dir = match (&backend_launcher, sock_dir) {
        (Some(_), Some(dir)) => dir.to_path_buf(),
        (Some(_), None) => PathBuf::from("/run"),
        (None, _) => std::env::temp_dir(),
    };
    BootOptions {
        boot_timer: cli.boot_timer,
        enable_pci: cli.enable_pci,
        serial_out: cli.serial_out.clone(),
        vhost_user_blk_bin: cli.vhost_user_blk_bin.clone(),
        vhost_user_net_bin: cli.vhost_user_net_bin.clone(),
        vhost_user_vsock_bin: cli.vhost_user_vsock_bin.clone(),
        start_wall,
        start_cpu,
        seccomp,
        backend_launcher,
        backend_run_dir,
        instance_id: cli.id.clone(),
        mmds_token_key: vmm::mmds::random_token_key()
            .unwrap_or_else(|err| fail(ExitCode::UnexpectedError, err)),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Cli;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("tessera").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn enable_pci_is_firecrackers_flag_and_off_by_default() {
        assert!(!parse(&[]).enable_pci);
        assert!(parse(&["--enable-pci"]).enable_pci);
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("--enable-pci"), "{help}");
        assert!(help.contains("Enables PCIe support."), "{help}");
    }
}
