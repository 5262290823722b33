//! The CRIU driver that runs the `criu` command line, with action scripts answered over a socket (see
//! [`super::hook`]). Its action script is the calling executable, so every binary using it must call
//! [`super::hook::run_if_invoked`] first in `main`.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{hook, log, Criu, CriuDriver, CriuError, DumpCall, RestoreCall};

/// Runs `criu dump` / `criu restore` as commands.
#[derive(Debug, Clone)]
pub struct CliDriver {
    criu: Criu,
}

impl CliDriver {
    pub fn new(criu: Criu) -> Self {
        Self { criu }
    }
}

impl CriuDriver for CliDriver {
    fn criu(&self) -> &Criu {
        &self.criu
    }

    fn dump(&self, call: &DumpCall<'_>, on_notify: &mut dyn FnMut(&str) -> bool) -> Result<(), CriuError> {
        self.dump_tree(call, on_notify)
    }

    fn restore(&self, call: &RestoreCall<'_>, on_notify: &mut dyn FnMut(&str) -> bool) -> Result<i32, CriuError> {
        if call.as_child {
            // `criu restore -d` leaves the tree to the nearest subreaper once CRIU exits.
            become_subreaper().map_err(|source| CriuError::Spawn { binary: self.criu.binary.clone(), source })?;
        }
        self.restore_tree(call, on_notify)
    }
}

/// The descriptors above stdio that `--inherit-fd fd[N]:...` entries name, each checked to be open here.
fn inherited_fds(entries: &[String]) -> Result<Vec<RawFd>, CriuError> {
    let parsed = super::swrk::parse_inherit_fds(entries).map_err(|message| CriuError::BadOption { message })?;
    let mut fds: Vec<RawFd> = parsed.iter().map(|i| i.fd).filter(|fd| *fd > 2).collect();
    fds.sort_unstable();
    fds.dedup();
    for fd in &fds {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(*fd, libc::F_GETFD) } == -1 {
            return Err(CriuError::BadOption {
                message: format!("--inherit-fd fd[{fd}]: descriptor {fd} is not open in this process"),
            });
        }
    }
    Ok(fds)
}

fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integer arguments and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl CliDriver {
    /// Dump a process tree. `on_hook(action)` answers CRIU's action scripts; returning `false` at
    /// `post-dump` makes CRIU resume the tree and fail the dump.
    fn dump_tree(&self, call: &DumpCall<'_>, on_hook: &mut dyn FnMut(&str) -> bool) -> Result<(), CriuError> {
        let (images, _held) = self.images_arg(call.images_dir, call.stream)?;
        let mut args: Vec<String> = vec!["dump".into(), "-t".into(), call.pid.to_string(), "-D".into(), images];
        if call.leave_running {
            args.push("--leave-running".into());
        }
        if call.stream {
            args.push("--stream".into());
        }
        args.extend(call.options.dump_args());
        let null = || std::fs::File::options().read(true).write(true).open("/dev/null");
        let stdio = (0..3)
            .map(|_| null())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CriuError::Spawn { binary: self.criu.binary.clone(), source })?;
        self.run("dump", args, call.work_dir, Some(stdio), Vec::new(), on_hook)
    }

    /// Restore a tree detached; returns the PID of its root.
    fn restore_tree(&self, call: &RestoreCall<'_>, on_hook: &mut dyn FnMut(&str) -> bool) -> Result<i32, CriuError> {
        let pidfile = call.work_dir.join("restore.pid");
        let (images, _held) = self.images_arg(call.images_dir, call.stream)?;
        let mut args: Vec<String> =
            vec!["restore".into(), "-D".into(), images, "-d".into(), "--pidfile".into(), pidfile.display().to_string()];
        if call.stream {
            args.push("--stream".into());
        }
        args.extend(call.options.restore_args());
        let passed = inherited_fds(&call.options.inherit_fd)?;
        let stdio = call.stdio.files().map_err(|source| CriuError::Spawn { binary: self.criu.binary.clone(), source })?;
        self.run("restore", args, call.work_dir, stdio, passed, on_hook)?;
        let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
        text.trim().parse().map_err(|_| CriuError::Failed {
            action: "restore",
            status: "no PID reported".into(),
            errors: vec![format!("CRIU wrote no PID to {}", pidfile.display())],
            hint: None,
            log: call.work_dir.join("restore.log"),
        })
    }

    /// The images folder as CRIU is given it: with `--stream` CRIU connects to its image streamer's socket
    /// in it, whose path must fit a socket address, so a deeper folder goes by this process's descriptor of
    /// it (kept open by the file returned, while CRIU runs).
    fn images_arg(&self, dir: &Path, stream: bool) -> Result<(String, Option<std::fs::File>), CriuError> {
        if !stream {
            return Ok((dir.display().to_string(), None));
        }
        let (path, held) = super::socket::short_dir(dir, super::streamer::LONGEST_SOCKET)
            .map_err(|source| CriuError::Spawn { binary: self.criu.binary.clone(), source })?;
        Ok((path.display().to_string(), held))
    }

    fn run(
        &self,
        action: &'static str,
        mut args: Vec<String>,
        work_dir: &Path,
        stdio: Option<Vec<std::fs::File>>,
        passed: Vec<RawFd>,
        on_hook: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(), CriuError> {
        if !hook::answers_hooks() {
            return Err(CriuError::BadOption {
                message: "this program does not answer CRIU's action scripts (its main does not call \
                          cedana::criu::hook::run_if_invoked), so it cannot drive the criu command line: \
                          use the swrk driver and no image streaming"
                    .into(),
            });
        }
        let hooks = hook::HookServer::bind(work_dir).map_err(|source| CriuError::Hook { dir: work_dir.into(), source })?;
        let me = std::env::current_exe().map_err(|source| CriuError::Hook { dir: work_dir.into(), source })?;
        let log = work_dir.join(format!("{action}.log"));
        args.extend([
            "--work-dir".into(),
            work_dir.display().to_string(),
            "-o".into(),
            log.display().to_string(),
            "-v4".into(),
            "--action-script".into(),
            me.display().to_string(),
        ]);
        tracing::debug!(binary = %self.criu.binary.display(), ?args, "running criu");
        let mut cmd = Command::new(&self.criu.binary);
        cmd.args(&args).env(hook::HOOK_SOCKET_ENV, hooks.socket_path());
        if let Some(mut files) = stdio {
            if let (Some(err), Some(out), Some(inp)) = (files.pop(), files.pop(), files.pop()) {
                cmd.stdin(Stdio::from(inp)).stdout(Stdio::from(out)).stderr(Stdio::from(err));
            }
        }
        // Own process group: a Ctrl-C on the terminal must not kill CRIU while it holds the tree frozen;
        // the engine decides at the next hook instead.
        cmd.process_group(0);
        if !passed.is_empty() {
            // `--inherit-fd fd[N]:...` names our descriptor N, which CRIU must inherit at the same number;
            // ours are close-on-exec (other threads may be spawning too), so only the child clears the flag.
            // SAFETY: the closure runs between fork and exec and only calls fcntl (async-signal-safe) on a
            // vector allocated before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &passed {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|source| CriuError::Spawn { binary: self.criu.binary.clone(), source })?;
        let (exited_tx, exited) = std::sync::mpsc::channel();
        // Without a waiter thread nobody would notice CRIU's exit; dropping the hook server then fails any
        // later hook, so CRIU resumes the tree.
        hooks
            .on_exit(move || {
                let _ = exited_tx.send(child.wait());
            })
            .map_err(|source| CriuError::Hook { dir: work_dir.into(), source })?;
        let status = loop {
            if let Some(call) = hooks.next(Duration::from_secs(1)) {
                let ok = on_hook(&call.action);
                call.reply(ok);
                continue;
            }
            match exited.try_recv() {
                Ok(Ok(status)) => break status,
                Ok(Err(source)) => return Err(CriuError::Spawn { binary: self.criu.binary.clone(), source }),
                Err(_) => {}
            }
        };
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Err(CriuError::Failed {
            action,
            status: crate::binary::describe_status(status),
            errors: log::error_lines(&text),
            hint: log::hint(&text),
            log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherited_descriptors_must_be_open_and_stdio_is_left_alone() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let entries = vec![format!("fd[{fd}]:file[1b:2a]"), "fd[1]:pipe:[9]".to_string(), format!("fd[{fd}]:x")];
        assert_eq!(inherited_fds(&entries).unwrap(), [fd]);
        // A number far above what this test process opens.
        let err = inherited_fds(&["fd[100000]:file[1b:2a]".to_string()]).unwrap_err().to_string();
        assert!(err.contains("not open"), "{err}");
        assert!(inherited_fds(&["1:pipe".to_string()]).is_err());
    }
}
