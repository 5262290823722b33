//! Named pipes for the stdio of an attachable container: containerd's shim opens them by path (as `ctr`'s
//! FIFOs), and the daemon holds the other ends and feeds them to the job's I/O hub, as it does with the
//! pipes of other attachable jobs.
//!
//! Until the task runs, the daemon also holds a placeholder end of each FIFO (a reader of stdin, writers
//! of stdout and stderr): opening the far end never blocks, and our read ends do not see end of file before
//! the shim has opened its ends. [`ContainerFifos::opened`] drops the placeholders once the task runs, so
//! that end of file then means the shim closed the container's output.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use super::attach::RestoreHandle;

/// The FIFOs of one container's stdio, with our ends open.
#[derive(Debug)]
pub struct ContainerFifos {
    pub stdin: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    handle: RestoreHandle,
    placeholders: Vec<OwnedFd>,
}

fn open_fifo(path: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    Ok(open(path, flags | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK, Mode::empty())?)
}

impl ContainerFifos {
    /// Make `dir` (root-only) with fresh `stdin`, `stdout` and `stderr` FIFOs in it (replacing earlier
    /// ones), and open our ends. `log`: where the container's output is also appended.
    pub(crate) fn create(dir: &Path, log: Option<File>) -> io::Result<ContainerFifos> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let path = |name: &str| dir.join(name);
        for name in ["stdin", "stdout", "stderr"] {
            match std::fs::remove_file(path(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            nix::unistd::mkfifo(&path(name), Mode::from_bits_truncate(0o600))?;
        }
        // stdin: a reader of ours first, so that opening the write end does not fail for want of one.
        let stdin_reader = open_fifo(&path("stdin"), OFlag::O_RDONLY)?;
        let stdin = open_fifo(&path("stdin"), OFlag::O_WRONLY)?;
        let stdout = open_fifo(&path("stdout"), OFlag::O_RDONLY)?;
        let stdout_writer = open_fifo(&path("stdout"), OFlag::O_WRONLY)?;
        let stderr = open_fifo(&path("stderr"), OFlag::O_RDONLY)?;
        let stderr_writer = open_fifo(&path("stderr"), OFlag::O_WRONLY)?;
        Ok(ContainerFifos {
            stdin: path("stdin"),
            stdout: path("stdout"),
            stderr: path("stderr"),
            handle: RestoreHandle { stdin, stdout, stderr, log },
            placeholders: vec![stdin_reader, stdout_writer, stderr_writer],
        })
    }

    /// The paths as strings, for the task's stdio (stdin, stdout, stderr).
    pub fn paths(&self) -> [String; 3] {
        [&self.stdin, &self.stdout, &self.stderr].map(|p| p.to_string_lossy().into_owned())
    }

    /// Once the task runs (its shim has opened its ends): drop the placeholders, and our ends for
    /// [`super::supervisor::Supervisor::attach_restored`].
    pub fn opened(self) -> RestoreHandle {
        drop(self.placeholders);
        self.handle
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn the_far_ends_open_without_blocking_and_end_of_file_comes_only_after_the_placeholders_go() {
        let dir = tempfile::tempdir().unwrap();
        let io = dir.path().join("io");
        let fifos = ContainerFifos::create(&io, None).unwrap();
        let mode = std::fs::metadata(&io).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Before the "shim" opens anything our stdout end reads nothing, not end of file.
        let mut buf = [0u8; 16];
        assert_eq!(nix::unistd::read(&fifos.handle.stdout, &mut buf), Err(nix::errno::Errno::EAGAIN));
        // The shim's side: blocking opens that return at once.
        let mut shim_stdin = File::open(&fifos.stdin).unwrap();
        let mut shim_stdout = File::options().write(true).open(&fifos.stdout).unwrap();
        let handle = fifos.opened();
        shim_stdout.write_all(b"out").unwrap();
        assert_eq!(nix::unistd::read(&handle.stdout, &mut buf), Ok(3));
        nix::unistd::write(&handle.stdin, b"in").unwrap();
        let mut got = [0u8; 2];
        shim_stdin.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"in");
        // The shim closes the output: end of file on our end (no placeholder writer is left).
        drop(shim_stdout);
        assert_eq!(nix::unistd::read(&handle.stdout, &mut buf), Ok(0));
        // Creating again replaces the FIFOs.
        drop(handle);
        ContainerFifos::create(&io, None).unwrap();
    }
}
