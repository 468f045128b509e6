//! What a dynamically linked binary needs inside its jail. Tessera's own
//! binaries are static (see `.cargo/config.toml`) and need nothing, like
//! Firecracker's; for a binary built otherwise the jailer reads the ELF
//! program interpreter (`PT_INTERP`) and the `DT_NEEDED` libraries of the
//! binary, and of those libraries in turn, resolves them in the standard
//! library directories and copies them into the jail at the same paths
//! (owned by root, read-only for the jailed user).
//!
//! The ELF reading is bounds-checked throughout: a malformed file is an
//! error, never a panic.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where `DT_NEEDED` names are looked up, in order (glibc's defaults on
/// x86_64 Debian).
pub const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// Errors reading a binary's dependencies or copying them.
#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a 64-bit little-endian ELF file we can read: {why}")]
    Elf { path: String, why: &'static str },
    #[error("library {name:?} needed by {by} is not in {dirs:?}")]
    NotFound {
        name: String,
        by: String,
        dirs: &'static [&'static str],
    },
    #[error("cannot copy {from} into the jail at {to}: {source}")]
    Copy {
        from: String,
        to: String,
        source: std::io::Error,
    },
}

fn u16_at(data: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(data: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn c_string(data: &[u8], off: usize) -> Option<String> {
    let rest = data.get(off..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

/// The interpreter and the needed library names of an ELF64 LE image.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dependencies {
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

/// Reads the dependencies of an ELF image.
pub fn parse(data: &[u8]) -> Result<Dependencies, &'static str> {
    if data.get(0..4) != Some(b"\x7fELF") {
        return Err("no ELF magic");
    }
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err("not ELF64 little-endian");
    }
    let phoff = u64_at(data, 0x20).ok_or("short header")? as usize;
    let phentsize = u16_at(data, 0x36).ok_or("short header")? as usize;
    let phnum = u16_at(data, 0x38).ok_or("short header")? as usize;
    if phentsize < 56 {
        return Err("bad program header size");
    }
    let mut deps = Dependencies::default();
    let mut loads = Vec::new();
    let mut dynamic = None;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or("bad program headers")?)
            .ok_or("bad program headers")?;
        let p_type = u32_at(data, ph).ok_or("short program header")?;
        let offset = u64_at(data, ph.saturating_add(8)).ok_or("short program header")? as usize;
        let vaddr = u64_at(data, ph.saturating_add(16)).ok_or("short program header")?;
        let filesz = u64_at(data, ph.saturating_add(32)).ok_or("short program header")? as usize;
        match p_type {
            PT_INTERP => {
                deps.interpreter = Some(c_string(data, offset).ok_or("bad PT_INTERP")?);
            }
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            _ => {}
        }
    }
    let Some((dyn_off, dyn_size)) = dynamic else {
        return Ok(deps);
    };
    let mut strtab_vaddr = None;
    let mut needed_offsets = Vec::new();
    for entry in 0..dyn_size / 16 {
        let at = dyn_off.saturating_add(entry * 16);
        let tag = u64_at(data, at).ok_or("short dynamic section")?;
        let val = u64_at(data, at.saturating_add(8)).ok_or("short dynamic section")?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed_offsets.push(val as usize),
            DT_STRTAB => strtab_vaddr = Some(val),
            _ => {}
        }
    }
    if needed_offsets.is_empty() {
        return Ok(deps);
    }
    let strtab_vaddr = strtab_vaddr.ok_or("DT_NEEDED without DT_STRTAB")?;
    let strtab = loads
        .iter()
        .find(|(vaddr, _, size)| strtab_vaddr >= *vaddr && strtab_vaddr - vaddr < *size as u64)
        .map(|(vaddr, offset, _)| offset.saturating_add((strtab_vaddr - vaddr) as usize))
        .ok_or("DT_STRTAB outside the loaded segments")?;
    for off in needed_offsets {
        let name = c_string(data, strtab.checked_add(off).ok_or("bad DT_NEEDED")?)
            .ok_or("bad DT_NEEDED")?;
        deps.needed.push(name);
    }
    Ok(deps)
}

fn read(path: &Path) -> Result<Vec<u8>, LibsError> {
    fs::read(path).map_err(|source| LibsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Every file (absolute host path) `binary` needs to run: its interpreter
/// and its libraries, transitively. Empty for a static binary.
pub fn closure(binary: &Path) -> Result<Vec<PathBuf>, LibsError> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut queue = vec![binary.to_path_buf()];
    while let Some(file) = queue.pop() {
        let data = read(&file)?;
        let deps = parse(&data).map_err(|why| LibsError::Elf {
            path: file.display().to_string(),
            why,
        })?;
        let mut found = Vec::new();
        if let Some(interp) = deps.interpreter {
            found.push(PathBuf::from(interp));
        }
        for name in deps.needed {
            let path = if name.contains('/') {
                Some(PathBuf::from(&name))
            } else {
                LIBRARY_DIRS
                    .iter()
                    .map(|dir| Path::new(dir).join(&name))
                    .find(|p| p.is_file())
            };
            found.push(path.ok_or_else(|| LibsError::NotFound {
                name: name.clone(),
                by: file.display().to_string(),
                dirs: LIBRARY_DIRS,
            })?);
        }
        for path in found {
            if !files.contains(&path) {
                files.push(path.clone());
                queue.push(path);
            }
        }
    }
    Ok(files)
}

/// Copies what `binary` needs into `jail_root` at the same paths.
pub fn copy_into(binary: &Path, jail_root: &Path) -> Result<(), LibsError> {
    for file in closure(binary)? {
        let relative = file.strip_prefix("/").unwrap_or(&file);
        let target = jail_root.join(relative);
        let copy_err = |source| LibsError::Copy {
            from: file.display().to_string(),
            to: target.display().to_string(),
            source,
        };
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir).map_err(copy_err)?;
        }
        let _ = fs::remove_file(&target);
        fs::copy(&file, &target).map_err(copy_err)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).map_err(copy_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dynamically linked system binary: Debian's coreutils are.
    const DYNAMIC_BINARY: &str = "/bin/ls";

    #[test]
    fn a_dynamic_binary_needs_its_interpreter_and_libc() {
        let deps = parse(&fs::read(DYNAMIC_BINARY).unwrap()).unwrap();
        assert!(
            deps.interpreter
                .as_deref()
                .unwrap_or("")
                .contains("ld-linux"),
            "{deps:?}"
        );
        assert!(
            deps.needed.iter().any(|n| n.starts_with("libc.so")),
            "{deps:?}"
        );
        let all = closure(Path::new(DYNAMIC_BINARY)).unwrap();
        assert!(all.iter().any(|p| p.ends_with("libc.so.6")), "{all:?}");
    }

    #[test]
    fn our_static_build_needs_nothing() {
        let exe = std::env::current_exe().unwrap();
        let deps = parse(&fs::read(&exe).unwrap()).unwrap();
        assert_eq!(deps.interpreter, None, "{deps:?}");
        assert!(deps.needed.is_empty(), "{deps:?}");
        assert!(closure(&exe).unwrap().is_empty());
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(parse(b"").is_err());
        assert!(parse(b"\x7fELF\x02\x01").is_err());
        let mut data = fs::read(std::env::current_exe().unwrap()).unwrap();
        data.truncate(200);
        // Truncated: program headers or the dynamic section are cut off.
        let _ = parse(&data);
        let mut garbage = b"\x7fELF\x02\x01".to_vec();
        garbage.extend(std::iter::repeat_n(0xff, 100));
        assert!(parse(&garbage).is_err());
    }
}
