//! Reading CRIU logs: the error lines, and a hint naming the flag or fix that addresses them.

/// The `Error (...)` lines of a CRIU log, without the harmless ones seen on every run here.
pub fn error_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Error (") || l.contains("FAILED"))
        .filter(|l| !l.contains("RLIMIT_NOFILE"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// A hint for a failed CRIU run, from the patterns of its error lines.
pub fn hint(log: &str) -> Option<String> {
    let errors = error_lines(log).join("\n");
    const HINTS: &[(&str, &str)] = &[
        ("Connected TCP socket", "the process has established TCP connections: add --tcp-established"),
        ("External socket is used", "the process is connected to a unix socket outside the tree: add --ext-unix-sk"),
        ("Can't dump half of stream unix connection", "the process is connected to a unix socket outside the tree: add --ext-unix-sk"),
        ("Some file locks are hold", "the process holds file locks: add --file-locks"),
        ("is outside of its pid namespace", "the process belongs to a shell's session: add --shell-job"),
        ("has bad size", "a file the process had open changed size since the dump (see the error above); CRIU restores only onto the same file, so put it back as it was at dump time"),
        ("Can't fork for", "a PID of the checkpoint is in use on this machine: stop the process using it, then restore again"),
        ("Unexpected rt vDSO area bounds", "this CRIU is too old for the running kernel: install CRIU >= 4.2"),
        ("Can't get 1:16 opt", "this CRIU cannot dump sockets on this kernel: install CRIU >= 4.2"),
        ("Locking network failed", "CRIU needs iptables-restore to lock the network: install iptables"),
        ("Can't lookup mount", "a file of the process lives on a mount CRIU cannot see: add --external for it, or redirect the output"),
        ("Can't restore sub-task in NS", "a process below the tree's root has namespaces of its own (e.g. a child started by `unshare --mount`): CRIU restores namespaces only at the root of a tree, so checkpoint that process's own tree (dump its PID) instead"),
        ("Unable to open link remap", "the process keeps a deleted file open: add --link-remap"),
        ("Can't dump ghost file", "the process keeps a large deleted file open: raise CRIU's --ghost-limit"),
        ("Operation not permitted", "CRIU was denied access: run as root, and note that a process of another user cannot be dumped on machines without CAP_SYS_RESOURCE"),
    ];
    HINTS.iter().find(|(pat, _)| errors.contains(pat)).map(|(_, h)| (*h).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_errors_and_hints() {
        let log = "(00.1) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                   (00.2) Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using --tcp-established option.\n\
                   (00.3) Error (criu/cr-dump.c:2100): Dumping FAILED.\n";
        let errs = error_lines(log);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(hint(log).unwrap().contains("--tcp-established"));
        assert_eq!(hint("all good"), None);
        let only_rlimit =
            "(00.1) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n";
        assert_eq!(hint(only_rlimit), None, "the harmless rlimit line must not produce a permission hint");
        let nested = "(00.05) Error (criu/pstree.c:969): Can't restore sub-task in NS (cflags 20000)\n";
        assert!(hint(nested).unwrap().contains("dump its PID"));
    }
}
