//! Listening sockets that CRIU connects to, in folders whose paths may be longer than a socket address
//! holds.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The longest path a Unix socket address holds (`sun_path` less its terminating zero).
const MAX_SOCKET_PATH: usize = 107;

/// Listen on a socket named `name` in `dir`. A path longer than a socket address holds is reached through
/// a descriptor of `dir` (`/proc/PID/fd/N/NAME`, see [`short_dir`]), so a deep scratch folder works as well as a short one:
/// CRIU connects by short paths of its own (its images folder as `/proc/PID/fd/N`, its work folder as its
/// current one).
pub fn bind_in(dir: &Path, name: &str) -> std::io::Result<UnixListener> {
    // The folder's descriptor, if one is needed, only has to last until the socket is bound.
    let (dir, _held) = short_dir(dir, name)?;
    UnixListener::bind(dir.join(name))
}

/// Whether the path of socket `name` in `dir` fits a socket address.
pub fn fits(dir: &Path, name: &str) -> bool {
    dir.join(name).as_os_str().len() <= MAX_SOCKET_PATH
}

/// `dir` by a path short enough for a socket in it: itself when `name` fits, else this process's
/// descriptor of it (`/proc/PID/fd/N`, valid while the returned file stays open).
pub fn short_dir(dir: &Path, name: &str) -> std::io::Result<(std::path::PathBuf, Option<std::fs::File>)> {
    if fits(dir, name) {
        return Ok((dir.to_path_buf(), None));
    }
    let folder = std::fs::File::open(dir)?;
    Ok((format!("/proc/{}/fd/{}", std::process::id(), folder.as_raw_fd()).into(), Some(folder)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_socket_in_a_folder_deeper_than_an_address_holds_is_bound_there() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a".repeat(60)).join("b".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        assert!(deep.join("x.sock").as_os_str().len() > MAX_SOCKET_PATH);
        let listener = bind_in(&deep, "x.sock").unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(deep.join("x.sock")).unwrap().file_type().is_socket(), "in the folder itself");
        // Reached by a short path, as CRIU does (here through a descriptor of the folder).
        let folder = std::fs::File::open(&deep).unwrap();
        let mut client = std::os::unix::net::UnixStream::connect(format!("/proc/self/fd/{}/x.sock", folder.as_raw_fd())).unwrap();
        client.write_all(b"hi").unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let mut got = [0u8; 2];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        let (short_path, held) = short_dir(&deep, "x.sock").unwrap();
        assert!(held.is_some() && fits(&short_path, "x.sock"), "{}", short_path.display());
        assert_eq!(std::fs::canonicalize(&short_path).unwrap(), std::fs::canonicalize(&deep).unwrap());
        assert_eq!(short_dir(root.path(), "x.sock").unwrap().0, root.path());
        // A short path is bound as it is.
        let short = bind_in(root.path(), "y.sock").unwrap();
        assert_eq!(short.local_addr().unwrap().as_pathname(), Some(root.path().join("y.sock").as_path()));
    }
}
