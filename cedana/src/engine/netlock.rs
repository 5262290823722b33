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
//! Neither names the CRIU that added it, so the firewall is read only when an operation may have left some:
//! an operation whose CRIU may lock connections holds a [`Watch`] (a marker `.cedana-netlock-PID-*` in the
//! temporary folder); it sweeps when its CRIU failed, and a killed operation's marker makes the next start
//! sweep (see [`super::leftovers::sweep_config`]). [`sweep`] removes an iptables rule when the connection it locks is
//! held by processes none of which CRIU has a hand on (none traced: a dump seizes the holders before it locks
//! their connections; none a child of CRIU: a restore creates them), and, when no process holds the
//! connection, or for an nftables table, only when no CRIU process runs on this machine at all (a restore
//! locks its connections before it creates their sockets); it runs again at every start. A tree locked in a network namespace of its own (a container's) has
//! its rules in that namespace, which this does not enter.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

/// Prefix of the marker a [`Watch`] holds, followed by `PID-` (a leftover when its process was killed).
pub const MARKER: &str = ".cedana-netlock-";

/// Held around a CRIU run that may lock connections (`--tcp-established`): its marker tells the next start
/// to sweep should this process be killed; dropped after a failure ([`Watch::finished`] not told of a
/// success), it sweeps at once (a killed CRIU leaves its rules while this process lives on).
pub(crate) struct Watch {
    marker: Option<tempfile::NamedTempFile>,
    succeeded: bool,
}

impl Watch {
    /// A watch over a CRIU run; one that `locks` nothing (no `--tcp-established`) does nothing.
    pub(crate) fn start(locks: bool) -> Watch {
        let marker = locks.then(|| tempfile::Builder::new().prefix(&super::leftovers::prefix(MARKER)).tempfile());
        let marker = marker.and_then(|m| {
            m.inspect_err(
                |e| tracing::warn!(error = %e, "cannot mark a run that locks connections; a later start may miss its rules"),
            )
            .ok()
        });
        Watch { marker, succeeded: false }
    }

    /// CRIU's run ended well: nothing to sweep.
    pub(crate) fn finished(&mut self, ok: bool) {
        self.succeeded = ok;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.marker.is_some() && !self.succeeded {
            sweep();
        }
    }
}

/// The longest a sweep waits for lock helpers still at work (each takes a few ms).
const HELPER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Wait until no `iptables-restore` or `ip6tables-restore` runs on this machine (the helpers CRIU runs to
/// add its iptables lock rules), or `limit` passed.
fn wait_for_lock_helpers(limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while lock_helper_running() {
        if std::time::Instant::now() >= deadline {
            tracing::info!("an iptables-restore still runs: network-lock rules it adds are left to a later start");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Whether a live process runs `iptables-restore` or `ip6tables-restore` (by its first argument: its
/// `comm` is cut to 15 bytes).
fn lock_helper_running() -> bool {
    crate::procfs::pids().unwrap_or_default().into_iter().any(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let name = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
        is_lock_helper(name) && crate::procfs::stat(pid).is_ok_and(|s| !s.is_zombie())
    })
}

/// Whether an executable named `name` is one of the helpers CRIU adds its iptables lock rules with.
fn is_lock_helper(name: &[u8]) -> bool {
    name == b"iptables-restore" || name == b"ip6tables-restore"
}

/// The mark of CRIU's own packets (`SOCCR_MARK`), which its lock rules let pass.
const MARK: &str = "--mark 0xc114";

/// Whether `rule` (a line of `iptables -S`) is one of CRIU's connection locks.
fn is_lock_rule(rule: &str) -> bool {
    (rule.starts_with("-A INPUT ") || rule.starts_with("-A OUTPUT "))
        && rule.contains(&format!("-m mark ! {MARK} "))
        && rule.ends_with(" -j DROP")
}

/// One end of a TCP connection.
type End = (IpAddr, u16);

/// The two ends a lock rule names (`-s A/n -d B/n ... --sport P --dport Q`), in a fixed order (a connection
/// is locked by rules naming it from either side).
fn rule_connection(rule: &str) -> Option<(End, End)> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let value = |flag: &str| words.windows(2).find(|w| w[0] == flag).map(|w| w[1]);
    let addr = |flag: &str| value(flag)?.split('/').next()?.parse::<IpAddr>().ok();
    let port = |flag: &str| value(flag)?.parse::<u16>().ok();
    Some(ordered((addr("-s")?, port("--sport")?), (addr("-d")?, port("--dport")?)))
}

fn ordered(a: End, b: End) -> (End, End) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// An address of /proc/net/tcp or tcp6 (`0100007F:1F90`: 32-bit words in the kernel's byte order).
fn proc_end(s: &str) -> Option<End> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..ip.len()).step_by(8) {
        bytes.extend(u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?.swap_bytes().to_be_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((ip, port))
}

/// The socket inodes of this network namespace's TCP connections, by their two ends.
fn tcp_sockets() -> HashMap<(End, End), Vec<String>> {
    let mut found: HashMap<(End, End), Vec<String>> = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(inode)) =
                (cols.get(1).and_then(|c| proc_end(c)), cols.get(2).and_then(|c| proc_end(c)), cols.get(9))
            else {
                continue;
            };
            if *inode != "0" {
                found.entry(ordered(local, remote)).or_default().push(inode.to_string());
            }
        }
    }
    found
}

/// The processes holding each of the socket `inodes` open.
fn holders(inodes: &HashSet<String>) -> HashMap<String, Vec<i32>> {
    let mut found: HashMap<String, Vec<i32>> = HashMap::new();
    for pid in crate::procfs::pids().unwrap_or_default() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let target = target.to_string_lossy();
            if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
                if inodes.contains(inode) {
                    found.entry(inode.to_string()).or_default().push(pid);
                }
            }
        }
    }
    found
}

/// Whether CRIU may be at work on `pid`: a tracer holds it (a dump seizes the processes whose connections it
/// locks), or its parent is CRIU (a restore creates them as its children, and seizes them only at its end).
fn in_criu_hands(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let traced = status.lines().find_map(|l| l.strip_prefix("TracerPid:")).is_some_and(|t| t.trim() != "0");
    traced || crate::procfs::stat(pid).is_ok_and(|s| is_criu(s.ppid))
}

/// Whether `pid` is a live CRIU process (its executable or command is `criu`; zombies and processes that are
/// exiting, such as a CRIU just killed, do not count).
fn is_criu(pid: i32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let named = exe.as_deref().and_then(Path::file_name).is_some_and(|n| n == "criu");
    let Ok(stat) = crate::procfs::stat(pid) else { return false };
    (named || stat.comm == "criu") && !stat.is_zombie() && stat.flags & PF_EXITING == 0
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

/// The kernel's flag of a task that is exiting (killed: it runs no more code of its own).
const PF_EXITING: u64 = 0x4;

/// A CRIU process running on this machine (see [`is_criu`]), if any; `Some(0)` when /proc cannot be read
/// (then nothing is known to be safe).
fn running_criu() -> Option<i32> {
    let Some(pids) = crate::procfs::pids() else { return Some(0) };
    pids.into_iter().find(|pid| is_criu(*pid))
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

/// Remove the network-lock rules and tables no live CRIU may be using (see the module's doc); returns what
/// was removed (as `TOOL: RULE` or `nft: table FAMILY NAME`). Errors are logged, never returned: a sweep must not stop the operation that runs it.
pub fn sweep() -> Vec<String> {
    // CRIU adds each socket's lock with an `iptables-restore` of its own: one it started just before it was
    // killed outlives it and may add its rule after a listing taken now.
    wait_for_lock_helpers(HELPER_WAIT);
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
    // A rule whose connection is held only by processes CRIU has no hand on is stale whatever else runs; the
    // rest (a connection no one holds, nftables tables) only when no CRIU runs.
    let sockets = tcp_sockets();
    let conns: Vec<Option<Vec<String>>> =
        rules.iter().map(|(_, r)| rule_connection(r).map(|c| sockets.get(&c).cloned().unwrap_or_default())).collect();
    let wanted: HashSet<String> = conns.iter().flatten().flatten().cloned().collect();
    let held = if wanted.is_empty() { HashMap::new() } else { holders(&wanted) };
    let criu = std::cell::OnceCell::new();
    let no_criu = || {
        let running = *criu.get_or_init(|| {
            let running = running_criu();
            if let Some(pid) = running {
                tracing::info!(criu = pid, "CRIU runs: network-lock rules it may be using are left to a later start");
            }
            running
        });
        running.is_none()
    };
    let stale = |inodes: &Option<Vec<String>>| {
        let pids: Vec<i32> = inodes.iter().flatten().filter_map(|i| held.get(i)).flatten().copied().collect();
        if pids.is_empty() {
            no_criu()
        } else {
            !pids.iter().any(|p| in_criu_hands(*p))
        }
    };
    let rules: Vec<(&str, String)> = rules.into_iter().zip(&conns).filter(|(_, c)| stale(c)).map(|(r, _)| r).collect();
    let tables = if tables.is_empty() || no_criu() { tables } else { Vec::new() };
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
    fn criu_lock_helpers_are_known_by_their_executable() {
        assert!(is_lock_helper(b"iptables-restore") && is_lock_helper(b"ip6tables-restore"));
        assert!(!is_lock_helper(b"iptables") && !is_lock_helper(b"iptables-restore-translate"));
        // A helper running now is waited for; none running: no wait.
        let mut helper = Command::new("bash").args(["-c", "exec -a iptables-restore sleep 0.3"]).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(lock_helper_running(), "a process whose argv[0] is iptables-restore");
        let started = std::time::Instant::now();
        wait_for_lock_helpers(std::time::Duration::from_secs(5));
        helper.wait().unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "waited until it ended: {:?}", started.elapsed());
    }

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
    fn a_rule_names_its_connection_as_proc_net_tcp_does() {
        let lock =
            "-A INPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 8080 --dport 53902 -j DROP";
        let reverse =
            "-A OUTPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 53902 --dport 8080 -j DROP";
        let conn = rule_connection(lock).unwrap();
        assert_eq!(rule_connection(reverse), Some(conn));
        let local = proc_end("0100007F:1F90").unwrap();
        assert_eq!(local, ("127.0.0.1".parse().unwrap(), 8080));
        assert_eq!(ordered(proc_end("0100007F:D28E").unwrap(), local), conn);
        let v6 = "-A INPUT -s ::1/128 -d ::1/128 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 1 --dport 2 -j DROP";
        let (a, _) = rule_connection(v6).unwrap();
        assert_eq!(proc_end("00000000000000000000000001000000:0001"), Some(a));
        assert_eq!(rule_connection("-A INPUT -p tcp -m mark ! --mark 0xc114 -j DROP"), None);
    }

    #[test]
    fn criu_tables_are_found_in_nft_listings() {
        let listing = "table inet filter\ntable inet CRIU-eea60c03-c084-47a5-b0\ntable ip CRIU-x\ntable inet CRIU-\n\
                       table inet CRIU-a;b\ntable inet CRIU-17\n";
        assert_eq!(lock_tables(listing), [("inet", "CRIU-eea60c03-c084-47a5-b0"), ("inet", "CRIU-17")]);
    }
}
