//! Compiles resources/seccomp/tessera.json to BPF, embedded by the binary,
//! and the backend starter's filter (backend-starter.json widened by the
//! backends' rules, see `tessera_seccomp::compile_spawner_file`).

use std::path::Path;

fn main() {
    let resources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/seccomp");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let tessera = resources.join("tessera.json");
    let starter = resources.join("backend-starter.json");
    let backends = [
        resources.join("vhost-user-blk.json"),
        resources.join("vhost-user-net.json"),
        resources.join("vhost-user-vsock.json"),
    ];
    for path in [&tessera, &starter].into_iter().chain(&backends) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    if let Err(err) = tessera_seccomp::compile_json_file(&tessera, &out.join("seccomp.bpf")) {
        panic!("{err}");
    }
    let backends: Vec<&Path> = backends.iter().map(|p| p.as_path()).collect();
    if let Err(err) = tessera_seccomp::compile_spawner_file(
        &starter,
        "starter",
        &backends,
        &out.join("starter.bpf"),
    ) {
        panic!("{err}");
    }
}
