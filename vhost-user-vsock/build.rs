//! Compiles resources/seccomp/vhost-user-vsock.json to BPF, embedded by the binary.

fn main() {
    tessera_seccomp::build::BuildScript::new().compile("vhost-user-vsock", "seccomp.bpf");
}
