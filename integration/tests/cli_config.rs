//! `cedana config show` and `cedana features`, run as the built binary (no root needed).

use std::path::Path;
use std::process::{Command, Output};

use cedana_integration::bin;

/// `cedana ARGS` with none of the caller's `CEDANA_*` variables, plus `env`.
fn cedana(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin("cedana"));
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CEDANA_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run cedana")
}

fn stdout_ok(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The rows of a whitespace-separated table after its header `first_column ...`: (first cell, the rest).
fn rows(text: &str, first_column: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .skip_while(|l| l.split_whitespace().next() != Some(first_column))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut cells = l.split_whitespace().map(str::to_string);
            (cells.next().unwrap(), cells.collect())
        })
        .collect()
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("cedana.toml");
    std::fs::write(&p, "address = \"/tmp/cedana-test.sock\"\n[checkpoint]\ncompression = \"zstd\"\n[criu]\ndriver = \"cli\"\n")
        .unwrap();
    p
}

#[test]
fn config_show_names_the_source_of_each_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path());
    let f = file.to_str().unwrap();
    let out = cedana(&["--config", f, "config", "show"], &[("CEDANA_CHECKPOINT_DIR", "/srv/checkpoints")]);
    let text = stdout_ok("config show", &out);
    assert_eq!(text.lines().next().unwrap(), format!("Config file: {f} (flag --config)"));
    let table = rows(&text, "KEY");
    let row = |key: &str| -> Vec<String> {
        table.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no row {key} in\n{text}")).1.clone()
    };
    assert_eq!(row("address"), ["/tmp/cedana-test.sock", "file", f]);
    assert_eq!(row("checkpoint.compression"), ["zstd", "file", f]);
    assert_eq!(row("criu.driver"), ["cli", "file", f]);
    assert_eq!(row("checkpoint.dir"), ["/srv/checkpoints", "env", "CEDANA_CHECKPOINT_DIR"]);
    assert_eq!(row("db.path"), ["/var/lib/cedana/cedana.db", "default"]);
    assert_eq!(row("protocol"), ["unix", "default"]);
    assert_eq!(row("hooks.command"), ["-", "default"]);
    assert_eq!(row("gpu.backend"), ["auto", "default"]);
    assert_eq!(row("gpu.lock_timeout_ms"), ["10000", "default"]);
    assert_eq!(row("storage.part_size_mib"), ["5", "default"]);
    assert_eq!(row("storage.max_in_flight"), ["4", "default"]);
    let keys: Vec<&str> = table.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "address",
            "protocol",
            "log_level",
            "node_name",
            "db.path",
            "daemon.token_file",
            "daemon.socket_group",
            "criu.binary_path",
            "criu.driver",
            "checkpoint.dir",
            "checkpoint.compression",
            "checkpoint.stream",
            "checkpoint.direct_writes",
            "checkpoint.scratch_dir",
            "restore.lazy",
            "storage.stall_timeout_s",
            "storage.part_size_mib",
            "storage.max_in_flight",
            "hooks.command",
            "gpu.backend",
            "gpu.cuda_checkpoint",
            "gpu.libcuda",
            "gpu.nvidia_smi",
            "gpu.lock_timeout_ms",
            "profiling.enabled"
        ]
    );

    // The same as JSON, with the file named by $CEDANA_CONFIG and the older variable names.
    let out = cedana(
        &["config", "show", "--json"],
        &[("CEDANA_CONFIG", f), ("CEDANA_SCRATCH_DIR", "/var/tmp/x"), ("CEDANA_HOOK_COMMAND", "/bin/true")],
    );
    let json: serde_json::Value = serde_json::from_str(&stdout_ok("config show --json", &out)).unwrap();
    assert_eq!(json["file"], serde_json::json!({"path": f, "chosen_by": "env CEDANA_CONFIG"}));
    let setting = |key: &str| json["settings"].as_array().unwrap().iter().find(|s| s["key"] == key).unwrap().clone();
    assert_eq!(setting("address")["source"], "file");
    assert_eq!(setting("address")["path"], f);
    assert_eq!(setting("checkpoint.scratch_dir")["value"], "/var/tmp/x");
    assert_eq!(setting("checkpoint.scratch_dir")["var"], "CEDANA_SCRATCH_DIR");
    assert_eq!(setting("checkpoint.scratch_dir")["env"], "CEDANA_CHECKPOINT_SCRATCH_DIR");
    assert_eq!(setting("hooks.command")["var"], "CEDANA_HOOK_COMMAND");
    assert_eq!(setting("db.path")["source"], "default");
    assert_eq!(setting("hooks.command")["value"], "/bin/true");
}

#[test]
fn bad_values_fail_naming_the_variable_or_file() {
    let out = cedana(&["config", "show"], &[("CEDANA_CHECKPOINT_COMPRESSION", "brotli")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad compression was accepted: {err}");
    assert!(err.contains("CEDANA_CHECKPOINT_COMPRESSION") && err.contains("none, tar, gzip, lz4, zlib, zstd"), "{err}");

    let out = cedana(&["config", "show"], &[("CEDANA_CRIU_DRIVER", "fast")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad driver was accepted: {err}");
    assert!(err.contains("CEDANA_CRIU_DRIVER") && err.contains("swrk or cli"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[checkpoint]\ncompression = \"brotli\"\n").unwrap();
    let out = cedana(&["--config", file.to_str().unwrap(), "config", "show"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad compression in the file was accepted: {err}");
    assert!(err.contains(file.to_str().unwrap()) && err.contains("brotli") && err.contains("zstd"), "{err}");
}

#[test]
fn features_prints_the_matrix() {
    let text = stdout_ok("features", &cedana(&["features"], &[]));
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["FEATURE", "process", "job", "runc", "containerd"]);
    let table = rows(&text, "FEATURE");
    let cells = |feature: &str| -> Vec<String> {
        table.iter().find(|(f, _)| f == feature).unwrap_or_else(|| panic!("no row {feature} in\n{text}")).1.clone()
    };
    assert_eq!(cells("dump"), ["yes", "yes", "yes", "yes"]);
    assert_eq!(cells("restore"), ["yes", "yes", "yes", "yes"]);
    assert_eq!(cells("run"), ["yes", "-", "yes", "yes"]);
    // "manage --upcoming" splits into "manage" "--upcoming" ...: the first "manage" row is plain manage.
    assert_eq!(cells("manage"), ["yes", "-", "yes", "yes"]);
    let upcoming = text.lines().find(|l| l.trim_start().starts_with("manage --upcoming")).unwrap();
    assert_eq!(upcoming.split_whitespace().skip(2).collect::<Vec<_>>(), ["yes", "-", "yes", "yes"]);
    assert_eq!(cells("GPU"), ["yes", "yes", "yes", "yes"]);
    let attach = cells("attach");
    assert_eq!(attach, ["yes", "yes", "yes", "yes"], "{text}");
}
