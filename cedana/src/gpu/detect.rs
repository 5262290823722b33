//! Recognising CUDA processes from /proc: the CUDA driver library mapped (`libcuda.so*`), or an open
//! NVIDIA device file (a character device named `nvidia*`: `/dev/nvidia0`, `nvidiactl`, `nvidia-uvm`).
//! Reads two small /proc files per process and allocates little: measured well under 2 ms for a tree of
//! ordinary processes (scripts/bench-gpu.sh).

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Whether the process `pid` uses a GPU through CUDA. A process that is gone uses none.
pub fn is_gpu_process(pid: i32) -> bool {
    maps_libcuda(pid) || has_nvidia_fd(pid)
}

/// The CUDA processes of the tree rooted at `root` (the root first when it is one).
pub fn gpu_processes(root: i32) -> Vec<i32> {
    crate::procfs::tree_pids(root).into_iter().filter(|p| is_gpu_process(*p)).collect()
}

/// Whether `/proc/PID/maps` maps the CUDA driver library.
fn maps_libcuda(pid: i32) -> bool {
    match std::fs::read(format!("/proc/{pid}/maps")) {
        Ok(maps) => maps.split(|b| *b == b'\n').any(is_libcuda_line),
        Err(_) => false,
    }
}

/// A maps line whose path's file name is `libcuda.so` or `libcuda.so.<version>`.
fn is_libcuda_line(line: &[u8]) -> bool {
    let Some(slash) = line.iter().rposition(|b| *b == b'/') else { return false };
    line[slash + 1..].starts_with(b"libcuda.so")
}

/// Whether one of the process's open files is an NVIDIA device file.
fn has_nvidia_fd(pid: i32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| {
        let Ok(target) = std::fs::read_link(fd.path()) else { return false };
        is_nvidia_name(&target) && std::fs::metadata(fd.path()).is_ok_and(|m| m.file_type().is_char_device())
    })
}

/// A path whose file name is an NVIDIA device's (`nvidia0`, `nvidiactl`, `nvidia-uvm`, `nvidia-caps/...`).
fn is_nvidia_name(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("nvidia"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libcuda_is_recognised_by_file_name_only() {
        assert!(is_libcuda_line(b"7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libcuda.so.570.86.10"));
        assert!(is_libcuda_line(b"7f00-7f01 r-xp 00000000 08:01 42 /tmp/x/libcuda.so.1"));
        assert!(!is_libcuda_line(b"7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/libcudart.so.12"));
        assert!(!is_libcuda_line(b"7f00-7f01 r-xp 00000000 08:01 42 /opt/libcuda.so.d/other.so"));
        assert!(!is_libcuda_line(b"7f00-7f01 rw-p 00000000 00:00 0 [heap]"));
    }

    #[test]
    fn ordinary_processes_and_missing_ones_use_no_gpu() {
        assert!(!is_gpu_process(std::process::id() as i32));
        assert!(!is_gpu_process(i32::MAX));
        assert!(gpu_processes(std::process::id() as i32).is_empty());
        assert!(is_nvidia_name(Path::new("/dev/nvidia0")) && is_nvidia_name(Path::new("/dev/nvidia-uvm")));
        assert!(!is_nvidia_name(Path::new("/dev/null")));
    }
}
