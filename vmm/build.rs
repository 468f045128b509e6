//! Compiles resources/seccomp/tessera.json to BPF, embedded by the binary,
//! and the backend starter's filter (backend-starter.json widened by the
//! backends' rules, see `tessera_seccomp::compile_spawner_file`).

fn main() {
    let build = tessera_seccomp::build::BuildScript::new();
    build.compile("tessera", "seccomp.bpf");
    build.compile_spawner("backend-starter", "starter", "starter.bpf");
}
