//! Files the VMM writes as it runs: the log, the metrics and the serial
//! output. Each may be a FIFO, so each is opened and written without
//! blocking: a FIFO nobody reads fails to open, and a full one drops what
//! does not fit instead of stalling the thread that writes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens `path` for appending, creating a regular file if it is missing.
/// A FIFO that no process has open for reading is refused (ENXIO).
pub fn open_nonblocking_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ENXIO) => {
                io::Error::other("it is a FIFO that no process has open for reading")
            }
            _ => err,
        })
}

/// What became of one write to a non-blocking file.
#[derive(Debug)]
pub enum WriteOutcome {
    Written,
    /// The reader is behind and the pipe is full: the bytes were dropped.
    Dropped,
    Failed(io::Error),
}

/// Writes `bytes` whole or, if the pipe is full, not at all beyond what
/// fit; never waits.
pub fn write_or_drop(file: &mut File, bytes: &[u8]) -> WriteOutcome {
    match file.write_all(bytes) {
        Ok(()) => WriteOutcome::Written,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => WriteOutcome::Dropped,
        Err(err) => WriteOutcome::Failed(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn fifo(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("fifo");
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: c_path is a valid NUL-terminated string.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        path
    }

    #[test]
    fn a_fifo_without_reader_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_nonblocking_append(&fifo(dir.path())).unwrap_err();
        assert!(
            err.to_string().contains("no process has open for reading"),
            "{err}"
        );
    }

    #[test]
    fn a_full_fifo_drops_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path());
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let mut writer = open_nonblocking_append(&path).unwrap();
        let line = [b'x'; 4096];
        let dropped = (0..100)
            .filter(|_| matches!(write_or_drop(&mut writer, &line), WriteOutcome::Dropped))
            .count();
        assert!(dropped > 0, "a 64 KiB pipe took 400 KiB");
    }
}
