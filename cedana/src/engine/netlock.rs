//! CRIU's network-lock rules that a killed CRIU left behind, removed when the next operation starts.
//!
//! While CRIU holds a tree whose established TCP connections it dumps or restores (`--tcp-established`), it
//! keeps packets away from each connection with netfilter rules, and removes them when it lets the tree go
//! (also when the dump fails or its caller dies). A CRIU killed in between (SIGKILL, OOM) leaves them, and the
//! connections stay blocked for good. What CRIU 4.2.1 adds, for a tree in the host's network namespace:
//! - with iptables (its default `--network-lock`), in the filter table of IPv4 or IPv6, one rule per direction
//!   and socket: `-A INPUT|OUTPUT -s A -d B -p tcp -m mark ! --mark 0xc114 -m tcp --sport P --dport Q -j DROP`
//!   (0xc114 marks CRIU's own packets, which pass);
//! - with nftables (`--network-lock nftables`), a table `inet CRIU-ID` holding the connections, ID being
//!   the start of CRIU's run id (a UUID: `CRIU-eea60c03-c084-47a5-b0`).
//!
//! Neither names the CRIU that added it, so [`sweep`] removes them only when no CRIU process runs on this
//! machine at all (one that runs may be using them); it runs again at every start. A tree locked in a network
//! namespace of its own (a container's) has its rules in that namespace, which this does not enter.

use std::path::Path;
use std::process::{Command, Stdio};

/// The mark of CRIU's own packets (`SOCCR_MARK`), which its lock rules let pass.
const MARK: &str = "--mark 0xc114";

/// Whether `rule` (a line of `iptables -S`) is one of CRIU's connection locks.
fn is_lock_rule(rule: &str) -> bool {
    (rule.starts_with("-A INPUT ") || rule.starts_with("-A OUTPUT "))
        && rule.contains(&format!("-m mark ! {MARK} "))
        && rule.ends_with(" -j DROP")
}

/// The `iptables` arguments that delete `rule` (a line of `iptables -S`).
fn delete_args(rule: &str) -> Vec<&str> {
    let mut args: Vec<&str> = rule.split_whitespace().collect();
    if let Some(first) = args.first_mut() {
        *first = "-D";
    }
    args
}

/// The tables of CRIU's in `nft list tables` output (`table inet CRIU-eea60c03-c084-47a5-b0`): (family,
/// name).
fn lock_tables(listing: &str) -> Vec<(&str, &str)> {
    listing
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (table, family, name) = (words.next()?, words.next()?, words.next()?);
            let id = name.strip_prefix("CRIU-")?;
            let ours = table == "table" && family == "inet" && words.next().is_none();
            (ours && !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')).then_some((family, name))
        })
        .collect()
}

/// A CRIU process running on this machine (its executable or command is `criu`; zombies do not count), if
/// any; `Some(0)` when /proc cannot be read (then nothing is known to be safe).
fn running_criu() -> Option<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Some(0) };
    entries.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let named = exe.as_deref().and_then(Path::file_name).is_some_and(|n| n == "criu");
        let stat = crate::procfs::stat(pid).ok()?;
        ((named || stat.comm == "criu") && !stat.is_zombie()).then_some(pid)
    })
}

/// The standard output of `program ARGS`, or `None` when it cannot run or fails (not installed: nothing of
/// it to sweep).
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(program: &str, args: &[&str]) -> bool {
    let status = Command::new(program).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    status.is_ok_and(|s| s.success())
}

/// Remove CRIU's network-lock rules and tables, unless a CRIU process runs; returns what was removed (as
/// `TOOL: RULE`). Errors are logged, never returned: a sweep must not stop the operation that runs it.
pub fn sweep() -> Vec<String> {
    let mut rules = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        let Some(listing) = output(tool, &["-w", "-t", "filter", "-S"]) else { continue };
        rules.extend(listing.lines().filter(|r| is_lock_rule(r)).map(|r| (tool, r.to_string())));
    }
    let tables = output("nft", &["list", "tables"]).unwrap_or_default();
    let tables = lock_tables(&tables);
    if rules.is_empty() && tables.is_empty() {
        return Vec::new();
    }
    if let Some(pid) = running_criu() {
        tracing::info!(criu = pid, "CRIU runs: network-lock rules found are left to a later start");
        return Vec::new();
    }
    let mut removed = Vec::new();
    for (tool, rule) in rules {
        let args = [&["-w", "-t", "filter"][..], &delete_args(&rule)].concat();
        if run(tool, &args) {
            tracing::warn!(tool, rule, "removed a network-lock rule a killed CRIU left");
            removed.push(format!("{tool}: {rule}"));
        } else {
            tracing::warn!(tool, rule, "cannot remove a network-lock rule a killed CRIU left");
        }
    }
    for (family, name) in tables {
        if run("nft", &["delete", "table", family, name]) {
            tracing::warn!(family, table = name, "removed the network-lock table a killed CRIU left");
            removed.push(format!("nft: table {family} {name}"));
        } else {
            tracing::warn!(family, table = name, "cannot remove a network-lock table a killed CRIU left");
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_criu_lock_rules_are_recognised_and_deleted_as_listed() {
        let lock =
            "-A INPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 43747 --dport 53902 -j DROP";
        assert!(is_lock_rule(lock));
        assert!(is_lock_rule(&lock.replace("-A INPUT", "-A OUTPUT")));
        assert_eq!(delete_args(lock)[..3], ["-D", "INPUT", "-s"]);
        assert_eq!(delete_args(lock).len(), lock.split_whitespace().count());
        for other in [
            "-P INPUT ACCEPT",
            "-A INPUT -p tcp -m tcp --dport 22 -j DROP",
            "-A INPUT -m mark --mark 0xc114 -j ACCEPT",
            "-A FORWARD -p tcp -m mark ! --mark 0xc114 -m tcp --sport 1 --dport 2 -j DROP",
            "-A INPUT -p tcp -m mark ! --mark 0xc1145 -m tcp --sport 1 --dport 2 -j DROP",
        ] {
            assert!(!is_lock_rule(other), "{other}");
        }
    }

    #[test]
    fn criu_tables_are_found_in_nft_listings() {
        let listing = "table inet filter\ntable inet CRIU-eea60c03-c084-47a5-b0\ntable ip CRIU-x\ntable inet CRIU-\n\
                       table inet CRIU-a;b\ntable inet CRIU-17\n";
        assert_eq!(lock_tables(listing), [("inet", "CRIU-eea60c03-c084-47a5-b0"), ("inet", "CRIU-17")]);
    }
}
