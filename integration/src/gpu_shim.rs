//! A fake-GPU task through containerd and our shim, checkpointed and restored with `ctr`: the round trip the
//! GPU tests share, whatever gives the task its GPU (CDI-style mounts and devices on `ctr run`'s command line,
//! or a runtime hook).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::engines::{put_shim_on_path, Containerd};
use crate::gpu::{app_lines, expected_sum, last_app_line, wait_count, FakeGpu};

/// What differs between the GPU tasks run through our shim.
pub struct ShimGpuTask<'a> {
    /// containerd's environment (it reaches the shim, cedana-runc and their hooks).
    pub env: Vec<(&'static str, String)>,
    /// Folders made in the busybox rootfs (mount points), besides `lib` and `lib64` linked to the host's.
    pub rootfs_dirs: &'a [&'a str],
    /// The image's name and the task's id (the restored task is `ID-restored`).
    pub image: &'a str,
    pub id: &'a str,
    /// `ctr run` flags before the image: mounts, devices, environment.
    pub run_flags: Vec<String>,
    /// Device memory of each fake CUDA process, in MiB.
    pub mib: u32,
}

/// `ctr run --runtime io.containerd.cedana.v2 ... /opt/gpu/gpu-app MIB 1` (a CUDA process and one CUDA child,
/// both counting into the fake's control folder), `ctr container checkpoint --task --rw` (the task runs on
/// with its GPU), SIGKILL and delete, `ctr container restore --live --rw`: both processes go on from the
/// counts they had at the checkpoint, with their device memory. `check(host_pid)` runs on the task's init
/// after it started and on the restored one's.
pub fn round_trip(gpu: &FakeGpu, task: ShimGpuTask, check: impl Fn(i32)) {
    put_shim_on_path();
    let d = Containerd::start_with_env(&gpu.dir.join("containerd"), &task.env);
    let rootfs = crate::images::busybox_rootfs(&gpu.dir.join("rootfs"));
    for dir in task.rootfs_dirs {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::os::unix::fs::symlink("usr/lib", rootfs.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/lib64", rootfs.join("lib64")).unwrap();
    d.import(&rootfs, task.image);

    let app = format!("exec /opt/gpu/gpu-app {} 1 >> /run/fake-cuda/app.log 2>&1", task.mib);
    let mut run: Vec<&str> = vec!["run", "--runtime", "io.containerd.cedana.v2", "--detach", "--null-io"];
    run.extend(task.run_flags.iter().map(String::as_str));
    run.extend([task.image, task.id, "/bin/sh", "-c", &app]);
    d.ok(&run);
    let log = gpu.control_dir.join("app.log");
    let pids = crate::wait_for("both CUDA processes count", Duration::from_secs(30), || {
        let pids: BTreeSet<i32> = app_lines(&log, None).iter().map(|l| l.pid).collect();
        (pids.len() == 2).then_some(pids)
    });
    let host_pid = d.task_pid(task.id);
    check(host_pid);
    // Counts a fresh start would not have: a restore that started over shows.
    let before: Vec<(i32, u64)> = pids.iter().map(|p| (*p, wait_count(&log, *p, 5).count)).collect();

    // ctr container checkpoint --task: the shim checkpoints through cedana-runc, GPU state included; the task runs on.
    let checkpoint = format!("cedana/{}-cp:1", task.id);
    d.ok(&["container", "checkpoint", "--task", "--rw", task.id, &checkpoint]);
    assert_eq!(d.task_status(task.id).as_deref(), Some("RUNNING"));
    assert_eq!(gpu.state(host_pid).as_deref(), Some("running"), "the task got its GPU back");
    let stopped_at: Vec<(i32, u64)> = pids.iter().map(|p| (*p, last_app_line(&log, Some(*p)).unwrap().count)).collect();
    stop_and_delete(&d, task.id);
    let lines_before = app_lines(&log, None).len();

    // ctr container restore --live: the shim restores through cedana-runc, which puts the GPU state back.
    let restored = format!("{}-restored", task.id);
    d.ok(&["container", "restore", "--live", "--rw", &restored, &checkpoint]);
    assert_eq!(d.task_status(&restored).as_deref(), Some("RUNNING"));
    let restored_pid = d.task_pid(&restored);
    assert_eq!(gpu.state(restored_pid).as_deref(), Some("running"));
    check(restored_pid);
    for (pid, at) in &stopped_at {
        let line = wait_count(&log, *pid, at + 3);
        assert_eq!(line.sum, expected_sum(task.mib, line.count), "device memory of {pid}");
    }
    let after: Vec<_> = app_lines(&log, None).into_iter().skip(lines_before).collect();
    for ((pid, low), (_, high)) in before.iter().zip(&stopped_at) {
        let first = after.iter().find(|l| l.pid == *pid).unwrap();
        assert!(
            first.count > *low && first.count <= high + 1,
            "{pid} continues from its checkpoint (taken between counts {low} and {high}): {first:?}"
        );
    }
    stop_and_delete(&d, &restored);
}

/// SIGKILL a task, wait until it is STOPPED, delete it.
fn stop_and_delete(d: &Containerd, id: &str) {
    d.ok(&["task", "kill", "-s", "SIGKILL", id]);
    crate::wait_for("the task to stop", Duration::from_secs(30), || {
        (d.task_status(id).as_deref() == Some("STOPPED")).then_some(())
    });
    d.ok(&["task", "delete", id]);
}

/// `ctr run --mount` of a bind mount.
pub fn bind(src: &Path, dst: &str, mode: &str) -> String {
    format!("type=bind,src={},dst={dst},options=rbind:{mode}", src.display())
}
