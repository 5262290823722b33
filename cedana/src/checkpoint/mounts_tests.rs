use super::*;

/// A mountinfo line: id, parent, dev, root, mountpoint, options, separator, type, source, super options.
fn line(id: u32, dev: &str, root: &str, point: &str, fstype: &str) -> String {
    format!("{id} 1 {dev} {root} {point} rw,relatime - {fstype} src rw")
}

fn entries(lines: &[String]) -> Vec<MountEntry> {
    parse_mountinfo(&lines.join("\n"))
}

fn host() -> Vec<MountEntry> {
    entries(&[
        line(1, "8:1", "/", "/", "ext4"),
        line(2, "0:5", "/", "/dev", "devtmpfs"),
        line(3, "0:22", "/", "/proc", "proc"),
        line(4, "0:40", "/", "/opt/local", "ext4"),
        line(5, "8:1", "/srv/data", "/data", "ext4"),
        line(6, "0:99", "/", "/var/lib/docker/overlay2/abc/merged", "overlay"),
    ])
}

fn spec() -> SpecMounts {
    SpecMounts::from_config(&serde_json::json!({
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/opt", "type": "bind", "source": "/opt", "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts/", "type": "bind", "source": "/var/lib/hosts"},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
        ],
        "linux": {"maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"], "devices": [{"path": "/dev/fuse"}]},
    }))
}

#[test]
fn bind_mounts_from_the_host_that_the_spec_does_not_have_are_external() {
    let container = entries(&[
        line(10, "0:99", "/", "/", "overlay"),
        line(11, "0:23", "/", "/proc", "proc"),
        line(12, "0:24", "/", "/dev", "tmpfs"),
        // What the legacy NVIDIA hook adds: a library from the host's root fs, a device node from devtmpfs,
        // a file of /proc/driver/nvidia from the host's proc.
        line(13, "8:1", "/usr/lib/x86_64-linux-gnu/libcuda.so.570.86.10", "/usr/lib/x86_64-linux-gnu/libcuda.so.1", "ext4"),
        line(14, "0:5", "/nvidia0", "/dev/nvidia0", "devtmpfs"),
        line(15, "0:22", "/driver/nvidia/gpus/0000:07:00.0", "/proc/driver/nvidia/gpus/0000:07:00.0", "proc"),
        // A tmpfs of the container's own (the hook's /proc/driver/nvidia): CRIU dumps it.
        line(16, "0:77", "/", "/proc/driver/nvidia", "tmpfs"),
        // runc's: spec destinations, masked and read-only paths, devices, cgroup v1 hierarchies.
        line(17, "8:1", "/var/lib/hosts", "/etc/hosts", "ext4"),
        line(18, "0:5", "/null", "/proc/kcore", "devtmpfs"),
        line(19, "0:23", "/sys", "/proc/sys", "proc"),
        line(20, "0:5", "/fuse", "/dev/fuse", "devtmpfs"),
        line(21, "0:30", "/", "/sys/fs/cgroup/memory", "cgroup"),
        // The spec's /opt rbind brought the host's /opt/local along.
        line(22, "8:1", "/opt", "/opt", "ext4"),
        line(23, "0:40", "/", "/opt/local", "ext4"),
        // A host folder bind-mounted below a folder of a host mount: the deepest root names it.
        line(24, "8:1", "/srv/data/x", "/x", "ext4"),
        // Files the container has anyway: a folder of its rootfs, a file of the spec's /opt, bound elsewhere.
        line(25, "0:99", "/bin", "/mnt/bin", "overlay"),
        line(26, "8:1", "/opt/zoneinfo/UTC", "/etc/localtime", "ext4"),
    ]);
    let found = select(&container, &host(), &spec());
    let got: Vec<(&str, Vec<String>)> =
        found.iter().map(|(m, c)| (m.mountpoint.as_str(), c.iter().map(|p| p.display().to_string()).collect())).collect();
    assert_eq!(
        got,
        [
            ("/usr/lib/x86_64-linux-gnu/libcuda.so.1", vec!["/usr/lib/x86_64-linux-gnu/libcuda.so.570.86.10".to_string()]),
            ("/dev/nvidia0", vec!["/dev/nvidia0".into()]),
            ("/proc/driver/nvidia/gpus/0000:07:00.0", vec!["/proc/driver/nvidia/gpus/0000:07:00.0".into()]),
            ("/x", vec!["/data/x".into(), "/srv/data/x".into()]),
        ]
    );
}

#[test]
fn a_container_without_hook_mounts_has_none() {
    let container = entries(&[
        line(10, "0:99", "/", "/", "overlay"),
        line(11, "0:23", "/", "/proc", "proc"),
        line(22, "8:1", "/opt", "/opt", "ext4"),
    ]);
    assert!(select(&container, &host(), &spec()).is_empty());
}

#[test]
fn dump_and_restore_options_name_each_mount_by_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libcuda.so.1");
    std::fs::write(&lib, "x").unwrap();
    let m = ExternalMount {
        mountpoint: "/nvidia/lib/libcuda.so.1".into(),
        key: "cedana:/nvidia/lib/libcuda.so.1".into(),
        host_path: lib.clone(),
        kind: MountedKind::File,
    };
    assert_eq!(
        dump_options(std::slice::from_ref(&m)),
        ["external mnt[/nvidia/lib/libcuda.so.1]:cedana:/nvidia/lib/libcuda.so.1"]
    );
    assert_eq!(
        restore_options(std::slice::from_ref(&m)).unwrap(),
        [format!("external mnt[cedana:/nvidia/lib/libcuda.so.1]:{}", lib.display())]
    );

    // Missing on this host, or a folder where a file was: refused, naming the mount and the host file.
    std::fs::remove_file(&lib).unwrap();
    let e = restore_options(std::slice::from_ref(&m)).unwrap_err().to_string();
    assert!(
        e.contains("/nvidia/lib/libcuda.so.1") && e.contains(&lib.display().to_string()) && e.contains("cannot be found"),
        "{e}"
    );
    std::fs::create_dir(&lib).unwrap();
    let e = restore_options(&[m]).unwrap_err().to_string();
    assert!(e.contains("it is a folder"), "{e}");

    let spaced = ExternalMount {
        mountpoint: "/a b".into(),
        key: "cedana:/a b".into(),
        host_path: dir.path().to_path_buf(),
        kind: MountedKind::Directory,
    };
    assert!(restore_options(&[spaced]).unwrap_err().to_string().contains("blank"));
}
