//! Compiles resources/seccomp/vhost-user-net.json to BPF, embedded by the binary.

fn main() {
    tessera_seccomp::build::BuildScript::new().compile("vhost-user-net", "seccomp.bpf");
}
