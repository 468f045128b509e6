//! Compiles resources/seccomp/vhost-user-vsock.json to BPF, embedded by the binary.

fn main() {
    let json = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../resources/seccomp/vhost-user-vsock.json");
    println!("cargo:rerun-if-changed={}", json.display());
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("seccomp.bpf");
    if let Err(err) = tessera_seccomp::compile_json_file(&json, &out) {
        panic!("{err}");
    }
}
