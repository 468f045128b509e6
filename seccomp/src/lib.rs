//! Seccomp filters for every Tessera binary: the JSON under
//! `resources/seccomp/` is compiled to BPF by each binary's `build.rs`
//! ([`compile_json_file`]), embedded with `include_bytes!`, and installed on
//! each thread, by its kind, before the thread handles any input
//! ([`Filters::apply`]).
//!
//! The JSON is seccompiler's, with one addition: a rule may carry
//! `"errno": N`. Such a call returns that errno instead of killing the
//! process. It is how a filter answers the housekeeping calls glibc makes
//! behind the code's back (its malloc opens `/proc/sys/vm/overcommit_memory`
//! the first time it trims a thread's arena, and carries on when that
//! fails). seccompiler has one match action per filter, so each thread kind
//! becomes a stack of programs: one per errno value (that call -> the
//! errno, anything else -> allow) and then the kind's own program (which
//! allows the call, so that the errno, the stricter answer, wins).
//!
//! The embedded form is a small length-prefixed encoding of those stacks
//! (thread kind → programs in install order), parsed with bounds checks.

use std::collections::HashMap;
use std::path::Path;

pub mod build;

pub use seccompiler::BpfProgram;
use seccompiler::{sock_filter, TargetArch};

/// Errors compiling, loading or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot read seccomp filter file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot compile seccomp filters from {path}: {source}")]
    Compile {
        path: String,
        source: seccompiler::Error,
    },
    #[error("cannot write compiled seccomp filters to {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse seccomp filter file {path}: {reason}")]
    Json { path: String, reason: String },
    #[error("the embedded seccomp filters are corrupt at byte {0}")]
    Corrupt(usize),
    #[error("no seccomp filter for thread kind {kind:?} (the filters define: {known})")]
    MissingThread { kind: String, known: String },
    #[error("cannot install the seccomp filter for thread kind {kind:?}: {source}")]
    Install {
        kind: String,
        source: seccompiler::Error,
    },
}

const MAGIC: &[u8; 4] = b"TSC2";
const INSN_LEN: usize = 8;

/// Compiles the JSON filter file `json` for x86-64 and writes the encoded
/// programs to `out`. Called from `build.rs`.
pub fn compile_json_file(json: &Path, out: &Path) -> Result<(), SeccompError> {
    let filters = Filters::from_json_file(json)?;
    std::fs::write(out, filters.encode()).map_err(|source| SeccompError::Write {
        path: out.display().to_string(),
        source,
    })
}

/// Compiles the filter of a process that starts backends (the jailer's
/// launcher, the VMM's backend starter): kind `kind` of the JSON file
/// `spawner`, widened by every rule of the backends' filter files
/// `backends`, and writes the encoded programs to `out` (and the widened
/// JSON beside it). A filter survives exec, so each backend runs under its
/// starter's filter and its own, stacked: the starter's must allow
/// whatever a backend may call. A syscall allowed outright by any of them
/// is allowed outright (seccompiler would otherwise keep only the
/// conditional rules), and the backends' `"errno"` answers stay theirs.
/// Called from `build.rs`.
pub fn compile_spawner_file(
    spawner: &Path,
    kind: &str,
    backends: &[&Path],
    out: &Path,
) -> Result<(), SeccompError> {
    let read = |path: &Path| -> Result<serde_json::Value, SeccompError> {
        let json_error = |reason: String| SeccompError::Json {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|source| SeccompError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|err| json_error(err.to_string()))
    };
    let mut merged = read(spawner)?;
    let rules_of = |filter: &serde_json::Value| -> Vec<serde_json::Value> {
        filter["filter"].as_array().cloned().unwrap_or_default()
    };
    let mut rules = rules_of(&merged[kind]);
    for path in backends {
        let backend = read(path)?;
        for filter in backend
            .as_object()
            .into_iter()
            .flat_map(|kinds| kinds.values())
        {
            for mut rule in rules_of(filter) {
                if let Some(rule) = rule.as_object_mut() {
                    rule.remove("errno");
                }
                rules.push(rule);
            }
        }
    }
    merged[kind]["filter"] = serde_json::Value::Array(allow_outright_once(rules));
    let json = out.with_extension("json");
    std::fs::write(&json, merged.to_string()).map_err(|source| SeccompError::Write {
        path: json.display().to_string(),
        source,
    })?;
    compile_json_file(&json, out)
}

/// `rules` with each syscall that some rule allows outright (no args, no
/// errno) kept once, without args: seccompiler would otherwise keep only
/// its conditional rules.
fn allow_outright_once(rules: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let outright: std::collections::BTreeSet<String> = rules
        .iter()
        .filter(|rule| rule.get("args").is_none() && rule.get("errno").is_none())
        .filter_map(|rule| rule.get("syscall")?.as_str().map(str::to_string))
        .collect();
    let mut kept = std::collections::BTreeSet::new();
    rules
        .into_iter()
        .filter(|rule| {
            let Some(name) = rule.get("syscall").and_then(serde_json::Value::as_str) else {
                return true;
            };
            if rule.get("errno").is_some() || !outright.contains(name) {
                return true;
            }
            rule.get("args").is_none() && kept.insert(name.to_string())
        })
        .collect()
}

/// The filter stack of each thread kind of one binary (in install order,
/// the kind's own program last), or none at all when seccomp is off.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    programs: HashMap<String, Vec<BpfProgram>>,
    disabled: bool,
}

impl Filters {
    /// No filtering (`--no-seccomp`): [`Filters::apply`] does nothing.
    pub fn disabled() -> Self {
        Self {
            programs: HashMap::new(),
            disabled: true,
        }
    }

    /// Compiles a seccompiler JSON file (`--seccomp-filter FILE`), with
    /// `"errno": N` rules as described in the crate documentation.
    pub fn from_json_file(path: &Path) -> Result<Self, SeccompError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SeccompError::Read {
            path: display.clone(),
            source,
        })?;
        let json_error = |reason: String| SeccompError::Json {
            path: display.clone(),
            reason,
        };
        let kinds: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|err| json_error(err.to_string()))?;
        let mut plain = serde_json::Map::new();
        let mut stacks: HashMap<String, Vec<String>> = HashMap::new();
        for (kind, filter) in kinds {
            let (own, errno_filters) = split_errno_rules(&kind, filter).map_err(json_error)?;
            plain.insert(kind.clone(), own);
            let mut stack = Vec::new();
            for (errno, filter) in errno_filters {
                let name = format!("{kind}/errno{errno}");
                plain.insert(name.clone(), filter);
                stack.push(name);
            }
            stack.push(kind.clone());
            stacks.insert(kind, stack);
        }
        let json = serde_json::Value::Object(plain).to_string();
        let mut compiled =
            seccompiler::compile_from_json(json.as_bytes(), arch()).map_err(|source| {
                SeccompError::Compile {
                    path: display.clone(),
                    source,
                }
            })?;
        let programs = stacks
            .into_iter()
            .map(|(kind, names)| {
                let stack = names
                    .iter()
                    .map(|name| compiled.remove(name).unwrap_or_default())
                    .collect();
                (kind, stack)
            })
            .collect();
        Ok(Self {
            programs,
            disabled: false,
        })
    }

    /// Decodes the filters embedded by `build.rs`.
    pub fn decode(bytes: &[u8]) -> Result<Self, SeccompError> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.take(MAGIC.len())? != MAGIC {
            return Err(SeccompError::Corrupt(0));
        }
        let mut programs = HashMap::new();
        for _ in 0..reader.u32()? {
            let name_len = reader.u32()? as usize;
            let at = reader.at;
            let name = std::str::from_utf8(reader.take(name_len)?)
                .map_err(|_| SeccompError::Corrupt(at))?
                .to_string();
            let depth = reader.u32()? as usize;
            let mut stack = Vec::with_capacity(depth.min(8));
            for _ in 0..depth {
                let count = reader.u32()? as usize;
                let mut program = Vec::with_capacity(count.min(4096));
                for _ in 0..count {
                    let insn = reader.take(INSN_LEN)?;
                    program.push(sock_filter {
                        code: u16::from_le_bytes([insn[0], insn[1]]),
                        jt: insn[2],
                        jf: insn[3],
                        k: u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]),
                    });
                }
                stack.push(program);
            }
            programs.insert(name, stack);
        }
        if reader.at != bytes.len() {
            return Err(SeccompError::Corrupt(reader.at));
        }
        Ok(Self {
            programs,
            disabled: false,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut names: Vec<&String> = self.programs.keys().collect();
        names.sort();
        let mut out = MAGIC.to_vec();
        out.extend((names.len() as u32).to_le_bytes());
        for name in names {
            let stack = &self.programs[name];
            out.extend((name.len() as u32).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend((stack.len() as u32).to_le_bytes());
            for program in stack {
                out.extend((program.len() as u32).to_le_bytes());
                for insn in program {
                    out.extend(insn.code.to_le_bytes());
                    out.extend([insn.jt, insn.jf]);
                    out.extend(insn.k.to_le_bytes());
                }
            }
        }
        out
    }

    /// Whether seccomp is turned off.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// The programs for thread kind `kind`, in install order.
    pub fn stack(&self, kind: &str) -> Result<&[BpfProgram], SeccompError> {
        self.programs
            .get(kind)
            .map(Vec::as_slice)
            .ok_or_else(|| SeccompError::MissingThread {
                kind: kind.to_string(),
                known: self.kinds().join(", "),
            })
    }

    /// The thread kinds these filters define, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.programs.keys().cloned().collect();
        kinds.sort();
        kinds
    }

    /// Installs the filter for `kind` on the calling thread (and so on the
    /// threads it starts later). Does nothing when seccomp is off.
    pub fn apply(&self, kind: &str) -> Result<(), SeccompError> {
        if self.disabled {
            return Ok(());
        }
        for program in self.stack(kind)? {
            seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
                kind: kind.to_string(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The filters a binary runs with: none with `no_seccomp`, the JSON file
/// `custom` if given, else the `embedded` ones. Every kind in `kinds` must
/// be defined, so that a custom file missing one fails at start.
pub fn load(
    embedded: &[u8],
    no_seccomp: bool,
    custom: Option<&Path>,
    kinds: &[&str],
) -> Result<Filters, SeccompError> {
    let filters = match (no_seccomp, custom) {
        (true, _) => return Ok(Filters::disabled()),
        (false, Some(path)) => Filters::from_json_file(path)?,
        (false, None) => Filters::decode(embedded)?,
    };
    for kind in kinds {
        filters.stack(kind)?;
    }
    Ok(filters)
}

thread_local! {
    static THREAD_CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Filters {
    /// Installs the filter for `kind` the first time the calling thread
    /// gets here; for threads started by a library, at their first event.
    pub fn apply_once_per_thread(&self, kind: &str) -> Result<(), SeccompError> {
        if THREAD_CONFINED.with(|done| done.get()) {
            return Ok(());
        }
        self.apply(kind)?;
        THREAD_CONFINED.with(|done| done.set(true));
        Ok(())
    }
}

/// Splits one thread kind's filter into its own filter (every rule, the
/// `"errno"` key and its `"args"` removed, so those calls pass it whatever
/// their arguments, and the errno program alone decides) and one filter per
/// errno value (those rules -> the errno, anything else -> allow). In the
/// own filter a call allowed whatever its arguments keeps one rule without
/// arguments: seccompiler would otherwise keep only its conditional rules.
fn split_errno_rules(
    kind: &str,
    mut filter: serde_json::Value,
) -> Result<(serde_json::Value, Vec<(u64, serde_json::Value)>), String> {
    let rules = filter
        .get_mut("filter")
        .and_then(serde_json::Value::as_array_mut)
        .ok_or_else(|| format!("thread kind {kind:?} has no \"filter\" list"))?;
    let mut by_errno: std::collections::BTreeMap<u64, Vec<serde_json::Value>> = Default::default();
    for rule in rules.iter_mut() {
        let Some(object) = rule.as_object_mut() else {
            continue;
        };
        let Some(errno) = object.remove("errno") else {
            continue;
        };
        let errno = errno
            .as_u64()
            .filter(|errno| (1..=4095).contains(errno))
            .ok_or_else(|| format!("thread kind {kind:?}: \"errno\" {errno} is not 1 to 4095"))?;
        by_errno.entry(errno).or_default().push(rule.clone());
        if let Some(object) = rule.as_object_mut() {
            object.remove("args");
        }
    }
    *rules = allow_outright_once(std::mem::take(rules));
    let errno_filters = by_errno
        .into_iter()
        .map(|(errno, rules)| {
            let filter = serde_json::json!({
                "mismatch_action": "allow",
                "match_action": { "errno": errno },
                "filter": rules,
            });
            (errno, filter)
        })
        .collect();
    Ok((filter, errno_filters))
}

fn arch() -> TargetArch {
    TargetArch::x86_64
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], SeccompError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(SeccompError::Corrupt(self.at))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32, SeccompError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{
        "main": {"mismatch_action": "kill_process", "match_action": "allow",
                 "filter": [{"syscall": "read", "comment": "stdin"},
                            {"syscall": "exit_group"},
                            {"syscall": "openat", "errno": 13, "comment": "glibc's malloc"},
                            {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "eq", "val": 21505}]}]},
        "worker": {"mismatch_action": "kill_process", "match_action": "allow",
                   "filter": [{"syscall": "write"}]}
    }"#;

    fn compiled() -> Filters {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tessera-seccomp-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("f.json");
        let out = dir.join("f.bpf");
        std::fs::write(&json, JSON).unwrap();
        compile_json_file(&json, &out).unwrap();
        let filters = Filters::decode(&std::fs::read(&out).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        filters
    }

    #[test]
    fn round_trip_keeps_every_program() {
        let filters = compiled();
        assert_eq!(filters.kinds(), ["main", "worker"]);
        let again = Filters::decode(&filters.encode()).unwrap();
        for kind in filters.kinds() {
            let (a, b) = (filters.stack(&kind).unwrap(), again.stack(&kind).unwrap());
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(b) {
                assert!(!a.is_empty());
                assert_eq!(a.len(), b.len());
                assert!(a
                    .iter()
                    .zip(b)
                    .all(|(x, y)| (x.code, x.jt, x.jf, x.k) == (y.code, y.jt, y.jf, y.k)));
            }
        }
    }

    #[test]
    fn errno_rules_stack_a_program_before_the_kinds_own() {
        let filters = compiled();
        assert_eq!(filters.stack("main").unwrap().len(), 2);
        assert_eq!(filters.stack("worker").unwrap().len(), 1);
    }

    /// Forks a child that installs `main` and makes `call`; returns its
    /// wait status.
    fn confined_child(call: fn() -> i32) -> i32 {
        let filters = compiled();
        // SAFETY: the child installs the prepared filters, makes one
        // syscall and exits; it touches no lock.
        match unsafe { libc::fork() } {
            0 => {
                let code = match filters.apply("main") {
                    Ok(()) => call(),
                    Err(_) => 100,
                };
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(code) }
            }
            pid => {
                assert!(pid > 0, "fork failed");
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                status
            }
        }
    }

    #[test]
    fn an_errno_rule_answers_with_the_errno_and_other_calls_still_kill() {
        let open_overcommit = || {
            let path = c"/proc/sys/vm/overcommit_memory";
            // SAFETY: a plain syscall on a NUL-terminated path.
            let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY) };
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if fd < 0 && errno == libc::EACCES {
                7
            } else {
                8
            }
        };
        let status = confined_child(open_overcommit);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 7);

        let open_socket = || {
            // SAFETY: a plain syscall; its result does not matter.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            9
        };
        let status = confined_child(open_socket);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn an_errno_out_of_range_is_refused() {
        let path = std::env::temp_dir().join(format!("tessera-errno-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"main": {"mismatch_action": "kill_process", "match_action": "allow",
                "filter": [{"syscall": "openat", "errno": 0}]}}"#,
        )
        .unwrap();
        let err = Filters::from_json_file(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("\"errno\" 0 is not 1 to 4095"), "{err}");
    }

    #[test]
    fn truncated_or_padded_input_is_rejected() {
        let bytes = compiled().encode();
        for len in [0, 3, 4, 9, bytes.len() - 1] {
            assert!(
                matches!(
                    Filters::decode(&bytes[..len]),
                    Err(SeccompError::Corrupt(_))
                ),
                "len {len}"
            );
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(matches!(
            Filters::decode(&padded),
            Err(SeccompError::Corrupt(_))
        ));
    }

    #[test]
    fn unknown_thread_kind_names_the_known_ones() {
        let err = compiled().apply("vcpu").unwrap_err().to_string();
        assert!(
            err.contains("\"vcpu\"") && err.contains("main, worker"),
            "{err}"
        );
        assert!(Filters::disabled().apply("vcpu").is_ok());
    }

    #[test]
    fn bad_json_names_the_file() {
        let path = std::env::temp_dir().join(format!("tessera-bad-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"main": {"filter": [{"syscall": "nosuchcall"}]}}"#,
        )
        .unwrap();
        let err = Filters::from_json_file(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("tessera-bad-"), "{err}");
    }
}
