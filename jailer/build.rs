//! Compiles the backend launcher's seccomp filter to BPF, embedded by the
//! jailer: resources/seccomp/launcher.json, widened by every rule of the
//! backends' own filters (see `tessera_seccomp::compile_spawner_file`).

fn main() {
    tessera_seccomp::build::BuildScript::new().compile_spawner(
        "launcher",
        "launcher",
        "seccomp.bpf",
    );
}
