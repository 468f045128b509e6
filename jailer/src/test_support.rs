//! What the binary's unit tests share.

/// Whether a test that needs root can run: true as root. Otherwise the
/// test fails under `TESSERA_STRICT=1` (as `.ci/run` sets), and without it
/// prints `not run: needs root` and the caller returns.
pub fn runs_as_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("TESSERA_STRICT").as_deref() != Ok("1"),
        "TESSERA_STRICT=1 and this test cannot run: it needs root"
    );
    eprintln!("not run: needs root");
    false
}
