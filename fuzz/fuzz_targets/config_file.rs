//! `--config-file`: Firecracker's JSON, parsed and checked into the VMM's
//! resources as `tessera --config-file` does (paths are checked against
//! the file system, so most inputs stop at the first missing file).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(json) = std::str::from_utf8(bytes) else {
        return;
    };
    let _ = vmm::resources::VmResources::from_json(json);
});
