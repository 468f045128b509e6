//! Compiles the backend launcher's seccomp filter to BPF, embedded by the
//! jailer: resources/seccomp/launcher.json, widened by every rule of the
//! backends' own filters (vhost-user-blk.json, vhost-user-net.json). A
//! filter survives exec, so each backend runs under the launcher's filter
//! and its own, stacked: the launcher's must allow whatever a backend may
//! call. A syscall allowed outright by any of them is allowed outright
//! (seccompiler would otherwise keep only the conditional rules), and the
//! backends' `"errno"` answers stay theirs.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

const KIND: &str = "launcher";
const BACKENDS: [&str; 2] = ["vhost-user-blk.json", "vhost-user-net.json"];

fn read_json(path: &Path) -> Value {
    println!("cargo:rerun-if-changed={}", path.display());
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn rules_of(filter: &Value) -> Vec<Value> {
    filter["filter"].as_array().cloned().unwrap_or_default()
}

/// The launcher's rules followed by the backends' (without `"errno"`),
/// each syscall allowed outright once where any rule allows it outright.
fn merged_rules(launcher: &Value, backends: &[Value]) -> Vec<Value> {
    let mut rules = rules_of(&launcher[KIND]);
    for backend in backends {
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
    let outright: HashSet<String> = rules
        .iter()
        .filter(|rule| rule.get("args").is_none() && rule.get("errno").is_none())
        .filter_map(|rule| rule["syscall"].as_str().map(String::from))
        .collect();
    let mut emitted = HashSet::new();
    rules
        .into_iter()
        .filter(|rule| {
            let name = rule["syscall"].as_str().unwrap_or_default().to_string();
            if rule.get("errno").is_some() || !outright.contains(&name) {
                return true;
            }
            rule.get("args").is_none() && emitted.insert(name)
        })
        .collect()
}

fn main() {
    let resources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/seccomp");
    let launcher = read_json(&resources.join("launcher.json"));
    let backends: Vec<Value> = BACKENDS
        .iter()
        .map(|name| read_json(&resources.join(name)))
        .collect();
    let mut merged = launcher.clone();
    merged[KIND]["filter"] = Value::Array(merged_rules(&launcher, &backends));
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let merged_path = out_dir.join("launcher-merged.json");
    std::fs::write(&merged_path, merged.to_string())
        .unwrap_or_else(|err| panic!("cannot write {}: {err}", merged_path.display()));
    if let Err(err) = tessera_seccomp::compile_json_file(&merged_path, &out_dir.join("seccomp.bpf"))
    {
        panic!("{err}");
    }
}
