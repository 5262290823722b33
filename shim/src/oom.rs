//! OOM events on cgroup v1, as containerd's runc shim publishes them: an eventfd registered for the container's
//! `memory.oom_control` through `cgroup.event_control` fires on every OOM in the cgroup, and each firing is
//! published as a TaskOOM; the watch ends when the cgroup is removed (which fires it too). On a unified (v2)
//! hierarchy, or when the container has no memory cgroup, nothing is watched (no event, no error).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim_protos::events::task::TaskOOM;
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};
use crate::events::{Event, EventSender};

/// Starts watching a container for OOM kills; a seam, so the task logic runs without cgroups.
pub trait OomWatcher: Send + Sync + 'static {
    /// Watch the memory cgroup of the container `id` whose init is `pid` (errors are logged, never fatal).
    fn watch(&self, id: &str, pid: i32);
}

/// The cgroup v1 watcher, publishing to an [`EventSender`].
pub struct CgroupV1Oom {
    events: Arc<dyn EventSender>,
}

impl CgroupV1Oom {
    /// A watcher publishing TaskOOM events to `events`.
    pub fn new(events: Arc<dyn EventSender>) -> CgroupV1Oom {
        CgroupV1Oom { events }
    }
}

impl OomWatcher for CgroupV1Oom {
    fn watch(&self, id: &str, pid: i32) {
        let Some(dir) = memory_cgroup_dir(pid) else {
            log::debug!("no cgroup v1 memory hierarchy for {id} (PID {pid}): no OOM events");
            return;
        };
        let (efd, control) = match register(&dir) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("watching {} for OOM of {id}: {e}", dir.display());
                return;
            }
        };
        let events = self.events.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            // Kept open while the notification is registered.
            let _control = control;
            loop {
                let mut ready = match efd.readable().await {
                    Ok(r) => r,
                    Err(e) => {
                        log::warn!("OOM eventfd of {id}: {e}");
                        return;
                    }
                };
                let count = efd.get_ref().read();
                ready.clear_ready();
                if count.is_err() {
                    continue;
                }
                // The cgroup's removal fires the eventfd as well: the watch ends there.
                if !dir.exists() {
                    log::debug!("memory cgroup of {id} removed: OOM watch ends");
                    return;
                }
                log::info!("OOM in container {id}");
                events.send(Event::Oom(TaskOOM { container_id: id.clone(), ..Default::default() }));
            }
        });
    }
}

/// Register an eventfd for `dir/memory.oom_control`; returns it (readable asynchronously) and the control file.
fn register(dir: &Path) -> Result<(AsyncFd<EventFd>, std::fs::File)> {
    use std::os::fd::AsRawFd;
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|e| Error::internal(format!("eventfd: {e}")))?;
    let control = std::fs::File::open(dir.join("memory.oom_control"))?;
    let mut event_control = std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.event_control"))?;
    event_control.write_all(format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()).as_bytes())?;
    // SAFETY: the EventFd owns its descriptor, which stays open and the same until the AsyncFd drops it.
    let efd = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
        .map_err(|e| Error::internal(format!("registering the OOM eventfd: {e}")))?;
    Ok((efd, control))
}

/// The folder of `pid`'s cgroup in the v1 memory hierarchy, from /proc/PID/cgroup and our mountinfo.
pub fn memory_cgroup_dir(pid: i32) -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    memory_dir_from(&cgroups, &mountinfo)
}

/// [`memory_cgroup_dir`] on the texts of /proc/PID/cgroup and /proc/self/mountinfo.
fn memory_dir_from(cgroups: &str, mountinfo: &str) -> Option<PathBuf> {
    let rel = cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
    })?;
    // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let (fstype, _source, super_opts) = (r.next()?, r.next()?, r.next()?);
        if fstype != "cgroup" || !super_opts.split(',').any(|o| o == "memory") {
            return None;
        }
        let l: Vec<&str> = left.split_whitespace().collect();
        let (root, mountpoint) = (*l.get(3)?, *l.get(4)?);
        let inside = if root == "/" { rel.as_str() } else { rel.strip_prefix(root)? };
        Some(Path::new(mountpoint).join(inside.trim_start_matches('/')))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_folder_from_proc_files() {
        let cgroups = "12:pids:/ns/c1\n4:memory:/ns/c1\n1:name=systemd:/ns/c1\n0::/\n";
        let mountinfo = "30 25 0:26 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids\n\
                         31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory\n";
        assert_eq!(memory_dir_from(cgroups, mountinfo), Some(PathBuf::from("/sys/fs/cgroup/memory/ns/c1")));
        // Unified only: nothing to watch.
        assert_eq!(memory_dir_from("0::/ns/c1\n", "40 25 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"), None);
    }
}
