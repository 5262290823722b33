//! The OCI runtime spec of a container created from an image, as `ctr run` builds it (containerd's default
//! Linux spec, its default devices, and the image's configuration): [`build`].

use cedana::error::ErrorKind;
use serde_json::{json, Value};

use super::image::ImageConfig;
use super::users::ProcessUser;
use super::ContainerdError;

/// The PATH a container gets when its image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The capabilities of a container's process (containerd's default set).
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

const READONLY_PATHS: [&str; 5] = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// What the spec is built from.
#[derive(Debug, Clone, Copy)]
pub struct SpecInput<'a> {
    /// The container's id (its hostname, and the last part of its cgroup).
    pub id: &'a str,
    /// containerd's namespace (the first part of its cgroup).
    pub namespace: &'a str,
    pub image: &'a ImageConfig,
    /// The process's arguments; the image's entrypoint and command when empty.
    pub args: &'a [String],
    /// `KEY=VALUE` pairs set over the image's environment.
    pub env: &'a [String],
    /// The process's user and groups, resolved from the image's `User` against its /etc/passwd and
    /// /etc/group ([`super::users::resolve_in_snapshot`]).
    pub user: &'a ProcessUser,
}

/// The runtime spec of the container (the rootfs is `rootfs` in the bundle, as containerd's shims expect).
pub fn build(input: SpecInput<'_>) -> Result<Value, ContainerdError> {
    let image = input.image;
    let args = if input.args.is_empty() {
        let mut all = image.entrypoint.clone().unwrap_or_default();
        all.extend(image.cmd.clone().unwrap_or_default());
        all
    } else {
        input.args.to_vec()
    };
    if args.is_empty() {
        return Err(ContainerdError::new(
            ErrorKind::InvalidArgument,
            "the image has no entrypoint or command: give the program to run after `--`",
        ));
    }
    let mut env = vec![DEFAULT_PATH.to_string()];
    for var in image.env.iter().flatten().chain(input.env) {
        set_env(&mut env, var)?;
    }
    let cwd = image.working_dir.as_deref().filter(|d| !d.is_empty()).unwrap_or("/");
    let caps = DEFAULT_CAPS.to_vec();
    let namespaces: Vec<Value> = ["pid", "ipc", "uts", "mount", "network"].iter().map(|t| json!({ "type": t })).collect();
    Ok(json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": input.user.to_json(),
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true,
        },
        "root": { "path": "rootfs" },
        "hostname": input.id,
        "mounts": default_mounts(),
        "linux": {
            "resources": { "devices": device_rules() },
            "cgroupsPath": format!("/{}/{}", input.namespace, input.id),
            "namespaces": namespaces,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }))
}

/// Sets `var` (`KEY=VALUE`) in `env`, replacing an earlier value of KEY.
fn set_env(env: &mut Vec<String>, var: &str) -> Result<(), ContainerdError> {
    let Some((key, _)) = var.split_once('=').filter(|(k, _)| !k.is_empty()) else {
        return Err(ContainerdError::new(ErrorKind::InvalidArgument, format!("environment variable {var:?} is not KEY=VALUE")));
    };
    let prefix = format!("{key}=");
    match env.iter_mut().find(|e| e.starts_with(&prefix)) {
        Some(old) => var.clone_into(old),
        None => env.push(var.to_string()),
    }
    Ok(())
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Value {
    json!({ "destination": destination, "type": kind, "source": source, "options": options })
}

/// containerd's default mounts, and the cgroup filesystem read-only.
fn default_mounts() -> Vec<Value> {
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
        mount("/dev/pts", "devpts", "devpts", &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
        mount("/sys/fs/cgroup", "cgroup", "cgroup", &["nosuid", "noexec", "nodev", "relatime", "ro"]),
        mount("/run", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
    ]
}

/// The device cgroup: everything denied but the default character devices (null, zero, full, random,
/// urandom, tty, the terminal's pts and ptmx).
fn device_rules() -> Vec<Value> {
    let allow =
        |major: i64, minor: Option<i64>| json!({ "allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm" });
    vec![
        json!({ "allow": false, "access": "rwm" }),
        allow(1, Some(3)),
        allow(1, Some(5)),
        allow(1, Some(7)),
        allow(1, Some(8)),
        allow(1, Some(9)),
        allow(5, Some(0)),
        allow(5, Some(1)),
        allow(5, Some(2)),
        allow(136, None),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn spec(image: &ImageConfig, args: &[&str], env: &[&str]) -> Value {
        let user = ProcessUser::default();
        build(SpecInput { id: "c1", namespace: "ns", image, args: &strings(args), env: &strings(env), user: &user }).unwrap()
    }

    fn busybox() -> ImageConfig {
        ImageConfig { env: Some(strings(&["PATH=/bin", "A=1"])), cmd: Some(strings(&["/bin/sh"])), ..Default::default() }
    }

    #[test]
    fn the_image_gives_the_process_unless_arguments_are_given() {
        let image = ImageConfig {
            entrypoint: Some(strings(&["/entry", "-x"])),
            cmd: Some(strings(&["serve"])),
            working_dir: Some("/app".into()),
            ..Default::default()
        };
        let s = spec(&image, &[], &[]);
        assert_eq!(s["process"]["args"], json!(["/entry", "-x", "serve"]));
        assert_eq!(s["process"]["cwd"], "/app");
        let s = spec(&image, &["/bin/sh", "-c", "true"], &[]);
        assert_eq!(s["process"]["args"], json!(["/bin/sh", "-c", "true"]), "ctr run replaces entrypoint and command");
        let user = ProcessUser::default();
        let err = build(SpecInput { id: "c", namespace: "n", image: &ImageConfig::default(), args: &[], env: &[], user: &user })
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn the_environment_is_the_default_path_then_the_image_then_the_flags() {
        let s = spec(&busybox(), &[], &["A=2", "B=3"]);
        assert_eq!(s["process"]["env"], json!(["PATH=/bin", "A=2", "B=3"]));
        let s = spec(&ImageConfig { cmd: Some(strings(&["x"])), ..Default::default() }, &[], &[]);
        assert_eq!(s["process"]["env"], json!([DEFAULT_PATH]));
        let user = ProcessUser::default();
        let bad =
            build(SpecInput { id: "c", namespace: "n", image: &busybox(), args: &[], env: &strings(&["NOVALUE"]), user: &user });
        assert_eq!(bad.unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn the_container_is_named_and_placed_as_containerd_does() {
        let s = spec(&busybox(), &[], &[]);
        assert_eq!(s["root"]["path"], "rootfs");
        assert_eq!(s["hostname"], "c1");
        assert_eq!(s["linux"]["cgroupsPath"], "/ns/c1");
        assert_eq!(s["process"]["cwd"], "/");
        assert_eq!(s["process"]["terminal"], false);
        let namespaces: Vec<&str> =
            s["linux"]["namespaces"].as_array().unwrap().iter().map(|n| n["type"].as_str().unwrap()).collect();
        assert_eq!(namespaces, ["pid", "ipc", "uts", "mount", "network"]);
        let mounts: Vec<&str> = s["mounts"].as_array().unwrap().iter().map(|m| m["destination"].as_str().unwrap()).collect();
        for wanted in ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"] {
            assert!(mounts.contains(&wanted), "{wanted} in {mounts:?}");
        }
        let caps = s["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(caps.len(), DEFAULT_CAPS.len());
        assert!(caps.contains(&json!("CAP_KILL")) && !caps.contains(&json!("CAP_SYS_ADMIN")));
        assert!(s["linux"]["maskedPaths"].as_array().unwrap().contains(&json!("/proc/kcore")));
        assert!(s["linux"]["readonlyPaths"].as_array().unwrap().contains(&json!("/proc/sys")));
        assert_eq!(s["linux"]["resources"]["devices"][0], json!({ "allow": false, "access": "rwm" }));
    }

    #[test]
    fn the_resolved_user_is_the_process_user() {
        let root = spec(&busybox(), &[], &[]);
        assert_eq!(root["process"]["user"], json!({ "uid": 0, "gid": 0 }), "no additionalGids when there are none");
        let user = ProcessUser { uid: 1234, gid: 2345, additional_gids: vec![3456, 10] };
        let s = build(SpecInput { id: "c", namespace: "n", image: &busybox(), args: &[], env: &[], user: &user }).unwrap();
        assert_eq!(s["process"]["user"], json!({ "uid": 1234, "gid": 2345, "additionalGids": [3456, 10] }));
    }
}
