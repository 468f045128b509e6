//! The `tessera` binary: parses the command line, sets up logging, builds
//! the microVM from `--config-file` and runs it until the guest ends.

use std::path::PathBuf;
use std::process;
use std::time::Instant;

use clap::Parser;
use vmm::resources::VmResources;
use vmm::{build_microvm, logger, BootOptions, ExitCode};

/// Tessera: a microVM monitor, command-line compatible with Firecracker.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, about)]
struct Cli {
    /// Path of the API Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Boot from a Firecracker-style JSON configuration file.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run without the API socket; needs --config-file.
    #[arg(long)]
    no_api: bool,
    /// Log `Guest-boot-time` when the guest writes 123 to 0xd0000000.
    #[arg(long)]
    boot_timer: bool,
    /// Instance id, shown in every log line.
    #[arg(long, default_value = "anonymous-instance", value_name = "ID")]
    id: String,
    /// Append log lines to this file or FIFO instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Log level: Off, Error, Warning, Info, Debug or Trace.
    #[arg(long, default_value = "Info", value_name = "LEVEL")]
    level: String,
    /// Write the guest console to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    serial_out: Option<PathBuf>,
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

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => {
            let _ = err.print();
            process::exit(ExitCode::ArgParsing as i32);
        }
    };
    let level =
        logger::parse_level(&cli.level).unwrap_or_else(|err| fail(ExitCode::ArgParsing, err));
    if let Err(err) = logger::init(&cli.id, level, cli.log_path.as_deref()) {
        fail(ExitCode::ArgParsing, err);
    }

    if !cli.no_api || cli.api_sock.is_some() {
        fail(
            ExitCode::ArgParsing,
            "the API socket is not available yet; run with --no-api --config-file FILE",
        );
    }
    let Some(config_file) = cli.config_file.as_deref() else {
        fail(ExitCode::ArgParsing, "--no-api needs --config-file FILE");
    };
    let resources = VmResources::from_file(config_file).unwrap_or_else(|err| {
        fail(
            ExitCode::BadConfiguration,
            format_args!("{}: {err}", config_file.display()),
        )
    });

    let options = BootOptions {
        boot_timer: cli.boot_timer,
        serial_out: cli.serial_out,
        start_wall,
        start_cpu,
    };
    let mut vmm = build_microvm(&resources, &options).unwrap_or_else(|err| {
        fail(
            err.exit_code(),
            format_args!("cannot start the microVM: {err}"),
        )
    });
    let code = vmm.run();
    drop(vmm);
    log::info!("tessera exiting with status {}", code as i32);
    process::exit(code as i32);
}
