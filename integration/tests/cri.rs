//! Kubernetes' CRI path without a cluster: a private containerd with its CRI plugin on, driven by our own CRI
//! client as the kubelet would drive it, with our shim as the runtime handler `cedana` and a locally built
//! pause image as the sandbox image (see `cedana_integration::cri`).
//!
//! A pod's counter container runs on our shim, is checkpointed with `cedana dump containerd` (namespace
//! k8s.io), and a new pod annotated `io.cedana.restore=<checkpoint>` (as a user annotates a pod: the kubelet
//! passes pod annotations only) has its container restored at create (by cedana-runc under our shim), which
//! counts on from where the checkpoint left it; the pod's sandbox (pause) container, whose spec gets the
//! annotation too, starts as usual. The CRI's own CheckpointContainer is called as well: containerd before 2.0
//! answers UNIMPLEMENTED; 2.x writes the archive.
//! The scenario runs twice: on the system's containerd (Debian bookworm's 1.6) and on the containerd 2.x and
//! runc that scripts/setup.sh installs under /opt/cedana/containerd2 (`$CEDANA_CONTAINERD2_PREFIX`); the
//! latter fails when they are missing. On 2.x the new pod also asks for a lazy restore
//! (`io.cedana.restore.lazy=true`): the container runs before its memory has arrived; and the archive of the
//! CRI's CheckpointContainer is restored by containerd itself (a pod's CreateContainer naming it as image),
//! with the base image served by a private registry.
//! Build first, then run as root:
//! `cargo build -p cedana -p cedana-runc -p containerd-shim-cedana-v2 && cargo test -p cedana-integration --test cri`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cedana_integration::cri::{
    container_config, parent_pid, process_name, verbose_info, Containerd, CriContainerd, BUSYBOX_IMAGE, CEDANA_HANDLER,
    CEDANA_RUNTIME, CEDANA_SHIM, NAMESPACE,
};
use cedana_integration::images::{busybox_rootfs, RESTORE_ANNOTATION};
use cedana_integration::registry::Registry;

/// The annotation asking for a lazy restore (cedana-runc's).
const LAZY_ANNOTATION: &str = "io.cedana.restore.lazy";
use cedana_integration::{bin, require_root, success_stdout, wait_for};
use cedana_protos::cri::v1::{ContainerConfig, ContainerState, PodSandboxState};

const T: Duration = Duration::from_secs(30);
/// Counts into a host folder mounted at /out, so that the numbers outlive the container, and to its stdout
/// (the CRI's container log, through the FIFO containerd gives the shim and the pipe the shim puts in between).
const COUNTER: &str = "i=0; while true; do echo $i >> /out/count; echo \"count $i\"; i=$((i+1)); sleep 0.1; done";

/// The numbers written so far to `out/count`.
fn counts(out: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(out.join("count")).unwrap_or_default();
    // A line being written may be cut short: only whole lines count.
    let whole = text.rfind('\n').map(|end| &text[..end]).unwrap_or("");
    whole.lines().map(|l| l.trim().parse().unwrap_or_else(|_| panic!("not a number in the count: {l:?}"))).collect()
}

/// The container's init PID, from the CRI's verbose status.
fn container_pid(d: &CriContainerd, id: &str) -> i32 {
    let status = d.cri.status(id).expect("ContainerStatus");
    let info = verbose_info(&status.info);
    info["pid"].as_i64().unwrap_or_else(|| panic!("a pid in the verbose status of {id}: {info}")) as i32
}

/// The container `id` runs on our shim: containerd records our runtime for it, and its init's parent (the
/// shim, its subreaper) is `containerd-shim-cedana-v2` serving this containerd.
fn assert_runs_on_our_shim(d: &CriContainerd, id: &str) {
    let info = d.ctr_ok(&["container", "info", id]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("ctr container info is JSON");
    assert_eq!(info["Runtime"]["Name"], CEDANA_RUNTIME, "the container's runtime: {}", info["Runtime"]);
    let pid = container_pid(d, id);
    let parent = parent_pid(pid).unwrap_or_else(|| panic!("the container's init {pid} lives"));
    assert_eq!(process_name(parent).as_deref(), Some(CEDANA_SHIM), "the parent {parent} of the container's init {pid}");
    assert!(d.shim_pids().contains(&parent), "the shim {parent} serves our containerd ({:?})", d.shim_pids());
}

/// The major version of containerd from the CRI's Version answer ("1.6.20~ds1", "v2.1.4", ...).
fn major_version(version: &str) -> u32 {
    let digits: String = version.trim_start_matches('v').chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("a containerd version: {version:?}"))
}

/// The only checkpoint `cedana dump` wrote in `dir` under the name `name`.
fn checkpoint_in(dir: &Path, name: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("checkpoint folder")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}."))))
        .collect();
    assert_eq!(found.len(), 1, "one checkpoint named {name} in {}: {found:?}", dir.display());
    found[0].clone()
}

#[test]
fn a_pod_container_checkpointed_by_cedana_is_restored_by_annotation_in_a_new_pod() {
    require_root();
    checkpoint_and_restore_through_the_cri(Containerd::system(), false);
}

#[test]
fn on_containerd_2_a_pod_container_checkpointed_by_cedana_is_restored_by_annotation_in_a_new_pod() {
    require_root();
    checkpoint_and_restore_through_the_cri(Containerd::v2(), true);
}

/// The scenario (see the module's doc) on `containerd`; the restore by annotation is lazy when `lazy`.
fn checkpoint_and_restore_through_the_cri(containerd: Containerd, lazy: bool) {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let major = containerd.major;
    let d = CriContainerd::start_with(&tmp.path().join("containerd"), containerd);
    let version = d.cri.version().expect("Version");
    assert_eq!((version.runtime_name.as_str(), version.runtime_api_version.as_str()), ("containerd", "v1"), "{version:?}");
    assert_eq!(major_version(&version.runtime_version), major, "the CRI runs the containerd we started: {version:?}");

    // On 2.x the image comes from a registry of ours (its restore of a CRI checkpoint archive pulls the base
    // image by digest, as a kubelet's node would).
    let registry = (major >= 2).then(|| Registry::start(&tmp.path().join("registry")));
    let image = match &registry {
        Some(r) => {
            let name = format!("{}/cedana-test/busybox-cri:1", r.host());
            d.import(&busybox_rootfs(&tmp.path().join("registry-rootfs")), &name);
            d.ctr_ok(&["image", "push", "--plain-http", &name]);
            name
        }
        None => BUSYBOX_IMAGE.to_string(),
    };

    // (a) A pod on handler `cedana` (host network) whose container counts into the host folder.
    let pod = d.cri.run_pod("counter", "uid-counter-1", "default", &[], CEDANA_HANDLER).expect("RunPodSandbox");
    let pod_status = d.cri.pod_status(&pod).expect("PodSandboxStatus").status.expect("a status");
    assert_eq!(pod_status.runtime_handler, CEDANA_HANDLER);
    assert_eq!(pod_status.state, PodSandboxState::SandboxReady as i32);
    let config = container_config("counter", &image, &["sh", "-c", COUNTER], &[(&out, "/out")]);
    let first = d.cri.create_container(&pod, config.clone()).expect("CreateContainer");
    d.cri.start(&first).expect("StartContainer");
    assert_eq!(d.cri.state(&first).unwrap(), ContainerState::ContainerRunning);
    assert_runs_on_our_shim(&d, &first);
    // The sandbox (pause) runs on our shim as well.
    let sandbox_info = d.ctr_ok(&["container", "info", &pod]);
    assert!(sandbox_info.contains(CEDANA_RUNTIME), "the sandbox's runtime: {sandbox_info}");
    wait_for("the counter to count", T, || (counts(&out).len() >= 10).then_some(()));

    // (b) Checkpoint it with our tooling (the container stops: no --leave-running), with containerd's PATH: it
    // runs the runc that made the container.
    let checkpoints = tmp.path().join("checkpoints");
    let dump = std::process::Command::new(bin("cedana"))
        .env("PATH", &d.path)
        .args(["dump", "containerd", &first, "--address"])
        .arg(&d.socket)
        .args(["--namespace", NAMESPACE, "--dir"])
        .arg(&checkpoints)
        .args(["--name", "cp"])
        .env("CEDANA_LOG_LEVEL", "info")
        .output()
        .expect("run cedana");
    success_stdout(&format!("cedana dump containerd {first} (containerd log: {})", d.log_path().display()), &dump);
    let before = counts(&out);
    let last = *before.last().expect("numbers before the checkpoint");
    assert_eq!(before, (0..=last).collect::<Vec<_>>(), "the count before the checkpoint");
    wait_for("the CRI to see the checkpointed container exit", T, || {
        (d.cri.state(&first).ok()? == ContainerState::ContainerExited).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counts(&out), before, "the checkpointed container counts no more");
    let checkpoint = checkpoint_in(&checkpoints, "cp");
    let checkpoint_path = checkpoint.to_str().expect("utf-8 path");

    // (c) A new pod annotated with the checkpoint (`pod_annotations` of the handler lets it into the specs of
    // the sandbox and of the container, same image, mount and command): the sandbox starts as usual, the
    // container is restored at create and counts on.
    let mut annotations = vec![(RESTORE_ANNOTATION, checkpoint_path)];
    if lazy {
        annotations.push((LAZY_ANNOTATION, "true"));
    }
    let pod2 =
        d.cri.run_pod("counter-restored", "uid-counter-2", "default", &annotations, CEDANA_HANDLER).expect("RunPodSandbox");
    let sandbox_spec = &verbose_info(&d.cri.pod_status(&pod2).expect("PodSandboxStatus").info)["runtimeSpec"];
    assert_eq!(
        sandbox_spec["annotations"][RESTORE_ANNOTATION], checkpoint_path,
        "the sandbox's spec: {}",
        sandbox_spec["annotations"]
    );
    let second = d.cri.create_container(&pod2, config.clone()).expect("CreateContainer of the restored container");
    let spec = &verbose_info(&d.cri.status(&second).expect("ContainerStatus").info)["runtimeSpec"];
    assert_eq!(
        spec["annotations"][RESTORE_ANNOTATION], checkpoint_path,
        "the pod's annotation reaches the container's spec: {}",
        spec["annotations"]
    );
    d.cri.start(&second).expect("StartContainer of the restored container");
    assert_eq!(d.cri.state(&second).unwrap(), ContainerState::ContainerRunning);
    assert_runs_on_our_shim(&d, &second);
    // cedana-runc says in its log (the shim gives it `runtime.log` in the bundle) how it restored the container.
    let runtime_log = d.dir.join("state/io.containerd.runtime.v2.task").join(NAMESPACE).join(&second).join("runtime.log");
    let said = std::fs::read_to_string(&runtime_log).unwrap_or_default();
    assert_eq!(said.contains("then its memory lazily"), lazy, "lazy: {lazy}; {}: {said}", runtime_log.display());
    wait_for("the restored counter to count", T, || (counts(&out).len() >= before.len() + 10).then_some(()));
    let after = counts(&out);
    assert_eq!(after[..before.len()], before[..], "the numbers before the checkpoint stay");
    let resumed = after[before.len()];
    eprintln!("checkpointed at {last}; the restored container wrote {resumed}..{}", after[after.len() - 1]);
    assert!(resumed > last, "the restored counter goes on from {last} (a fresh start writes 0): it wrote {resumed}");
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "no number lost or repeated across the restore: {after:?}");
    // The restored container's stdout reaches its own CRI log (the restore reconnected it to the new pipe).
    let log = d.cri.pod_log_dir("counter-restored", "uid-counter-2", "default").join("counter.log");
    let logged = wait_for("the restored container's output in its CRI log", T, || {
        let text = std::fs::read_to_string(&log).ok()?;
        let n: Vec<u64> = text.lines().filter_map(|l| l.split("count ").nth(1)?.trim().parse().ok()).collect();
        (n.len() >= 3).then_some(n)
    });
    assert!(logged[0] > last, "the log goes on from the checkpoint: {logged:?}");

    // (d) The CRI's own CheckpointContainer: containerd before 2.0 does not implement it; 2.x writes the
    // checkpoint archive to the location.
    let location = tmp.path().join("cri-checkpoint.tar");
    let answer = d.cri.checkpoint(&second, &location, 30);
    eprintln!("CheckpointContainer on containerd {}: {answer:?}", version.runtime_version);
    if major_version(&version.runtime_version) < 2 {
        let status = answer.expect_err("containerd 1.x has no CheckpointContainer");
        assert_eq!(status.code(), tonic::Code::Unimplemented, "CheckpointContainer on {}: {status:?}", version.runtime_version);
        assert!(!location.exists(), "no archive was written");
    } else {
        answer.expect("CheckpointContainer");
        let size = std::fs::metadata(&location).map(|m| m.len()).unwrap_or(0);
        assert!(size > 0, "CheckpointContainer wrote the archive {}", location.display());
    }
    assert_eq!(d.cri.state(&second).unwrap(), ContainerState::ContainerRunning, "the container runs on");
    let mut restored_from_cri = None;
    if major >= 2 {
        restored_from_cri = Some(restore_cri_archive(&d, &second, &location, &config, &out));
    }

    // (e) Clean up through the CRI, as the kubelet deletes pods: stop and remove the containers, then the pods.
    if restored_from_cri.is_none() {
        d.cri.stop(&second, 0).expect("StopContainer");
    }
    assert_eq!(d.cri.state(&second).unwrap(), ContainerState::ContainerExited);
    for id in [&first, &second] {
        d.cri.remove(id).expect("RemoveContainer");
    }
    let (third, pod3) = restored_from_cri.unzip();
    if let Some(third) = &third {
        d.cri.stop(third, 0).expect("StopContainer");
        d.cri.remove(third).expect("RemoveContainer");
    }
    for pod in [Some(&pod), Some(&pod2), pod3.as_ref()].into_iter().flatten() {
        d.cri.stop_pod(pod).expect("StopPodSandbox");
        d.cri.remove_pod(pod).expect("RemovePodSandbox");
    }
    assert_eq!(d.cri.list_containers(None).unwrap().len(), 0, "no container left");
    assert_eq!(d.cri.list_pods().unwrap().len(), 0, "no pod left");
    wait_for("the shims to exit", T, || d.shim_pids().is_empty().then_some(()));
    let mounts = d.mounts();
    assert!(mounts.is_empty(), "nothing left mounted under containerd's folder: {mounts:?}");
    eprintln!("CRI test on containerd {} took {:?}", version.runtime_version, started.elapsed());
}

/// Checkpoint-on-stop the way the kubelet stops a pod's container (StopContainer: SIGTERM, then SIGKILL after
/// the grace period): the pod's annotation reaches the container's spec, the shim checkpoints it at the first
/// signal under the pod's stable name (`<namespace>_<pod>_<container>`; the sandbox is not checkpointed), and
/// the pod's next incarnation, annotated with that name, resumes from it. On containerd 1.6 and on 2.x.
#[test]
fn a_stopped_pod_container_is_checkpointed_under_its_pod_name_and_the_next_pod_resumes_from_it() {
    require_root();
    checkpoint_on_stop_through_the_cri(Containerd::system());
}

#[test]
fn on_containerd_2_a_stopped_pod_container_is_checkpointed_under_its_pod_name_and_the_next_pod_resumes_from_it() {
    require_root();
    checkpoint_on_stop_through_the_cri(Containerd::v2());
}

fn checkpoint_on_stop_through_the_cri(containerd: Containerd) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let stops = tmp.path().join("stops");
    std::fs::create_dir_all(&out).unwrap();
    let d = CriContainerd::start_with(&tmp.path().join("containerd"), containerd);
    let on_stop = ("io.cedana.checkpoint-on-stop", stops.to_str().unwrap());
    let pod = d.cri.run_pod("web-0", "uid-web-1", "default", &[on_stop], CEDANA_HANDLER).expect("RunPodSandbox");
    let config = container_config("app", BUSYBOX_IMAGE, &["sh", "-c", COUNTER], &[(&out, "/out")]);
    let first = d.cri.create_container(&pod, config.clone()).expect("CreateContainer");
    d.cri.start(&first).expect("StartContainer");
    wait_for("the counter to count", T, || (counts(&out).len() >= 5).then_some(()));
    let before_stop = *counts(&out).last().unwrap();
    // The shell (the container's init) ignores SIGTERM: SIGKILL ends it after the 1 s grace period.
    d.cri.stop(&first, 1).expect("StopContainer");
    let named = stops.join("default_web-0_app");
    assert!(named.join("cedana-checkpoint.tar.zst").is_file(), "checkpointed under the pod's name");
    let entries: Vec<_> = std::fs::read_dir(&stops).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(entries.len(), 1, "only the container, not the sandbox: {entries:?}");
    let last = *counts(&out).last().unwrap();
    d.cri.remove(&first).expect("RemoveContainer");
    d.cri.stop_pod(&pod).expect("StopPodSandbox");
    d.cri.remove_pod(&pod).expect("RemovePodSandbox");

    let before = counts(&out).len();
    let restore = (RESTORE_ANNOTATION, named.to_str().unwrap());
    let pod2 = d.cri.run_pod("web-0", "uid-web-2", "default", &[restore], CEDANA_HANDLER).expect("RunPodSandbox");
    let second = d.cri.create_container(&pod2, config).expect("CreateContainer");
    d.cri.start(&second).expect("StartContainer");
    wait_for("the restored counter to count", T, || (counts(&out).len() > before + 3).then_some(()));
    let after = counts(&out)[before..].to_vec();
    assert!(after[0] >= before_stop && after[0] <= last + 1, "resumed from the stop's checkpoint: {after:?}");
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");
    d.cri.stop(&second, 1).expect("StopContainer");
    d.cri.remove(&second).expect("RemoveContainer");
    d.cri.stop_pod(&pod2).expect("StopPodSandbox");
    d.cri.remove_pod(&pod2).expect("RemovePodSandbox");
}

/// containerd 2.x's own restore of a CRI checkpoint archive (what CheckpointContainer wrote at `archive`): the
/// checkpointed container is stopped, and a new pod's CreateContainer names the archive as its image, as the
/// kubelet's restore does; the container, on our shim, counts on from a number the checkpointed one had
/// reached. Returns the new container and its pod.
fn restore_cri_archive(
    d: &CriContainerd,
    checkpointed: &str,
    archive: &Path,
    config: &ContainerConfig,
    out: &Path,
) -> (String, String) {
    d.cri.stop(checkpointed, 0).expect("StopContainer");
    let reached = counts(out);
    let pod = d.cri.run_pod("counter-cri", "uid-counter-3", "default", &[], CEDANA_HANDLER).expect("RunPodSandbox");
    let mut config = config.clone();
    config.image.as_mut().expect("an image").image = archive.to_string_lossy().into_owned();
    let id = d.cri.create_container(&pod, config).unwrap_or_else(|e| {
        panic!(
            "CreateContainer from the CRI checkpoint archive: {e:?}; images: {}; containerd log: {}",
            d.ctr_ok(&["image", "ls"]),
            d.log_path().display()
        )
    });
    d.cri.start(&id).unwrap_or_else(|e| {
        panic!("StartContainer of the restored container: {e:?}; containerd log: {}", d.log_path().display())
    });
    assert_runs_on_our_shim(d, &id);
    let after = wait_for("the counter restored from the CRI archive to count", T, || {
        let v = counts(out);
        (v.len() >= reached.len() + 5).then_some(v)
    });
    let resumed = after[reached.len()];
    assert!(resumed > 0 && reached.contains(&(resumed - 1)), "it counts on from {} (a fresh start writes 0)", resumed - 1);
    let tail = &after[reached.len()..];
    assert!(tail.windows(2).all(|w| w[1] == w[0] + 1), "and on without a gap: {tail:?}");
    (id, pod)
}
