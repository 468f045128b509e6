//! Host paths a resource names, checked when it is configured: what kind
//! of file a path is, and opening it without blocking (a FIFO would wait
//! for its other end forever).

use std::fs::{File, FileType, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::sys::stat::SFlag;

/// Why a host path cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    #[error("cannot be opened: {0}")]
    Open(std::io::Error),
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is {0}, not a regular file or a block device")]
    NotADisk(&'static str),
}

/// The kind of file of an `st_mode`'s type bits, as an error message
/// names it.
fn kind_of_mode(kind: SFlag) -> &'static str {
    match kind {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a Unix socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFLNK => "a symbolic link",
        _ => "a regular file",
    }
}

/// The kind of file, as an error message names it.
pub fn kind_of(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a Unix socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

fn open_nonblocking(path: &Path, write: bool) -> Result<File, HostFileError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(HostFileError::Open)
}

/// Opens `path` for reading if it is a regular file.
pub fn open_regular(path: &Path) -> Result<File, HostFileError> {
    let file = open_nonblocking(path, false)?;
    let file_type = file.metadata().map_err(HostFileError::Open)?.file_type();
    if !file_type.is_file() {
        return Err(HostFileError::NotRegular(kind_of(file_type)));
    }
    Ok(file)
}

/// Checks that `path` is a regular file or a block device that can be
/// opened for reading, and for writing unless `read_only`.
pub fn check_disk(path: &Path, read_only: bool) -> Result<(), HostFileError> {
    // The kind first, through an O_PATH descriptor (fstat, not stat, so
    // that a confined VMM thread can check a drive it hot-plugs): opening
    // a FIFO or a socket for writing has side effects (or fails with a
    // less clear error).
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NONBLOCK)
        .open(path)
        .map_err(HostFileError::Open)?;
    let stat = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&handle))
        .map_err(|e| HostFileError::Open(e.into()))?;
    let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    if kind != SFlag::S_IFREG && kind != SFlag::S_IFBLK {
        return Err(HostFileError::NotADisk(kind_of_mode(kind)));
    }
    open_nonblocking(path, !read_only).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_open_as_regular() {
        let file = tempfile_path();
        assert!(open_regular(&file).is_ok());
        let err = open_regular(Path::new("/")).unwrap_err().to_string();
        assert_eq!(err, "is a directory, not a regular file");
        let err = open_regular(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "is a character device, not a regular file");
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn disks_are_files_or_block_devices() {
        let file = tempfile_path();
        assert!(check_disk(&file, false).is_ok());
        assert_eq!(
            check_disk(Path::new("/dev/null"), true)
                .unwrap_err()
                .to_string(),
            "is a character device, not a regular file or a block device"
        );
        assert_eq!(
            check_disk(Path::new("/tmp"), true).unwrap_err().to_string(),
            "is a directory, not a regular file or a block device"
        );
        std::fs::remove_file(file).unwrap();
    }

    fn tempfile_path() -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "tessera-host-file-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, b"x").unwrap();
        path
    }
}
