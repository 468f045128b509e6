//! `jailer`: starts a binary confined the way Firecracker's jailer does
//! (a chroot entered through pivot_root in its own mount namespace,
//! optionally a new pid namespace and a network namespace, cgroups,
//! rlimits, a dropped uid/gid with no capabilities), with Firecracker's
//! command line. For `tessera` it also keeps a root launcher outside the
//! jail that starts each device backend in a jail of its own on the VMM's
//! request (see the `launcher` module and [`jailer::launch`]).
//!
//! Every failure is one line on stderr, `jailer: <what failed, with what
//! value>`, and a nonzero exit status; nothing half-made is left.

mod cgroup;
mod chroot;
mod cli;
mod env;
mod launcher;
mod libs;
mod privileges;
mod resource_limits;
#[cfg(test)]
mod test_support;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let start_time_us = env::clock_us(nix::time::ClockId::CLOCK_MONOTONIC);
    let start_time_cpu_us = env::clock_us(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID);
    // Step 2 first, as Firecracker: nothing inherited survives into the jail.
    env::sanitize_process();

    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => {
            // clap's message names the bad flag; keep its first line.
            let text = err.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("jailer: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let env = match env::Env::new(cli, start_time_us, start_time_cpu_us) {
        Ok(env) => env,
        Err(err) => {
            eprintln!("jailer: {err}");
            return ExitCode::from(1);
        }
    };
    let Err(err) = env.run();
    eprintln!("jailer: {err}");
    ExitCode::from(1)
}
