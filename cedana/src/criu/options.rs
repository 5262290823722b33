//! CRIU options a user can ask for, turned into CRIU command-line arguments.

use serde::{Deserialize, Serialize};

/// Options for a CRIU dump or restore. The ones a restore must repeat are recorded in the manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CriuOptions {
    /// Checkpoint/restore established TCP connections.
    pub tcp_established: bool,
    /// Restore connected TCP sockets as closed (restore only).
    pub tcp_close: bool,
    /// Skip in-flight TCP connections (dump only).
    pub skip_in_flight: bool,
    /// Checkpoint/restore file locks.
    pub file_locks: bool,
    /// The tree was started from a shell: its session/group leader and tty are outside it.
    pub shell_job: bool,
    /// Allow external unix sockets.
    pub ext_unix_sk: bool,
    /// Use link-remap for opened-but-deleted files (dump only).
    pub link_remap: bool,
    /// `--external` resources, verbatim (e.g. `mnt[/path]:name`).
    pub external: Vec<String>,
    /// `--inherit-fd` mappings, verbatim (restore only, e.g. `fd[1]:pipe:[1234]`).
    pub inherit_fd: Vec<String>,
    /// Largest deleted file kept as a ghost image, as CRIU's `--ghost-limit` takes it (dump only).
    pub ghost_limit: Option<String>,
    /// How CRIU locks the network: `iptables`, `nftables` or `skip`.
    pub network_lock: Option<String>,
    /// CRIU's `--manage-cgroups` mode: `none`, `props`, `soft`, `full`, `strict` or `ignore`.
    pub manage_cgroups: Option<String>,
    /// Seconds CRIU waits for the tree to freeze (dump only).
    pub timeout: Option<u32>,
    /// Dump devices that cannot be found by their path through any of their paths (dump only).
    pub evasive_devices: bool,
    /// Any other CRIU arguments, passed through unchanged (never recorded for restore).
    pub extra: Vec<String>,
}

impl CriuOptions {
    /// Arguments for `criu dump`.
    pub fn dump_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        flag(&mut args, self.tcp_established, "--tcp-established");
        flag(&mut args, self.skip_in_flight, "--skip-in-flight");
        flag(&mut args, self.file_locks, "--file-locks");
        flag(&mut args, self.shell_job, "--shell-job");
        flag(&mut args, self.ext_unix_sk, "--ext-unix-sk");
        flag(&mut args, self.link_remap, "--link-remap");
        flag(&mut args, self.evasive_devices, "--evasive-devices");
        value(&mut args, "--ghost-limit", &self.ghost_limit);
        value(&mut args, "--timeout", &self.timeout.map(|t| t.to_string()));
        self.both_args(&mut args);
        for e in &self.external {
            args.push("--external".into());
            args.push(e.clone());
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Arguments for `criu restore`.
    pub fn restore_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        flag(&mut args, self.tcp_established, "--tcp-established");
        flag(&mut args, self.tcp_close, "--tcp-close");
        flag(&mut args, self.file_locks, "--file-locks");
        flag(&mut args, self.shell_job, "--shell-job");
        flag(&mut args, self.ext_unix_sk, "--ext-unix-sk");
        self.both_args(&mut args);
        for e in &self.external {
            args.push("--external".into());
            args.push(e.clone());
        }
        for i in &self.inherit_fd {
            args.push("--inherit-fd".into());
            args.push(i.clone());
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Arguments that dump and restore take alike.
    fn both_args(&self, args: &mut Vec<String>) {
        value(args, "--network-lock", &self.network_lock);
        if let Some(mode) = &self.manage_cgroups {
            args.push(format!("--manage-cgroups={mode}"));
        }
    }

    /// The part of a dump's options that a restore of it must repeat.
    pub fn recorded_for_restore(&self) -> CriuOptions {
        CriuOptions {
            tcp_established: self.tcp_established,
            file_locks: self.file_locks,
            shell_job: self.shell_job,
            ext_unix_sk: self.ext_unix_sk,
            external: self.external.clone(),
            network_lock: self.network_lock.clone(),
            manage_cgroups: self.manage_cgroups.clone(),
            ..CriuOptions::default()
        }
    }

    /// Options for a restore: what the dump recorded, plus what the user asks for now.
    pub fn merged_with(&self, user: &CriuOptions) -> CriuOptions {
        let mut external = self.external.clone();
        external.extend(user.external.iter().filter(|e| !self.external.contains(e)).cloned());
        CriuOptions {
            tcp_established: self.tcp_established || user.tcp_established,
            tcp_close: user.tcp_close,
            skip_in_flight: false,
            file_locks: self.file_locks || user.file_locks,
            shell_job: self.shell_job || user.shell_job,
            ext_unix_sk: self.ext_unix_sk || user.ext_unix_sk,
            link_remap: false,
            external,
            inherit_fd: user.inherit_fd.clone(),
            extra: user.extra.clone(),
            ghost_limit: None,
            network_lock: user.network_lock.clone().or_else(|| self.network_lock.clone()),
            manage_cgroups: user.manage_cgroups.clone().or_else(|| self.manage_cgroups.clone()),
            timeout: None,
            evasive_devices: false,
        }
    }
}

fn value(args: &mut Vec<String>, name: &str, v: &Option<String>) {
    if let Some(v) = v {
        args.push(name.to_string());
        args.push(v.clone());
    }
}

fn flag(args: &mut Vec<String>, on: bool, name: &str) {
    if on {
        args.push(name.to_string());
    }
}

/// Split a `--criu-opts` string the way a shell would.
pub fn parse_extra(s: &str) -> Result<Vec<String>, String> {
    shell_words::split(s).map_err(|e| format!("cannot parse --criu-opts {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_and_restore_args() {
        let o = CriuOptions {
            tcp_established: true,
            skip_in_flight: true,
            shell_job: true,
            external: vec!["mnt[/a]:a".into()],
            extra: vec!["--ghost-limit".into(), "1M".into()],
            ..Default::default()
        };
        assert_eq!(
            o.dump_args(),
            ["--tcp-established", "--skip-in-flight", "--shell-job", "--external", "mnt[/a]:a", "--ghost-limit", "1M"]
        );
        let rec = o.recorded_for_restore();
        assert!(rec.extra.is_empty() && !rec.skip_in_flight);
        assert_eq!(rec.restore_args(), ["--tcp-established", "--shell-job", "--external", "mnt[/a]:a"]);
    }

    #[test]
    fn restore_merges_recorded_and_user_options() {
        let rec = CriuOptions { file_locks: true, ..Default::default() };
        let user = CriuOptions { tcp_close: true, inherit_fd: vec!["fd[1]:pipe:[9]".into()], ..Default::default() };
        let m = rec.merged_with(&user);
        assert!(m.file_locks && m.tcp_close);
        assert_eq!(m.restore_args(), ["--tcp-close", "--file-locks", "--inherit-fd", "fd[1]:pipe:[9]"]);
    }

    #[test]
    fn valued_options_reach_dump_and_restore_as_criu_spells_them() {
        let o = CriuOptions {
            ghost_limit: Some("10M".into()),
            network_lock: Some("skip".into()),
            manage_cgroups: Some("soft".into()),
            timeout: Some(5),
            ..Default::default()
        };
        assert_eq!(o.dump_args(), ["--ghost-limit", "10M", "--timeout", "5", "--network-lock", "skip", "--manage-cgroups=soft"]);
        let restore = o.recorded_for_restore().merged_with(&CriuOptions::default());
        assert_eq!(restore.restore_args(), ["--network-lock", "skip", "--manage-cgroups=soft"]);
    }

    #[test]
    fn criu_opts_split_like_a_shell() {
        assert_eq!(parse_extra("--a 'b c' d").unwrap(), ["--a", "b c", "d"]);
        assert!(parse_extra("--a 'unterminated").is_err());
    }
}
