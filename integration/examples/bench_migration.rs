//! Benchmark (scripts/bench-migration.sh runs it, as root): moving a container that holds SIZE_MIB of memory
//! from node A to node B through an S3-compatible server (integration/src/nodes.rs: two network namespaces
//! with their own containerd, moto on the bridge between them), against a cold start of the same container
//! on node B; and what checkpoint-on-stop adds to stopping such a container.
//!
//! Per round, in an order that alternates:
//! - cold start: `ctr run -d` on B until the workload has written all its memory (its ready file appears);
//! - migration: `cedana dump containerd` on A into the store (zstd), then `cedana restore containerd
//!   --detach` on B until it runs with its memory (and the same with `--lazy`, which returns once the memory
//!   is wholly local);
//! - stop: `ctr task kill -s SIGKILL` until STOPPED, of a container with `io.cedana.checkpoint-on-stop` (to a
//!   local folder) and of one without;
//! - pod deletion through the CRI as the kubelet does it (StopContainer with a grace period, StopPodSandbox,
//!   RemoveContainer, RemovePodSandbox), of a pod annotated `io.cedana.checkpoint-on-stop` and of one without.
//!
//! Environment: SIZE_MIB (default 1024), ROUNDS (default 3), S3_SERVER (moto, the default, or s3s: s3s-fs,
//! which answers a ranged read with the range alone where moto reads the whole object for each). Prints medians
//! and the ratios.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cedana_integration::engines::{put_shim_on_path, Containerd};
use cedana_integration::moto::MotoServer;
use cedana_integration::nodes::Nodes;
use cedana_integration::s3s::S3sServer;
use cedana_integration::wait_for;

const RUNTIME: &str = "io.containerd.cedana.v2";
const IMAGE: &str = "docker.io/cedana/bench-mover:latest";
const T: Duration = Duration::from_secs(600);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Bench {
    size: u64,
    out: PathBuf,
    a: Containerd,
    b: Containerd,
    moto: Store,
    stops: PathBuf,
    _nodes: Nodes,
    _tmp: tempfile::TempDir,
}

/// The S3-compatible server between the nodes.
enum Store {
    Moto(MotoServer),
    S3s(S3sServer),
}

impl Store {
    fn start_on(host: &str) -> Store {
        match std::env::var("S3_SERVER").as_deref() {
            Ok("s3s") => Store::S3s(S3sServer::start_on(host)),
            _ => Store::Moto(MotoServer::start_on(host)),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Store::Moto(m) => m.env(),
            Store::S3s(s) => s.env(),
        }
    }

    /// The environment of whoever reads checkpoints (the restoring CLI, node B's containerd and shims).
    fn read_env(&self) -> Vec<(&'static str, String)> {
        match self {
            Store::Moto(m) => m.env(),
            Store::S3s(s) => s.read_env(),
        }
    }

    fn url(&self, key: &str) -> String {
        match self {
            Store::Moto(m) => m.url(key),
            Store::S3s(s) => s.url(key),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Store::Moto(_) => "moto",
            Store::S3s(_) => "s3s-fs",
        }
    }
}

impl Bench {
    /// `ctr run -d` of the workload as `id` on `ctd`, with `annotations`; returns once it is ready.
    fn run(&self, ctd: &Containerd, id: &str, annotations: &[String]) -> Duration {
        let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", self.out.display());
        let ready = self.out.join(format!("{id}.pid"));
        let _ = std::fs::remove_file(&ready);
        let t = Instant::now();
        let mut cmd = ctd.ctr_cmd(&["run", "--runtime", RUNTIME, "--detach", "--null-io", "--mount", &mount]);
        for a in annotations {
            cmd.args(["--annotation", a]);
        }
        let size = self.size.to_string();
        let pid_file = format!("/out/{id}.pid");
        cmd.args([IMAGE, id, "/bin/workload", &size, &pid_file]);
        let done = cmd.stdin(Stdio::null()).output().expect("ctr run");
        assert!(done.status.success(), "ctr run {id}: {}", String::from_utf8_lossy(&done.stderr));
        wait_for("the workload to be ready", T, || ready.exists().then_some(()));
        t.elapsed()
    }

    fn stop(&self, ctd: &Containerd, id: &str) -> Duration {
        let t = Instant::now();
        ctd.ok(&["task", "kill", "-s", "SIGKILL", id]);
        wait_for("the task to stop", T, || (ctd.task_status(id).as_deref() == Some("STOPPED")).then_some(()));
        let took = t.elapsed();
        ctd.remove(id);
        took
    }

    fn cedana(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(cedana_integration::bin("cedana"));
        cmd.args(args).env("CEDANA_PROFILING_ENABLED", "false");
        let env = if args.first() == Some(&"restore") { self.moto.read_env() } else { self.moto.env() };
        for (k, v) in env {
            cmd.env(k, v);
        }
        cedana_integration::success_stdout(&format!("cedana {args:?}"), &cmd.output().expect("cedana"))
    }

    /// Dump `id` on A into the store, restore it on B: (dump, restore) times.
    fn migrate(&self, id: &str, lazy: bool) -> (Duration, Duration) {
        self.run(&self.a, id, &[]);
        let t = Instant::now();
        let out = self.cedana(&[
            "dump",
            "containerd",
            id,
            "--address",
            self.a.socket.to_str().unwrap(),
            "--namespace",
            &self.a.namespace,
            "--dir",
            &self.moto.url("bench"),
            "--name",
            id,
            "--compression",
            "zstd",
        ]);
        let dump = t.elapsed();
        let url = out.lines().last().and_then(|l| l.split_whitespace().last()).unwrap_or_default().to_string();
        self.a.remove(id);
        let t = Instant::now();
        let mut args = vec![
            "restore",
            "containerd",
            "--path",
            &url,
            "--id",
            id,
            "--address",
            self.b.socket.to_str().unwrap(),
            "--namespace",
            &self.b.namespace,
            "--detach",
        ];
        if lazy {
            args.push("--lazy");
        }
        self.cedana(&args);
        let restore = t.elapsed();
        self.stop(&self.b, id);
        (dump, restore)
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn main() {
    cedana_integration::require_root();
    let size = env_number("SIZE_MIB", 1024);
    let rounds = env_number("ROUNDS", 3) as usize;
    put_shim_on_path();
    let tmp = tempfile::tempdir_in("/var/tmp").expect("a scratch folder");
    let nodes = Nodes::new();
    let moto = Store::start_on(&nodes.gateway);
    eprintln!("object store: {}", moto.name());
    let env = moto.env();
    let a = Containerd::start_in(&tmp.path().join("ctd-a"), &env, Some(&nodes.a.netns));
    let b = Containerd::start_in(&tmp.path().join("ctd-b"), &moto.read_env(), Some(&nodes.b.netns));
    let rootfs = cedana_integration::images::busybox_rootfs(&tmp.path().join("rootfs"));
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench/workload.c");
    let built =
        Command::new("gcc").args(["-static", "-O2", "-o"]).arg(rootfs.join("bin/workload")).arg(&source).status().expect("gcc");
    assert!(built.success(), "compiling {}", source.display());
    a.import(&rootfs, IMAGE);
    b.import(&rootfs, IMAGE);
    let out = tmp.path().join("out");
    let stops = tmp.path().join("stops");
    std::fs::create_dir_all(&out).unwrap();
    let bench = Bench { size, out, a, b, moto, stops, _nodes: nodes, _tmp: tmp };

    let (mut cold, mut dump, mut restore, mut lazy_dump, mut lazy_restore) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut stop_plain, mut stop_checkpointed) = (vec![], vec![]);
    let on_stop = format!("io.cedana.checkpoint-on-stop={}", bench.stops.display());
    for r in 0..rounds {
        let mut steps: Vec<&str> = vec!["cold", "migrate", "lazy", "stop", "stop-cp"];
        let n = steps.len();
        steps.rotate_left(r % n);
        for step in steps {
            let id = format!("{step}-{r}");
            match step {
                "cold" => {
                    cold.push(bench.run(&bench.b, &id, &[]));
                    bench.stop(&bench.b, &id);
                }
                "migrate" => {
                    let (d, rs) = bench.migrate(&id, false);
                    dump.push(d);
                    restore.push(rs);
                }
                "lazy" => {
                    let (d, rs) = bench.migrate(&id, true);
                    lazy_dump.push(d);
                    lazy_restore.push(rs);
                }
                "stop" => {
                    bench.run(&bench.a, &id, &[]);
                    stop_plain.push(bench.stop(&bench.a, &id));
                }
                _ => {
                    bench.run(&bench.a, &id, std::slice::from_ref(&on_stop));
                    stop_checkpointed.push(bench.stop(&bench.a, &id));
                    assert!(bench.stops.join(&id).join("cedana-checkpoint.tar.zst").is_file(), "checkpointed on stop");
                }
            }
        }
    }
    let (cold, dump, restore) = (median(&mut cold), median(&mut dump), median(&mut restore));
    let (lazy_dump, lazy_restore) = (median(&mut lazy_dump), median(&mut lazy_restore));
    let (stop_plain, stop_checkpointed) = (median(&mut stop_plain), median(&mut stop_checkpointed));
    println!("bench-migration: a {size} MiB container (half random), {rounds} alternating rounds, medians");
    println!("  cold start on B                    {}", secs(cold));
    println!(
        "  migration A -> S3 -> B             {} (dump {} + restore {}), {:.2}x the cold start",
        secs(dump + restore),
        secs(dump),
        secs(restore),
        (dump + restore).as_secs_f64() / cold.as_secs_f64()
    );
    println!(
        "  migration with --lazy             {} (dump {} + restore {}), {:.2}x the cold start",
        secs(lazy_dump + lazy_restore),
        secs(lazy_dump),
        secs(lazy_restore),
        (lazy_dump + lazy_restore).as_secs_f64() / cold.as_secs_f64()
    );
    println!("  restore on B alone vs cold start   {:.2}x", restore.as_secs_f64() / cold.as_secs_f64());
    println!(
        "  stop (SIGKILL to STOPPED)          {} plain, {} with checkpoint-on-stop (+{})",
        secs(stop_plain),
        secs(stop_checkpointed),
        secs(stop_checkpointed.saturating_sub(stop_plain))
    );
    let (plain, checkpointed) = pod_deletions(&bench, rounds);
    println!(
        "  pod deletion through the CRI       {} plain, {} with checkpoint-on-stop (+{})",
        secs(plain),
        secs(checkpointed),
        secs(checkpointed.saturating_sub(plain))
    );
}

/// Median times to delete a pod holding the workload through the CRI, without and with checkpoint-on-stop.
fn pod_deletions(bench: &Bench, rounds: usize) -> (Duration, Duration) {
    use cedana_integration::cri::{container_config, Containerd as Which, CriContainerd, BUSYBOX_IMAGE, CEDANA_HANDLER};
    let dir = tempfile::tempdir_in("/var/tmp").expect("a scratch folder");
    let d = CriContainerd::start_with(&dir.path().join("containerd"), Which::system());
    // The static workload from the host, mounted into the busybox image's containers.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(bench._tmp.path().join("rootfs/bin/workload"), bin.join("workload")).unwrap();
    let on_stop = format!("{}/cri-stops", bench.stops.display());
    let (mut plain, mut checkpointed) = (vec![], vec![]);
    for r in 0..rounds * 2 {
        let with = (r % 2 == 1) ^ (r / 2 % 2 == 1);
        let name = format!("pod-{r}");
        let annotations: Vec<(&str, &str)> = if with { vec![("io.cedana.checkpoint-on-stop", &on_stop)] } else { vec![] };
        let pod = d.cri.run_pod(&name, &format!("uid-{r}"), "default", &annotations, CEDANA_HANDLER).expect("RunPodSandbox");
        let ready = format!("/out/{name}.pid");
        let size = bench.size.to_string();
        let config =
            container_config("app", BUSYBOX_IMAGE, &["/w/workload", &size, &ready], &[(&bench.out, "/out"), (&bin, "/w")]);
        let c = d.cri.create_container(&pod, config).expect("CreateContainer");
        d.cri.start(&c).expect("StartContainer");
        let host_ready = bench.out.join(format!("{name}.pid"));
        wait_for("the pod's workload to be ready", T, || host_ready.exists().then_some(()));
        let t = Instant::now();
        d.cri.stop(&c, 30).expect("StopContainer");
        d.cri.stop_pod(&pod).expect("StopPodSandbox");
        d.cri.remove(&c).expect("RemoveContainer");
        d.cri.remove_pod(&pod).expect("RemovePodSandbox");
        let took = t.elapsed();
        if with {
            assert!(Path::new(&on_stop).join(format!("default_{name}_app/cedana-checkpoint.tar.zst")).is_file());
            checkpointed.push(took);
        } else {
            plain.push(took);
        }
    }
    (median(&mut plain), median(&mut checkpointed))
}
