//! Compiles resources/seccomp/vhost-user-blk.json to BPF, embedded by the binary.

fn main() {
    tessera_seccomp::build::BuildScript::new().compile("vhost-user-blk", "seccomp.bpf");
}
