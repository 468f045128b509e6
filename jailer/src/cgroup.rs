//! Cgroups for a jailed process, written straight to cgroupfs as
//! Firecracker's jailer does.
//!
//! `--cgroup FILE=VALUE` names a controller by the file's prefix
//! (`cpuset.cpus` is the `cpuset` controller). Under cgroup v1 each
//! controller has its own hierarchy (found in `/proc/mounts`) and the
//! instance gets `<mount>/<parent>/<id>` in each hierarchy it uses; under v2
//! there is one hierarchy (the `cgroup2` mount) with the controllers
//! enabled in `cgroup.subtree_control` from its root down to the parent.
//! A new v1 cpuset cgroup starts with empty `cpuset.cpus`/`cpuset.mems`,
//! which no task can join, so they are inherited from the nearest ancestor
//! that has them (filling the empty levels on the way), as Firecracker does.
//!
//! [`CgroupPlan`] is what the command line asked for (checked up front);
//! [`CgroupPlan::create`] makes the directories, writes the values and
//! returns a [`CgroupSet`] that can move a process in, move the caller back
//! to the cgroups it came from, and remove the directories again — through
//! directory fds opened at creation, so removal also works after the
//! caller has pivoted into its jail. Nothing half-made is left when
//! creation fails.

use std::ffi::{CString, OsString};
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};

/// The mount table.
pub const PROC_MOUNTS: &str = "/proc/mounts";
/// The caller's own cgroups.
pub const PROC_SELF_CGROUP: &str = "/proc/self/cgroup";

/// Errors in a cgroup request or creating a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup version {0:?}: expected 1 or 2")]
    Version(String),
    #[error("invalid cgroup {0:?}: expected FILE=VALUE with a non-empty value")]
    Format(String),
    #[error("invalid cgroup file {0:?}: expected <controller>.<property>")]
    File(String),
    #[error("invalid parent cgroup {0:?}: it must be a relative path without '.' or '..'")]
    ParentPath(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cgroup controller {controller:?} (from {arg:?}) is not mounted as cgroup v1")]
    NotMountedV1 { controller: String, arg: String },
    #[error("no cgroup2 hierarchy is mounted")]
    NoV2Mount,
    #[error("cgroup controller {controller:?} (from {arg:?}) is not available in the cgroup v2 hierarchy at {mount}")]
    NotAvailableV2 {
        controller: String,
        arg: String,
        mount: String,
    },
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("cgroup {0} already exists: is an instance with this id running?")]
    Exists(String),
    #[error("unknown cgroup file {file:?}: {dir} has no such file")]
    UnknownFile { file: String, dir: String },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        value: String,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot inherit {file} for cgroup {path}: no ancestor has a value")]
    Inherit { file: String, path: String },
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: nix::Error },
}

/// The cgroup version (`--cgroup-version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    pub fn parse(value: &str) -> Result<Self, CgroupError> {
        match value {
            "1" => Ok(Self::V1),
            "2" => Ok(Self::V2),
            _ => Err(CgroupError::Version(value.to_string())),
        }
    }
}

/// One `--cgroup FILE=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub controller: String,
    pub file: String,
    pub value: String,
}

impl Setting {
    /// Parses `FILE=VALUE`; the file must be `<controller>.<property>`: a
    /// controller of lower-case letters, digits and '_', and a property of
    /// letters, digits, '_' and inner '.' (`hugetlb.2MB.max`), so that no
    /// path can be formed from it.
    pub fn parse(arg: &str) -> Result<Self, CgroupError> {
        let (file, value) = arg
            .split_once('=')
            .ok_or_else(|| CgroupError::Format(arg.to_string()))?;
        if value.is_empty() || value.contains('=') || value.contains('\n') {
            return Err(CgroupError::Format(arg.to_string()));
        }
        let (controller, property) = file
            .split_once('.')
            .ok_or_else(|| CgroupError::File(file.to_string()))?;
        let word = |s: &str, upper: bool| {
            !s.is_empty()
                && s.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'_'
                        || (upper && b.is_ascii_uppercase())
                })
        };
        if !word(controller, false) || !property.split('.').all(|p| word(p, true)) {
            return Err(CgroupError::File(file.to_string()));
        }
        Ok(Self {
            controller: controller.to_string(),
            file: file.to_string(),
            value: value.to_string(),
        })
    }
}

/// Checks `--parent-cgroup`: relative, no `.`/`..`, not empty.
pub fn parse_parent(parent: &str) -> Result<PathBuf, CgroupError> {
    let path = Path::new(parent);
    let ok = !parent.is_empty()
        && !parent.contains('\n')
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(path.to_path_buf())
    } else {
        Err(CgroupError::ParentPath(parent.to_string()))
    }
}

/// One cgroup hierarchy the instance gets a cgroup in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where the hierarchy is mounted.
    pub mount: PathBuf,
    /// The controllers used in it (v1: usually one).
    pub controllers: Vec<String>,
    /// The caller's cgroup in this hierarchy before it joined the new one.
    pub original: PathBuf,
    /// The values to write, in command-line order.
    pub settings: Vec<Setting>,
}

impl Hierarchy {
    fn has_cpuset_v1(&self, version: CgroupVersion) -> bool {
        version == CgroupVersion::V1 && self.controllers.iter().any(|c| c == "cpuset")
    }
}

/// The cgroups the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    pub version: CgroupVersion,
    /// Relative to each hierarchy's mount.
    pub parent: PathBuf,
    pub hierarchies: Vec<Hierarchy>,
}

/// A `/proc/mounts` line: (mount point, fs type, options).
fn mounts(text: &str) -> impl Iterator<Item = (&str, &str, &str)> {
    text.lines().filter_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let dir = fields.next()?;
        let fstype = fields.next()?;
        let options = fields.next()?;
        Some((dir, fstype, options))
    })
}

/// The mount point of the v1 hierarchy that has `controller`.
pub fn v1_mount(mounts_text: &str, controller: &str) -> Option<PathBuf> {
    mounts(mounts_text)
        .find(|(_, fstype, options)| {
            *fstype == "cgroup" && options.split(',').any(|o| o == controller)
        })
        .map(|(dir, _, _)| PathBuf::from(dir))
}

/// The mount point of the cgroup2 hierarchy.
pub fn v2_mount(mounts_text: &str) -> Option<PathBuf> {
    mounts(mounts_text)
        .find(|(_, fstype, _)| *fstype == "cgroup2")
        .map(|(dir, _, _)| PathBuf::from(dir))
}

/// The caller's cgroup path (relative to the hierarchy's root) from
/// `/proc/self/cgroup` text: v1 by controller, v2 with `None`.
pub fn own_cgroup(proc_cgroup: &str, controller: Option<&str>) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let _id = fields.next()?;
        let controllers = fields.next()?;
        let path = fields.next()?;
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        matches.then(|| PathBuf::from(path.trim_start_matches('/')))
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl CgroupPlan {
    /// Plans the cgroups for `args` (the `--cgroup` values) against the
    /// live system's mounts and the caller's own cgroups.
    pub fn new(
        version: CgroupVersion,
        parent: PathBuf,
        args: &[String],
    ) -> Result<Self, CgroupError> {
        let settings = args
            .iter()
            .map(|a| Setting::parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        if settings.is_empty() {
            return Ok(Self {
                version,
                parent,
                hierarchies: Vec::new(),
            });
        }
        let mounts_text = read(Path::new(PROC_MOUNTS))?;
        let own = read(Path::new(PROC_SELF_CGROUP))?;
        Self::from_parts(version, parent, &settings, &mounts_text, &own, |mount| {
            read(&mount.join("cgroup.controllers"))
        })
    }

    /// [`CgroupPlan::new`] with the system files given (for tests).
    pub fn from_parts(
        version: CgroupVersion,
        parent: PathBuf,
        settings: &[Setting],
        mounts_text: &str,
        own_cgroups: &str,
        v2_controllers: impl Fn(&Path) -> Result<String, CgroupError>,
    ) -> Result<Self, CgroupError> {
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        match version {
            CgroupVersion::V1 => {
                for setting in settings {
                    let mount = v1_mount(mounts_text, &setting.controller).ok_or_else(|| {
                        CgroupError::NotMountedV1 {
                            controller: setting.controller.clone(),
                            arg: format!("{}={}", setting.file, setting.value),
                        }
                    })?;
                    if let Some(h) = hierarchies.iter_mut().find(|h| h.mount == mount) {
                        if !h.controllers.contains(&setting.controller) {
                            h.controllers.push(setting.controller.clone());
                        }
                        h.settings.push(setting.clone());
                        continue;
                    }
                    let original =
                        own_cgroup(own_cgroups, Some(&setting.controller)).unwrap_or_default();
                    hierarchies.push(Hierarchy {
                        original: mount.join(original),
                        mount,
                        controllers: vec![setting.controller.clone()],
                        settings: vec![setting.clone()],
                    });
                }
            }
            CgroupVersion::V2 => {
                let mount = v2_mount(mounts_text).ok_or(CgroupError::NoV2Mount)?;
                let available = v2_controllers(&mount)?;
                let mut controllers: Vec<String> = Vec::new();
                for setting in settings {
                    if !available
                        .split_whitespace()
                        .any(|c| c == setting.controller)
                    {
                        return Err(CgroupError::NotAvailableV2 {
                            controller: setting.controller.clone(),
                            arg: format!("{}={}", setting.file, setting.value),
                            mount: mount.display().to_string(),
                        });
                    }
                    if !controllers.contains(&setting.controller) {
                        controllers.push(setting.controller.clone());
                    }
                }
                let original = own_cgroup(own_cgroups, None).unwrap_or_default();
                hierarchies.push(Hierarchy {
                    original: mount.join(original),
                    mount,
                    controllers,
                    settings: settings.to_vec(),
                });
            }
        }
        Ok(Self {
            version,
            parent,
            hierarchies,
        })
    }

    /// Where `leaf`'s cgroup is in `hierarchy`.
    pub fn dir(&self, hierarchy: &Hierarchy, leaf: &str) -> PathBuf {
        hierarchy.mount.join(&self.parent).join(leaf)
    }

    /// All of `leaf`'s cgroup directories.
    #[cfg(test)]
    pub fn dirs(&self, leaf: &str) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| self.dir(h, leaf)).collect()
    }

    /// The plan for the cgroups nested in instance `leaf`'s: the same
    /// hierarchies with `<parent>/<leaf>` as the parent, no values of their
    /// own, and (v2) no controllers enabled, since the instance's cgroup
    /// holds a process. What a backend of the instance gets: its cgroup is
    /// a child of the VM's, under the VM's limits, which count it.
    pub fn nested(&self, leaf: &str) -> Self {
        let mut plan = self.clone();
        plan.parent = self.parent.join(leaf);
        for h in &mut plan.hierarchies {
            h.settings.clear();
            if plan.version == CgroupVersion::V2 {
                h.controllers.clear();
            }
        }
        plan
    }

    /// Creates `<mount>/<parent>/<leaf>` in every hierarchy and writes the
    /// values. On error every directory made so far is removed again.
    pub fn create(&self, leaf: &str) -> Result<CgroupSet, CgroupError> {
        let mut set = CgroupSet { dirs: Vec::new() };
        for hierarchy in &self.hierarchies {
            if let Err(err) = self.create_one(hierarchy, leaf, &mut set) {
                set.remove(Duration::ZERO);
                return Err(err);
            }
        }
        Ok(set)
    }

    fn create_one(
        &self,
        hierarchy: &Hierarchy,
        leaf: &str,
        set: &mut CgroupSet,
    ) -> Result<(), CgroupError> {
        let dir = self.dir(hierarchy, leaf);
        let parent_dir = hierarchy.mount.join(&self.parent);
        fs::create_dir_all(&parent_dir).map_err(|source| CgroupError::Create {
            path: parent_dir.display().to_string(),
            source,
        })?;
        if self.version == CgroupVersion::V2 {
            // Enable the controllers from the root down to the parent.
            let mut dir = hierarchy.mount.clone();
            let mut levels = vec![dir.clone()];
            for component in self.parent.components() {
                dir.push(component);
                levels.push(dir.clone());
            }
            for level in levels {
                for controller in &hierarchy.controllers {
                    write_value(
                        &level.join("cgroup.subtree_control"),
                        &format!("+{controller}"),
                    )?;
                }
            }
        }
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CgroupError::Exists(dir.display().to_string()))
            }
            Err(source) => {
                return Err(CgroupError::Create {
                    path: dir.display().to_string(),
                    source,
                })
            }
        }
        set.dirs.push(CgroupDir::open(&dir, &hierarchy.original)?);
        if hierarchy.has_cpuset_v1(self.version) {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                inherit_from_parent(&dir, file, &hierarchy.mount)?;
            }
        }
        for setting in &hierarchy.settings {
            let path = dir.join(&setting.file);
            if !path.exists() {
                return Err(CgroupError::UnknownFile {
                    file: setting.file.clone(),
                    dir: dir.display().to_string(),
                });
            }
            write_value(&path, &setting.value)?;
        }
        Ok(())
    }
}

/// Writes `value` and a newline to a cgroup file in one write.
pub fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    let result = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut file| file.write_all(format!("{value}\n").as_bytes()));
    result.map_err(|source| CgroupError::Write {
        value: value.to_string(),
        path: path.display().to_string(),
        source,
    })
}

/// Fills `dir/file` from the nearest ancestor (not above `root`) with a
/// non-empty value, filling the empty levels in between on the way.
fn inherit_from_parent(dir: &Path, file: &str, root: &Path) -> Result<(), CgroupError> {
    let current = read(&dir.join(file))?;
    if !current.trim().is_empty() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(parent) if dir != root && parent.starts_with(root) => parent,
        _ => {
            return Err(CgroupError::Inherit {
                file: file.to_string(),
                path: dir.display().to_string(),
            })
        }
    };
    inherit_from_parent(parent, file, root)?;
    let value = read(&parent.join(file))?;
    write_value(&dir.join(file), value.trim())
}

/// One cgroup directory made by [`CgroupPlan::create`].
#[derive(Debug)]
pub struct CgroupDir {
    pub path: PathBuf,
    parent_fd: OwnedFd,
    name: OsString,
    procs: OwnedFd,
    original_procs: Option<OwnedFd>,
}

impl CgroupDir {
    fn open(path: &Path, original: &Path) -> Result<Self, CgroupError> {
        let open_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| CgroupError::Open { path, source }
        };
        let parent = path.parent().unwrap_or(Path::new("/"));
        let parent_fd = open(
            parent,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(open_err(parent))?;
        // SAFETY: `open` just returned this fd and nothing else owns it.
        let parent_fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(parent_fd) };
        let procs_path = path.join("cgroup.procs");
        let procs = open(
            &procs_path,
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(open_err(&procs_path))?;
        // SAFETY: as above.
        let procs = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(procs) };
        let original_path = original.join("cgroup.procs");
        let original_procs = open(
            &original_path,
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()
        // SAFETY: as above.
        .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        Ok(Self {
            path: path.to_path_buf(),
            parent_fd,
            name: path.file_name().unwrap_or_default().to_os_string(),
            procs,
            original_procs,
        })
    }
}

/// The cgroups of one jailed process.
#[derive(Debug, Default)]
pub struct CgroupSet {
    pub dirs: Vec<CgroupDir>,
}

fn write_pid(fd: &OwnedFd, pid: u32) -> std::io::Result<()> {
    let text = format!("{pid}\n");
    nix::unistd::write(fd, text.as_bytes())
        .map(|_| ())
        .map_err(std::io::Error::from)
}

impl CgroupSet {
    /// Moves the calling process into every cgroup of the set.
    pub fn attach_self(&self) -> Result<(), CgroupError> {
        let pid = std::process::id();
        for dir in &self.dirs {
            write_pid(&dir.procs, pid).map_err(|source| CgroupError::Write {
                value: pid.to_string(),
                path: dir.path.join("cgroup.procs").display().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Moves the calling process back to the cgroups it was in before
    /// (best effort: a hierarchy whose original cgroup could not be opened
    /// is skipped).
    pub fn leave_self(&self) {
        let pid = std::process::id();
        for dir in &self.dirs {
            if let Some(fd) = &dir.original_procs {
                let _ = write_pid(fd, pid);
            }
        }
    }

    /// Removes every directory of the set, retrying while it is busy (its
    /// tasks still exiting) for up to `patience`. Returns the ones that
    /// could not be removed, with why.
    pub fn remove(&mut self, patience: Duration) -> Vec<(PathBuf, nix::Error)> {
        let deadline = Instant::now() + patience;
        let mut failed = Vec::new();
        for dir in self.dirs.drain(..) {
            let name = match CString::new(dir.name.as_bytes()) {
                Ok(name) => name,
                Err(_) => continue,
            };
            loop {
                match unlinkat(
                    Some(dir.parent_fd.as_raw_fd()),
                    name.as_c_str(),
                    UnlinkatFlags::RemoveDir,
                ) {
                    Ok(()) | Err(nix::Error::ENOENT) => break,
                    Err(nix::Error::EBUSY) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(err) => {
                        failed.push((dir.path.clone(), err));
                        break;
                    }
                }
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
    const OWN: &str = "\
9:name=systemd:/
4:memory:/process_api/abc
3:cpuset:/
1:cpu:/
0::/user.slice
";

    fn settings(args: &[&str]) -> Vec<Setting> {
        args.iter().map(|a| Setting::parse(a).unwrap()).collect()
    }

    fn no_v2(_: &Path) -> Result<String, CgroupError> {
        Ok("hugetlb pids".into())
    }

    #[test]
    fn setting_shapes() {
        let s = Setting::parse("cpuset.cpus=0-1").unwrap();
        assert_eq!(
            (s.controller.as_str(), s.file.as_str(), s.value.as_str()),
            ("cpuset", "cpuset.cpus", "0-1")
        );
        assert!(matches!(
            Setting::parse("memory.limit_in_bytes=1=2"),
            Err(CgroupError::Format(_))
        ));
        assert!(Setting::parse("cpu.cfs_quota_us=-1").is_ok());
        assert!(matches!(
            Setting::parse("cpuset.cpus"),
            Err(CgroupError::Format(_))
        ));
        assert!(matches!(
            Setting::parse("cpuset.cpus="),
            Err(CgroupError::Format(_))
        ));
        for bad in [
            "cpusetcpus=1",
            "../x.y=1",
            "cpuset./cpus=1",
            ".cpus=1",
            "cpu.=1",
            "Cpu.shares=1",
        ] {
            assert!(
                matches!(Setting::parse(bad), Err(CgroupError::File(_))),
                "{bad}"
            );
        }
        let err = Setting::parse("nodot=1").unwrap_err().to_string();
        assert!(err.contains("nodot"), "{err}");
    }

    #[test]
    fn parent_paths() {
        assert_eq!(parse_parent("tessera").unwrap(), PathBuf::from("tessera"));
        assert_eq!(parse_parent("a/b").unwrap(), PathBuf::from("a/b"));
        for bad in ["", "/abs", "a/../b", "./a", ".."] {
            assert!(parse_parent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn v1_paths_per_controller() {
        let plan = CgroupPlan::from_parts(
            CgroupVersion::V1,
            "tessera".into(),
            &settings(&["cpuset.cpus=0", "cpu.shares=100", "cpuset.mems=0"]),
            MOUNTS,
            OWN,
            no_v2,
        )
        .unwrap();
        assert_eq!(plan.hierarchies.len(), 2);
        assert_eq!(
            plan.dirs("vm1"),
            [
                PathBuf::from("/sys/fs/cgroup/cpuset/tessera/vm1"),
                PathBuf::from("/sys/fs/cgroup/cpu/tessera/vm1")
            ]
        );
        assert_eq!(plan.hierarchies[0].settings.len(), 2);
        assert_eq!(
            plan.hierarchies[0].original,
            PathBuf::from("/sys/fs/cgroup/cpuset/")
        );
        // A backend's cgroup is a child of the VM's, with no values of its
        // own: `a`'s device `b` and VM `a-b` cannot meet.
        let nested = plan.nested("vm1");
        assert!(nested.hierarchies.iter().all(|h| h.settings.is_empty()));
        assert_eq!(
            nested.dirs("disk"),
            [
                PathBuf::from("/sys/fs/cgroup/cpuset/tessera/vm1/disk"),
                PathBuf::from("/sys/fs/cgroup/cpu/tessera/vm1/disk")
            ]
        );
        assert_ne!(plan.nested("a").dirs("b"), plan.dirs("a-b"));
        // The caller's own cgroup is found per controller.
        assert_eq!(
            own_cgroup(OWN, Some("memory")).unwrap(),
            PathBuf::from("process_api/abc")
        );
        assert_eq!(own_cgroup(OWN, None).unwrap(), PathBuf::from("user.slice"));
    }

    #[test]
    fn v1_unmounted_controller() {
        let err = CgroupPlan::from_parts(
            CgroupVersion::V1,
            "tessera".into(),
            &settings(&["hugetlb.limit=1"]),
            MOUNTS,
            OWN,
            no_v2,
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::NotMountedV1 { .. }));
        assert!(err.to_string().contains("hugetlb.limit=1"), "{err}");
    }

    #[test]
    fn v2_one_hierarchy() {
        let plan = CgroupPlan::from_parts(
            CgroupVersion::V2,
            "a/b".into(),
            &settings(&["pids.max=10", "hugetlb.2MB.max=0"]),
            MOUNTS,
            OWN,
            no_v2,
        )
        .unwrap();
        assert_eq!(
            plan.dirs("vm"),
            [PathBuf::from("/sys/fs/cgroup/unified/a/b/vm")]
        );
        assert_eq!(plan.hierarchies[0].controllers, ["pids", "hugetlb"]);
        // The VM's cgroup holds the VMM: no controller is enabled below it.
        let nested = plan.nested("vm");
        assert!(nested.hierarchies[0].controllers.is_empty());
        assert_eq!(
            nested.dirs("eth0"),
            [PathBuf::from("/sys/fs/cgroup/unified/a/b/vm/eth0")]
        );
        assert_eq!(
            plan.hierarchies[0].original,
            PathBuf::from("/sys/fs/cgroup/unified/user.slice")
        );
        let err = CgroupPlan::from_parts(
            CgroupVersion::V2,
            "a".into(),
            &settings(&["cpu.weight=10"]),
            MOUNTS,
            OWN,
            no_v2,
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::NotAvailableV2 { .. }), "{err}");
        let err = CgroupPlan::from_parts(
            CgroupVersion::V2,
            "a".into(),
            &settings(&["pids.max=1"]),
            "cgroup /x cgroup rw,cpu 0 0\n",
            OWN,
            no_v2,
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::NoV2Mount));
    }

    #[test]
    fn versions() {
        assert_eq!(CgroupVersion::parse("1").unwrap(), CgroupVersion::V1);
        assert_eq!(CgroupVersion::parse("2").unwrap(), CgroupVersion::V2);
        assert!(CgroupVersion::parse("3")
            .unwrap_err()
            .to_string()
            .contains("\"3\""));
    }

    #[test]
    fn inherit_walks_up_and_fills_levels() {
        let root = std::env::temp_dir().join(format!("jailer-inherit-{}", std::process::id()));
        let leaf = root.join("p").join("leaf");
        fs::create_dir_all(&leaf).unwrap();
        fs::write(root.join("cpuset.cpus"), "0-1\n").unwrap();
        fs::write(root.join("p").join("cpuset.cpus"), "\n").unwrap();
        fs::write(leaf.join("cpuset.cpus"), "").unwrap();
        inherit_from_parent(&leaf, "cpuset.cpus", &root).unwrap();
        assert_eq!(
            fs::read_to_string(leaf.join("cpuset.cpus")).unwrap(),
            "0-1\n"
        );
        assert_eq!(
            fs::read_to_string(root.join("p/cpuset.cpus")).unwrap(),
            "0-1\n"
        );
        fs::write(root.join("cpuset.cpus"), "").unwrap();
        fs::write(root.join("p/cpuset.cpus"), "").unwrap();
        fs::write(leaf.join("cpuset.cpus"), "").unwrap();
        assert!(matches!(
            inherit_from_parent(&leaf, "cpuset.cpus", &root),
            Err(CgroupError::Inherit { .. })
        ));
        fs::remove_dir_all(&root).unwrap();
    }
}
