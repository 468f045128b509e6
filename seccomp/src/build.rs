//! What the binaries' build scripts share: the filters' JSON files in
//! `resources/seccomp/`, cargo's rerun lines, and the BPF written to
//! `OUT_DIR` for `include_bytes!`. A bad file fails the build with its
//! error.

use std::path::{Path, PathBuf};

/// The JSON files of the backends, whose rules a spawner's filter takes in
/// (they inherit it across exec).
const BACKENDS: [&str; 3] = ["vhost-user-blk", "vhost-user-net", "vhost-user-vsock"];

/// One build script's view of the filters.
pub struct BuildScript {
    resources: PathBuf,
    out_dir: PathBuf,
}

impl BuildScript {
    /// For the package cargo is building now.
    pub fn new() -> Self {
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name}"));
        Self {
            resources: Path::new(&var("CARGO_MANIFEST_DIR")).join("../resources/seccomp"),
            out_dir: PathBuf::from(var("OUT_DIR")),
        }
    }

    /// `resources/seccomp/<name>.json`, rebuilt when it changes.
    fn json(&self, name: &str) -> PathBuf {
        let path = self.resources.join(format!("{name}.json"));
        println!("cargo:rerun-if-changed={}", path.display());
        path
    }

    /// Compiles `<name>.json` into `OUT_DIR/<out>`.
    pub fn compile(&self, name: &str, out: &str) {
        let json = self.json(name);
        if let Err(err) = crate::compile_json_file(&json, &self.out_dir.join(out)) {
            panic!("{err}");
        }
    }

    /// Compiles `<name>.json`'s filter `kind`, widened by every rule of the
    /// backends' filters, into `OUT_DIR/<out>` (see
    /// [`crate::compile_spawner_file`]).
    pub fn compile_spawner(&self, name: &str, kind: &str, out: &str) {
        let spawner = self.json(name);
        let backends: Vec<PathBuf> = BACKENDS.iter().map(|b| self.json(b)).collect();
        let backends: Vec<&Path> = backends.iter().map(PathBuf::as_path).collect();
        let out = self.out_dir.join(out);
        if let Err(err) = crate::compile_spawner_file(&spawner, kind, &backends, &out) {
            panic!("{err}");
        }
    }
}

impl Default for BuildScript {
    fn default() -> Self {
        Self::new()
    }
}
