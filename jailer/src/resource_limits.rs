//! Resource limits (`--resource-limit RES=VAL`), as Firecracker's jailer:
//! `fsize` (largest file the process may write, bytes; default: unchanged)
//! and `no-file` (one above the highest fd number; default 2048). Both the
//! soft and the hard limit are set.

use nix::sys::resource::{setrlimit, Resource};

/// The `no-file` limit when none is given.
pub const DEFAULT_NO_FILE: u64 = 2048;

/// Errors in or applying a resource limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceLimitError {
    #[error("invalid resource limit {0:?}: expected RESOURCE=VALUE")]
    Format(String),
    #[error("invalid resource limit {0:?}: unknown resource (known: fsize, no-file)")]
    Resource(String),
    #[error("invalid resource limit {0:?}: the value must be a non-negative integer")]
    Value(String),
    #[error("cannot set the {resource} limit to {value}: {errno}")]
    Set {
        resource: &'static str,
        value: u64,
        errno: nix::Error,
    },
}

/// The limits to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceLimits {
    pub fsize: Option<u64>,
    pub no_file: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            fsize: None,
            no_file: DEFAULT_NO_FILE,
        }
    }
}

impl ResourceLimits {
    /// Parses `--resource-limit` values; later values win.
    pub fn parse(args: &[String]) -> Result<Self, ResourceLimitError> {
        let mut limits = Self::default();
        for arg in args {
            let (name, value) = arg
                .split_once('=')
                .ok_or_else(|| ResourceLimitError::Format(arg.clone()))?;
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ResourceLimitError::Value(arg.clone()));
            }
            let value: u64 = value
                .parse()
                .map_err(|_| ResourceLimitError::Value(arg.clone()))?;
            match name {
                "fsize" => limits.fsize = Some(value),
                "no-file" => limits.no_file = value,
                _ => return Err(ResourceLimitError::Resource(arg.clone())),
            }
        }
        Ok(limits)
    }

    /// Applies the limits to the calling process.
    pub fn install(&self) -> Result<(), ResourceLimitError> {
        let set = |resource, name, value| {
            setrlimit(resource, value, value).map_err(|errno| ResourceLimitError::Set {
                resource: name,
                value,
                errno,
            })
        };
        if let Some(fsize) = self.fsize {
            set(Resource::RLIMIT_FSIZE, "fsize", fsize)?;
        }
        set(Resource::RLIMIT_NOFILE, "no-file", self.no_file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ResourceLimits, ResourceLimitError> {
        ResourceLimits::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_and_defaults() {
        assert_eq!(parse(&[]).unwrap(), ResourceLimits::default());
        assert_eq!(parse(&[]).unwrap().no_file, 2048);
        let limits = parse(&["fsize=1048576", "no-file=100"]).unwrap();
        assert_eq!(limits.fsize, Some(1048576));
        assert_eq!(limits.no_file, 100);
    }

    #[test]
    fn rejects_bad_limits_naming_them() {
        let err = parse(&["no-file"]).unwrap_err();
        assert_eq!(err, ResourceLimitError::Format("no-file".into()));
        let err = parse(&["no-file=-1"]).unwrap_err();
        assert!(err.to_string().contains("no-file=-1"), "{err}");
        assert!(matches!(
            parse(&["no-file=x"]),
            Err(ResourceLimitError::Value(_))
        ));
        assert!(matches!(
            parse(&["fsize="]),
            Err(ResourceLimitError::Value(_))
        ));
        assert!(matches!(
            parse(&["fsize=99999999999999999999999"]),
            Err(ResourceLimitError::Value(_))
        ));
        assert!(matches!(
            parse(&["cpu=1"]),
            Err(ResourceLimitError::Resource(_))
        ));
    }
}
