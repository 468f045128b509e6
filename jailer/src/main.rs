//! `jailer`: will confine every Tessera process (chroot through pivot_root,
//! namespaces, cgroups, rlimits, dropped privileges) with Firecracker's
//! jailer command line. The confinement itself is built by the jailer work;
//! today the binary checks the instance id the way Firecracker's does and
//! refuses to run rather than start anything unconfined.

mod id;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let id = args
        .windows(2)
        .find(|pair| pair[0] == "--id")
        .map(|pair| pair[1].as_str());
    match id.map(id::validate) {
        None => {
            eprintln!("jailer: --id ID is required");
            ExitCode::from(2)
        }
        Some(Err(err)) => {
            eprintln!("jailer: {err}");
            ExitCode::from(2)
        }
        Some(Ok(())) => {
            eprintln!(
                "jailer: confinement is not built yet; refusing to start an unconfined process"
            );
            ExitCode::from(1)
        }
    }
}
