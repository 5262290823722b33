//! What /proc says about a process tree, before we hand it to CRIU.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::checkpoint::{ProcessInfo, StdioPipe};

/// Errors inspecting a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no such process: PID {0} (check the PID with `ps`)")]
    NoSuchProcess(i32),
    #[error("PID {pid} cannot be checkpointed: {reason}")]
    Refused { pid: i32, reason: String },
    #[error(
        "PID {pid} cannot be checkpointed: it runs in another PID namespace (a container?): checkpoint the container instead"
    )]
    OtherPidNamespace { pid: i32 },
    #[error("reading /proc/{pid}: {source}")]
    Io {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

impl ProcError {
    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            ProcError::NoSuchProcess(_) => K::NotFound,
            ProcError::Refused { .. } | ProcError::OtherPidNamespace { .. } => K::FailedPrecondition,
            ProcError::Io { source, .. } => K::of_io(source),
        }
    }
}

/// The fields of /proc/PID/stat we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub flags: u64,
}

/// Parse /proc/PID/stat (the comm field may hold spaces and parentheses).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text[open + 1..close].to_string();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    Some(Stat {
        pid,
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgid: rest.get(2)?.parse().ok()?,
        sid: rest.get(3)?.parse().ok()?,
        flags: rest.get(6)?.parse().ok()?,
    })
}

const PF_KTHREAD: u64 = 0x0020_0000;

/// Read /proc/PID/stat.
pub fn stat(pid: i32) -> Result<Stat, ProcError> {
    stat_into(pid, &mut String::with_capacity(STAT_BUF))
}

/// Room for a whole stat line, so that it is read in one system call (a line is a few hundred bytes; an
/// empty `String` would first be probed with a 32-byte read and then grown).
const STAT_BUF: usize = 4096;

/// [`stat`], reading through `buf` (cleared first): a scan of every process reuses one buffer.
fn stat_into(pid: i32, buf: &mut String) -> Result<Stat, ProcError> {
    use std::io::Read;
    buf.clear();
    std::fs::File::open(format!("/proc/{pid}/stat")).and_then(|mut f| f.read_to_string(buf)).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ProcError::NoSuchProcess(pid),
        _ => ProcError::Io { pid, source: e },
    })?;
    parse_stat(buf).ok_or(ProcError::Io { pid, source: std::io::Error::other("unparseable stat") })
}

impl Stat {
    /// Exited but not reaped yet (zombie), or being torn down.
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// A process that keeps one of the wanted PIDs taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidUser {
    /// The wanted PID.
    pub pid: i32,
    /// The process holding it (itself, or a process whose group or session it is).
    pub holder: i32,
    pub comm: String,
    pub zombie: bool,
}

/// The PIDs in /proc (`None` when it cannot be read).
pub fn pids() -> Option<Vec<i32>> {
    let entries = std::fs::read_dir("/proc").ok()?;
    Some(entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).collect())
}

/// Processes that keep any of `pids` taken, live ones first. A PID cannot be reused while it names a
/// process, or the process group or session of any process (zombies included).
pub fn pid_users(pids: &[i32]) -> Vec<PidUser> {
    let mut users = Vec::new();
    let mut buf = String::with_capacity(STAT_BUF);
    for holder in self::pids().unwrap_or_default() {
        let Ok(st) = stat_into(holder, &mut buf) else { continue };
        for &pid in pids {
            if st.pid == pid || st.pgid == pid || st.sid == pid {
                users.push(PidUser { pid, holder, comm: st.comm.clone(), zombie: st.is_zombie() });
            }
        }
    }
    users.sort_by_key(|u| u.zombie);
    users
}

/// Every PID of the tree rooted at `pid`, root first (threads excluded).
pub fn tree_pids(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
            }
        }
        i += 1;
    }
    out
}

/// Why a process cannot be dumped, from its stat line alone.
fn refusal_from_stat(st: &Stat) -> Option<&'static str> {
    if st.is_zombie() {
        return Some("it is a zombie (it has exited and waits for its parent to reap it)");
    }
    if st.pid == 1 {
        return Some("it is the init process of this machine");
    }
    if st.flags & PF_KTHREAD != 0 {
        return Some("it is a kernel thread");
    }
    if st.sid == 0 {
        // CRIU cannot record (or recreate) a session it cannot see.
        return Some(
            "it has no session (session 0: started by an init or agent that never called setsid), which CRIU \
             cannot checkpoint; start the program in a session of its own, e.g. `setsid PROGRAM`",
        );
    }
    None
}

/// Refuse PIDs that must never be dumped: init, kernel threads, ourselves and our ancestors.
pub fn check_dumpable(pid: i32) -> Result<Stat, ProcError> {
    if pid <= 0 {
        return Err(ProcError::Refused { pid, reason: "not a valid PID".into() });
    }
    let st = stat(pid)?;
    let refuse = |reason: &str| Err(ProcError::Refused { pid, reason: reason.into() });
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    if let (Some(theirs), Some(ours)) = (ns(&pid.to_string()), ns("self")) {
        if theirs != ours {
            return Err(ProcError::OtherPidNamespace { pid });
        }
    }
    if let Some(reason) = refusal_from_stat(&st) {
        return refuse(reason);
    }
    let mut ancestor = std::process::id() as i32;
    while ancestor > 1 {
        if ancestor == pid {
            return refuse("it is cedana itself or one of its parents (the shell running cedana); dump another process");
        }
        ancestor = match stat(ancestor) {
            Ok(s) => s.ppid,
            Err(_) => break,
        };
    }
    Ok(st)
}

/// Describe a tree for the manifest.
pub fn describe(pid: i32) -> Result<ProcessInfo, ProcError> {
    let st = stat(pid)?;
    let io = |source| ProcError::Io { pid, source };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(io)?;
    let cmdline = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let link =
        |name: &str| std::fs::read_link(format!("/proc/{pid}/{name}")).map(|p| p.display().to_string()).unwrap_or_default();
    let stdio_pipes = (0..3)
        .filter_map(|fd| {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            let target = target.to_string_lossy().into_owned();
            target.starts_with("pipe:[").then_some(StdioPipe { fd, resource: target })
        })
        .collect();
    Ok(ProcessInfo { pid, pids: tree_pids(pid), cmdline, comm: st.comm, exe: link("exe"), cwd: link("cwd"), stdio_pipes })
}

/// Whether the tree needs CRIU's `--shell-job`: its session or process group leader is outside it.
pub fn needs_shell_job(root: &Stat, pids: &[i32]) -> bool {
    !pids.contains(&root.sid) || !pids.contains(&root.pgid)
}

/// Established TCP connections held by the tree, as `local -> remote` strings.
pub fn established_tcp(pids: &[i32]) -> Vec<String> {
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(ino) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.insert(ino.to_string());
                }
            }
        }
    }
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for pid in pids {
        for table in ["tcp", "tcp6"] {
            let path = PathBuf::from(format!("/proc/{pid}/net/{table}"));
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if cols.len() > 9 && cols[3] == "01" && inodes.contains(cols[9]) {
                    let conn = format!("{} -> {}", decode_addr(cols[1]), decode_addr(cols[2]));
                    if !found.contains(&conn) {
                        found.push(conn);
                    }
                }
            }
        }
        if !found.is_empty() {
            break;
        }
    }
    found
}

/// `0100007F:1F90` → `127.0.0.1:8080` (IPv6 addresses are shown as hex).
fn decode_addr(s: &str) -> String {
    let Some((ip, port)) = s.split_once(':') else { return s.to_string() };
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    if ip.len() == 8 {
        if let Ok(v) = u32::from_str_radix(ip, 16) {
            return format!("{}:{port}", std::net::Ipv4Addr::from(v.swap_bytes()));
        }
    }
    format!("[{ip}]:{port}")
}

/// One line of a mountinfo file (the fields we use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id (as `mnt_id` in /proc/PID/fdinfo names it).
    pub id: u64,
    /// `major:minor` of the file system.
    pub dev: String,
    /// The folder of the file system the mount shows.
    pub root: String,
    pub mountpoint: String,
    pub fstype: String,
}

/// Parse a mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let id = f[0].parse().ok()?;
            (f.len() > sep + 1 && sep >= 6).then(|| MountEntry {
                id,
                dev: f[2].to_string(),
                root: unescape_mountinfo(f[3]),
                mountpoint: unescape_mountinfo(f[4]),
                fstype: f[sep + 1].to_string(),
            })
        })
        .collect()
}

/// Undo mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_with_their_escapes() {
        let m = parse_mountinfo(
            "36 35 98:0 /mnt1 /mnt\\0402 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
             37 35 0:5 / /dev rw - devtmpfs udev rw\nbroken line",
        );
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].id, m[0].dev.as_str(), m[0].root.as_str(), m[0].mountpoint.as_str()), (36, "98:0", "/mnt1", "/mnt 2"));
        assert_eq!(m[0].fstype, "ext3", "the type comes after the optional fields");
        assert_eq!(unescape_mountinfo("a\\011b\\134c\\9"), "a\tb\\c\\9");
    }

    #[test]
    fn stat_parses_odd_comm_names() {
        let s = parse_stat("42 (my (odd) prog) S 1 42 40 0 -1 4194560 0 0").unwrap();
        assert_eq!(s.comm, "my (odd) prog");
        assert_eq!((s.pid, s.ppid, s.pgid, s.sid, s.state), (42, 1, 42, 40, 'S'));
        assert_eq!(s.flags, 4194560);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn shell_job_is_needed_when_leaders_are_outside() {
        let st = parse_stat("42 (x) S 1 42 42 0 -1 0 0 0").unwrap();
        assert!(!needs_shell_job(&st, &[42, 43]));
        let st = parse_stat("42 (x) S 1 42 7 0 -1 0 0 0").unwrap();
        assert!(needs_shell_job(&st, &[42, 43]));
    }

    #[test]
    fn refuses_zombies_kernel_threads_and_session_zero() {
        let ok = parse_stat("42 (x) S 1 42 42 0 -1 0 0 0").unwrap();
        assert_eq!(refusal_from_stat(&ok), None);
        let zombie = parse_stat("42 (x) Z 1 42 42 0 -1 0 0 0").unwrap();
        assert!(refusal_from_stat(&zombie).unwrap().contains("zombie"));
        let kthread = parse_stat(&format!("42 (kworker) S 2 0 0 0 -1 {PF_KTHREAD} 0 0")).unwrap();
        assert!(refusal_from_stat(&kthread).unwrap().contains("kernel thread"));
        let no_session = parse_stat("42 (x) S 9 42 0 0 -1 0 0 0").unwrap();
        assert!(refusal_from_stat(&no_session).unwrap().contains("setsid"));
    }

    #[test]
    fn refuses_ourselves_init_and_missing() {
        let me = std::process::id() as i32;
        assert!(matches!(check_dumpable(me), Err(ProcError::Refused { .. })));
        assert!(matches!(check_dumpable(1), Err(ProcError::Refused { .. })));
        assert!(matches!(check_dumpable(i32::MAX - 1), Err(ProcError::NoSuchProcess(_))));
    }

    #[test]
    fn our_own_pid_is_in_use() {
        let me = std::process::id() as i32;
        let users = pid_users(&[me]);
        assert!(users.iter().any(|u| u.holder == me && !u.zombie), "{users:?}");
        assert!(pid_users(&[i32::MAX - 7]).is_empty());
    }

    #[test]
    fn addresses_decode() {
        assert_eq!(decode_addr("0100007F:1F90"), "127.0.0.1:8080");
    }

    #[test]
    fn describes_our_own_tree() {
        let me = std::process::id() as i32;
        let info = describe(me).unwrap();
        assert_eq!(info.pid, me);
        assert_eq!(info.pids[0], me);
        assert!(!info.cmdline.is_empty() && !info.cwd.is_empty());
    }
}
