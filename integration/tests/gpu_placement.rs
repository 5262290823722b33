//! Which GPUs a restored workload gets, against the fakes of NVIDIA's stack (integration/fake-gpu) and real
//! runc and CRIU: a container restored by cedana-runc must be given GPUs (by its spec's
//! NVIDIA_VISIBLE_DEVICES) that match the checkpoint's in number and memory; a process restored on a host
//! whose GPUs have other UUIDs has its GPU state remapped onto them (the driver API's GPU pairs), which
//! the cuda-checkpoint utility cannot do.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use cedana_integration::engines::{piped, RuncRoot};
use cedana_integration::gpu::{
    app_lines, cdi_bundle, cedana_env, cedana_gpu, container_lines, expected_sum, wait_container_counts, wait_count, FakeGpu,
};
use cedana_integration::images::RESTORE_ANNOTATION;
use cedana_integration::{bin, require_root};

/// Device memory of each fake CUDA process, in MiB.
const MIB: u32 = 4;

/// Two GPUs, the second one larger.
const TWO_GPUS: [(&str, &str); 2] = [("FAKE_GPU_COUNT", "2"), ("FAKE_GPU_MEMORY_MIB", "40960,81920")];

/// The UUIDs of another host's single GPU (valid hex: NVIDIA's CUuuid is 16 bytes).
const OTHER_HOST: (&str, &str) = ("FAKE_GPU_UUIDS", "GPU-0e0e0e0e-1111-4222-8333-444444444444");

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
}

#[test]
fn a_container_is_restored_only_onto_gpus_as_large_as_those_it_was_checkpointed_with() {
    require_root();
    let gpu = FakeGpu::new();
    let tmp = gpu.dir.clone();
    let runc = RuncRoot::new(&tmp, bin("cedana-runc"));
    let mut env = cedana_env(&gpu, "cuda-checkpoint");
    env.extend(TWO_GPUS.iter().map(|(k, v)| (*k, v.to_string())));
    let cmd = |args: &[&str]| {
        let mut c = runc.cmd(args);
        c.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        c
    };
    let cid = format!("ced-place-{}", std::process::id());
    let bundle = cdi_bundle(&gpu, MIB, "1", &tmp.join("bundle"));
    runc.track(&cid);
    let mut run = cmd(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), &cid]);
    let lines = piped(&mut run);
    assert!(run.status().unwrap().success(), "{:?}", lines.snapshot());
    drop(run); // Its copy of the pipe's write end: the pipe closes once the container's end is gone.
    wait_container_counts(&lines, 2, 2);
    let images = tmp.join("images");
    let out = cmd(&["checkpoint", "--image-path", images.to_str().unwrap(), &cid]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lines.wait_closed(Duration::from_secs(20));
    let manifest = cedana::checkpoint::read_manifest(&images.join("cedana-checkpoint.tar.zst"), false).unwrap();
    let record = manifest.gpu.expect("a GPU record");
    assert_eq!(record.visible_devices.as_deref(), Some("1"));
    assert_eq!(record.devices.iter().map(|d| (d.index, d.memory_mib)).collect::<Vec<_>>(), [(1, 81920)], "{record:?}");

    // Given GPU 0 (40 GiB) for the checkpoint's GPU 1 (80 GiB): refused before anything runs.
    let small = tmp.join("small");
    let restored = cdi_bundle(&gpu, MIB, "0", &small);
    restored.annotate(RESTORE_ANNOTATION, images.to_str().unwrap());
    let refused = format!("{cid}-small");
    runc.track(&refused);
    let out =
        cmd(&["run", "-d", "--bundle", small.to_str().unwrap(), &refused]).stdin(std::process::Stdio::null()).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "restored onto a smaller GPU");
    assert!(e.contains("NVIDIA_VISIBLE_DEVICES=0") && e.contains("only 40960 MiB") && e.contains("81920 MiB"), "{e}");
    assert!(runc.status(&refused).is_none_or(|s| s == "stopped"), "{:?}", runc.status(&refused));

    // Told to skip the check, the same restore runs, and the processes count on with their device memory.
    let skipped = tmp.join("skipped");
    let restored = cdi_bundle(&gpu, MIB, "0", &skipped);
    restored.annotate(RESTORE_ANNOTATION, images.to_str().unwrap());
    restored.annotate("io.cedana.restore.skip-gpu-check", "true");
    let copy = format!("{cid}-skipped");
    runc.track(&copy);
    let mut run = cmd(&["run", "-d", "--bundle", skipped.to_str().unwrap(), &copy]);
    let after = piped(&mut run);
    assert!(run.status().unwrap().success(), "{:?}", after.snapshot());
    let resumed = wait_container_counts(&after, 2, 0);
    for l in &resumed {
        let first = container_lines(&after).into_iter().find(|x| x.pid == l.pid).unwrap();
        assert!(first.count > 2, "process {} continues from its checkpoint: {first:?}", l.pid);
        assert_eq!(first.sum, expected_sum(MIB, first.count));
    }
    runc.ok(&["kill", &copy, "KILL"]);
}

/// A fake CUDA process (no children) dumped into `gpu.dir/cp.tar`; its PID and last count.
fn dumped_app(gpu: &FakeGpu, log: &Path) -> (i32, u64) {
    let mut child: Child = gpu.app_command(MIB, 0, log).spawn().unwrap();
    let pid = child.id() as i32;
    wait_count(log, pid, 2);
    let dir = gpu.dir.to_str().unwrap();
    let out = cedana_gpu(gpu, "driver", &["dump", "process", &pid.to_string(), "--no-server", "--dir", dir, "--name", "cp"], &[]);
    assert!(out.status.success(), "dump: {}", String::from_utf8_lossy(&out.stderr));
    let _ = child.wait();
    let count = app_lines(log, Some(pid)).last().unwrap().count;
    (pid, count)
}

/// The GPU a fake CUDA process uses, as its restore thread publishes it.
fn gpu_of(gpu: &FakeGpu, pid: i32) -> String {
    std::fs::read_to_string(gpu.control_dir.join(format!("{pid}.gpu"))).unwrap().trim().to_string()
}

#[test]
fn a_process_restored_on_a_host_with_other_gpus_is_remapped_onto_them_by_the_driver_api() {
    require_root();
    let gpu = FakeGpu::new();
    let log = gpu.dir.join("app.log");
    let (pid, count) = dumped_app(&gpu, &log);
    let path = format!("{}/cp.tar", gpu.dir.display());
    let restore = |backend: &str, extra: &[&str], env: &[(&str, &str)]| {
        let args = [&["restore", "process", "--path", &path, "--no-server", "--detach"][..], extra].concat();
        cedana_gpu(&gpu, backend, &args, env)
    };
    let newer = ("FAKE_CUDA_DRIVER_VERSION", "12090");
    let failed = |what: &str, out: &std::process::Output| {
        assert!(!out.status.success(), "{what} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // The utility cannot remap: refused before anything is restored.
    let e = failed("utility restore onto another GPU", &restore("cuda-checkpoint", &[], &[OTHER_HOST, newer]));
    assert!(
        e.contains("cuda-checkpoint") && e.contains("GPU-0e0e0e0e-1111-4222-8333-444444444444") && e.contains("driver"),
        "{e}"
    );
    assert!(!alive(pid), "nothing was restored: {e}");

    // Skipping the check skips the remapping: the fake driver refuses to restore onto a GPU it does not know.
    let e = failed("restore without pairs", &restore("driver", &["--skip-gpu-check"], &[OTHER_HOST, newer]));
    assert!(e.contains("CUDA_ERROR_INVALID_DEVICE") && e.contains("restored processes were killed"), "{e}");
    cedana_integration::wait_for("the half-restored process is gone", Duration::from_secs(10), || (!alive(pid)).then_some(()));

    // A CUDA 12.8 driver has no GPU pairs in its restore arguments: refused by the driver, said so.
    let e = failed("restore with pairs on CUDA 12.8", &restore("driver", &[], &[OTHER_HOST]));
    assert!(e.contains("CUDA_ERROR_INVALID_VALUE") && e.contains("gpuPairs"), "{e}");
    cedana_integration::wait_for("the half-restored process is gone", Duration::from_secs(10), || (!alive(pid)).then_some(()));

    // The driver API with GPU pairs: restored onto the other host's GPU, counting on with its device memory.
    let out = restore("driver", &[], &[OTHER_HOST, newer]);
    assert!(out.status.success(), "remapped restore: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(gpu_of(&gpu, pid), "GPU-0e0e0e0e-1111-4222-8333-444444444444");
    assert_eq!(gpu.state(pid).as_deref(), Some("running"));
    let line = wait_count(&log, pid, count + 2);
    assert_eq!(line.sum, expected_sum(MIB, line.count), "device memory at count {}", line.count);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}

#[test]
fn a_process_restored_on_its_own_gpus_gets_no_pairs() {
    require_root();
    let gpu = FakeGpu::new();
    let log = gpu.dir.join("app.log");
    let (pid, count) = dumped_app(&gpu, &log);
    let before = "GPU-6661e5e0-0000-4000-8000-000000000000";
    let path = format!("{}/cp.tar", gpu.dir.display());
    // CUDA 12.8's driver refuses any pair: a restore on the same GPU passes none.
    let out = cedana_gpu(&gpu, "driver", &["restore", "process", "--path", &path, "--no-server", "--detach"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(gpu_of(&gpu, pid), before);
    wait_count(&log, pid, count + 2);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}
