//! Compiles the backend launcher's seccomp filter to BPF, embedded by the
//! jailer: resources/seccomp/launcher.json, widened by every rule of the
//! backends' own filters (see `tessera_seccomp::compile_spawner_file`).

use std::path::Path;

fn main() {
    let resources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/seccomp");
    let launcher = resources.join("launcher.json");
    let backends = [
        resources.join("vhost-user-blk.json"),
        resources.join("vhost-user-net.json"),
        resources.join("vhost-user-vsock.json"),
    ];
    for path in std::iter::once(&launcher).chain(&backends) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let backends: Vec<&Path> = backends.iter().map(|p| p.as_path()).collect();
    if let Err(err) = tessera_seccomp::compile_spawner_file(
        &launcher,
        "launcher",
        &backends,
        &out_dir.join("seccomp.bpf"),
    ) {
        panic!("{err}");
    }
}
