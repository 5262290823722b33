//! Container images built locally, without a registry: a busybox-static rootfs (plus static C workloads),
//! runc bundles around it, and a tarball of it for `docker import`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The static busybox that Debian's `busybox-static` installs.
pub const BUSYBOX: &str = "/bin/busybox";

/// Annotation (in a bundle's config.json) that makes cedana-runc's `create` restore a checkpoint.
pub const RESTORE_ANNOTATION: &str = "io.cedana.restore";

/// A shell loop printing 0, 1, 2, ... every 100 ms: a restore that continues prints the next number.
pub const COUNTER: &str = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done";

/// Build a rootfs at `dir`: /bin/busybox with every applet linked, and the usual empty mount points.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs bin");
    std::fs::copy(BUSYBOX, bin.join("busybox")).expect("busybox-static must be installed (scripts/setup.sh)");
    let list = Command::new(BUSYBOX).arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
    }
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d)).expect("rootfs folder");
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").expect("group");
    dir.to_path_buf()
}

/// Compile `integration/workloads/NAME.c` statically into `ROOTFS/bin/NAME` (the rootfs has no libc).
pub fn add_static_workload(rootfs: &Path, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads").join(format!("{name}.c"));
    let out = rootfs.join("bin").join(name);
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc must be installed (scripts/setup.sh)");
    assert!(status.success(), "compiling {} statically", src.display());
    out
}

/// A runc bundle: `DIR/config.json` (from `runc spec`) and `DIR/rootfs`.
pub struct Bundle {
    pub dir: PathBuf,
}

impl Bundle {
    /// A bundle at `dir` with a fresh busybox rootfs running `args` without a terminal, as root, with a
    /// writable rootfs.
    pub fn busybox(dir: &Path, args: &[&str]) -> Bundle {
        std::fs::create_dir_all(dir).expect("bundle folder");
        busybox_rootfs(&dir.join("rootfs"));
        let status = Command::new("runc").arg("spec").arg("--bundle").arg(dir).status().expect("runc spec");
        assert!(status.success(), "runc spec");
        let bundle = Bundle { dir: dir.to_path_buf() };
        bundle.edit_config(|c| {
            c["process"]["terminal"] = false.into();
            c["process"]["args"] = args.iter().map(|a| serde_json::Value::from(*a)).collect();
            c["root"]["readonly"] = false.into();
        });
        bundle
    }

    /// A busybox bundle running the counter loop.
    pub fn counter(dir: &Path) -> Bundle {
        Self::busybox(dir, &["sh", "-c", COUNTER])
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// Read, change and write back config.json.
    pub fn edit_config(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.config_path()).expect("read config.json")).expect("config.json is JSON");
        f(&mut config);
        std::fs::write(self.config_path(), serde_json::to_vec_pretty(&config).expect("serialize")).expect("write config.json");
    }

    /// Set an annotation.
    pub fn annotate(&self, key: &str, value: &str) {
        self.edit_config(|c| {
            if !c["annotations"].is_object() {
                c["annotations"] = serde_json::json!({});
            }
            c["annotations"][key] = value.into();
        });
    }
}

/// A tar of `rootfs`, for `docker import - NAME`.
pub fn rootfs_tar(rootfs: &Path, out: &Path) -> PathBuf {
    let status = Command::new("tar").arg("-C").arg(rootfs).arg("-cf").arg(out).arg(".").status().expect("tar");
    assert!(status.success(), "tar of {}", rootfs.display());
    out.to_path_buf()
}
