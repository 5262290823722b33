//! Container images built locally, without a registry: a busybox-static rootfs (plus static C workloads),
//! runc bundles around it, a tarball of it for `docker import`, and an OCI image layout of it for `ctr image import`.

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

/// The sha256 of a file, as `sha256:HEX`, and its size (with coreutils' sha256sum).
fn digest(file: &Path) -> (String, u64) {
    let out = Command::new("sha256sum").arg(file).output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}", file.display());
    let hex = String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("a digest").to_string();
    (format!("sha256:{hex}"), std::fs::metadata(file).expect("blob size").len())
}

/// Move `file` into the layout's blob store under its digest; returns (digest, size).
fn add_blob(layout: &Path, file: &Path) -> (String, u64) {
    let (digest, size) = digest(file);
    let hex = digest.trim_start_matches("sha256:");
    std::fs::rename(file, layout.join("blobs/sha256").join(hex)).expect("store blob");
    (digest, size)
}

/// An OCI image-layout tarball (for `ctr image import`) of one uncompressed layer holding `rootfs`,
/// linux/amd64, named `name` (a full reference such as `docker.io/x/y:1`). Built under `work`.
pub fn oci_image_tar(rootfs: &Path, work: &Path, name: &str) -> PathBuf {
    oci_image_tar_with_config(rootfs, work, name, serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] }))
}

/// Like [`oci_image_tar`], with `config` as the image configuration's `config` (e.g. a `User` set):
/// an OCI image-layout tarball of one uncompressed layer holding `rootfs`, linux/amd64, named `name`.
pub fn oci_image_tar_with_config(rootfs: &Path, work: &Path, name: &str, config: serde_json::Value) -> PathBuf {
    let layout = work.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("layout folder");
    let (layer, layer_size) = add_blob(&layout, &rootfs_tar(rootfs, &work.join("layer.tar")));
    let image_config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [layer] },
    });
    let write = |file: &str, v: &serde_json::Value| {
        let p = work.join(file);
        std::fs::write(&p, v.to_string()).expect("write blob");
        add_blob(&layout, &p)
    };
    let (config, config_size) = write("config.json", &image_config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size }],
    });
    let (manifest, manifest_size) = write("manifest.json", &manifest);
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest,
            "size": manifest_size,
            "annotations": { "io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(layout.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}").expect("oci-layout");
    rootfs_tar(&layout, &work.join("image.tar"))
}
