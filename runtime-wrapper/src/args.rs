//! runc's command line as containerd's shim, go-runc and dockerd write it: global flags, a command, and
//! the command's flags (single- or double-dash, `--flag value` or `--flag=value`, flags after positionals
//! too, as runc's urfave/cli reorders them).

use std::ffi::OsString;
use std::path::PathBuf;

/// How runc writes its log (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// runc's global flags, as far as the wrapper needs them.
#[derive(Debug, Clone, Default)]
pub struct Globals {
    pub root: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub log_format: LogFormat,
    pub debug: bool,
    /// Every global flag but `--root`, `--log` and `--log-format`, normalised to `--name[=value]` tokens,
    /// for the runc we run.
    pub forward: Vec<OsString>,
}

/// One invocation: globals, the command, and its arguments (everything after the command).
#[derive(Debug, Clone)]
pub struct Invocation {
    pub globals: Globals,
    pub command: Option<String>,
    pub args: Vec<String>,
}

/// Global flags that take a value (runc 1.1).
const GLOBAL_VALUES: [&str; 5] = ["root", "log", "log-format", "criu", "rootless"];
/// Global boolean flags.
const GLOBAL_BOOLS: [&str; 6] = ["debug", "systemd-cgroup", "help", "h", "version", "v"];

/// `--name=value`, `-name value`, ... → (name, inline value), or `None` for a positional.
fn split_flag(token: &str) -> Option<(&str, Option<&str>)> {
    let body = token.strip_prefix("--").or_else(|| token.strip_prefix('-'))?;
    if body.is_empty() {
        return None;
    }
    Some(match body.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (body, None),
    })
}

/// Parse argv (without argv[0]). `None` when a global flag is unknown or lacks its value: the caller then
/// hands the whole command line to runc, which reports the problem its own way.
pub fn parse(argv: &[String]) -> Option<Invocation> {
    let mut globals = Globals::default();
    let mut i = 0;
    while i < argv.len() {
        let token = &argv[i];
        if token == "--" {
            i += 1;
            break;
        }
        let Some((name, inline)) = split_flag(token) else { break };
        if GLOBAL_BOOLS.contains(&name) {
            if name == "help" || name == "h" || name == "version" || name == "v" {
                return None;
            }
            globals.debug |= name == "debug";
            globals.forward.push(token.into());
            i += 1;
            continue;
        }
        if !GLOBAL_VALUES.contains(&name) {
            return None;
        }
        let value = match inline {
            Some(v) => v.to_string(),
            None => {
                i += 1;
                argv.get(i)?.clone()
            }
        };
        match name {
            "root" => globals.root = Some(PathBuf::from(&value)),
            "log" => globals.log = Some(PathBuf::from(&value)),
            "log-format" => globals.log_format = if value == "json" { LogFormat::Json } else { LogFormat::Text },
            _ => {}
        }
        if !matches!(name, "root" | "log" | "log-format") {
            globals.forward.push(format!("--{name}={value}").into());
        }
        i += 1;
    }
    let command = argv.get(i).cloned();
    let args = argv.get(i + 1..).map(<[String]>::to_vec).unwrap_or_default();
    Some(Invocation { globals, command, args })
}

/// Which flags a command takes: with a value, boolean, and aliases (`b` → `bundle`).
pub struct Spec {
    pub values: &'static [&'static str],
    pub bools: &'static [&'static str],
    pub aliases: &'static [(&'static str, &'static str)],
}

/// A parsed command line of one command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandArgs {
    /// Flags in order, by canonical name; booleans carry `None` (or their explicit `=value`).
    pub flags: Vec<(String, Option<String>)>,
    pub positionals: Vec<String>,
}

impl CommandArgs {
    /// The value of flag `name` (the last one given).
    pub fn value(&self, name: &str) -> Option<&str> {
        self.flags.iter().rev().find(|(n, _)| n == name).and_then(|(_, v)| v.as_deref())
    }

    /// Whether boolean flag `name` is on.
    pub fn on(&self, name: &str) -> bool {
        match self.flags.iter().rev().find(|(n, _)| n == name) {
            Some((_, None)) => true,
            Some((_, Some(v))) => v == "true" || v == "1",
            None => false,
        }
    }

    /// The flags other than `skip`, back as `--name[=value]` tokens.
    pub fn tokens_without(&self, skip: &[&str]) -> Vec<OsString> {
        self.flags
            .iter()
            .filter(|(n, _)| !skip.contains(&n.as_str()))
            .map(|(n, v)| match v {
                Some(v) => format!("--{n}={v}").into(),
                None => format!("--{n}").into(),
            })
            .collect()
    }
}

impl Spec {
    /// Parse `args` of a command; `None` for an unknown flag or a missing value (runc then reports it).
    pub fn parse(&self, args: &[String]) -> Option<CommandArgs> {
        let mut out = CommandArgs::default();
        let mut i = 0;
        while i < args.len() {
            let token = &args[i];
            i += 1;
            if token == "--" {
                out.positionals.extend(args[i..].iter().cloned());
                break;
            }
            let Some((name, inline)) = split_flag(token) else {
                out.positionals.push(token.clone());
                continue;
            };
            let name = self.aliases.iter().find(|(a, _)| *a == name).map(|(_, n)| *n).unwrap_or(name);
            if self.bools.contains(&name) {
                out.flags.push((name.to_string(), inline.map(str::to_string)));
            } else if self.values.contains(&name) {
                let value = match inline {
                    Some(v) => v.to_string(),
                    None => {
                        let v = args.get(i)?.clone();
                        i += 1;
                        v
                    }
                };
                out.flags.push((name.to_string(), Some(value)));
            } else {
                return None;
            }
        }
        Some(out)
    }
}

/// `runc checkpoint` (1.1).
pub const CHECKPOINT: Spec = Spec {
    values: &["image-path", "work-path", "parent-path", "status-fd", "page-server", "manage-cgroups-mode", "empty-ns"],
    bools: &[
        "leave-running",
        "tcp-established",
        "ext-unix-sk",
        "shell-job",
        "lazy-pages",
        "file-locks",
        "pre-dump",
        "auto-dedup",
    ],
    aliases: &[],
};

/// `runc restore` (1.1).
pub const RESTORE: Spec = Spec {
    values: &[
        "console-socket",
        "image-path",
        "work-path",
        "manage-cgroups-mode",
        "bundle",
        "pid-file",
        "empty-ns",
        "lsm-profile",
        "lsm-mount-context",
    ],
    bools: &[
        "tcp-established",
        "ext-unix-sk",
        "shell-job",
        "file-locks",
        "detach",
        "no-subreaper",
        "no-pivot",
        "auto-dedup",
        "lazy-pages",
    ],
    aliases: &[("b", "bundle"), ("d", "detach")],
};

/// `runc create` (1.1).
pub const CREATE: Spec = Spec {
    values: &["bundle", "console-socket", "pid-file", "preserve-fds"],
    bools: &["no-pivot", "no-new-keyring"],
    aliases: &[("b", "bundle")],
};

/// `runc run` (1.1).
pub const RUN: Spec = Spec {
    values: &["bundle", "console-socket", "pid-file", "preserve-fds"],
    bools: &["detach", "keep", "no-subreaper", "no-pivot", "no-new-keyring"],
    aliases: &[("b", "bundle"), ("d", "detach")],
};

/// `runc start` (1.1).
pub const START: Spec = Spec { values: &[], bools: &[], aliases: &[] };

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn globals_in_every_spelling() {
        let inv =
            parse(&v("--root /r -log /l.json --log-format=json -systemd-cgroup --criu /c checkpoint --leave-running x")).unwrap();
        assert_eq!(inv.globals.root, Some("/r".into()));
        assert_eq!(inv.globals.log, Some("/l.json".into()));
        assert_eq!(inv.globals.log_format, LogFormat::Json);
        assert_eq!(inv.globals.forward, ["-systemd-cgroup", "--criu=/c"]);
        assert_eq!(inv.command.as_deref(), Some("checkpoint"));
        assert_eq!(inv.args, ["--leave-running", "x"]);
    }

    #[test]
    fn unknown_globals_and_help_go_to_runc() {
        assert!(parse(&v("--bogus list")).is_none());
        assert!(parse(&v("--root")).is_none());
        assert!(parse(&v("--version")).is_none());
        let inv = parse(&v("list")).unwrap();
        assert_eq!(inv.command.as_deref(), Some("list"));
        assert!(parse(&[]).unwrap().command.is_none());
    }

    #[test]
    fn command_flags_in_go_runc_style() {
        let a = RESTORE
            .parse(&v(
                "--image-path /i --work-path /w --detach --pid-file /p -no-subreaper --bundle /b id1 --tcp-established=false",
            ))
            .unwrap();
        assert_eq!(a.value("image-path"), Some("/i"));
        assert_eq!(a.value("bundle"), Some("/b"));
        assert!(a.on("detach") && a.on("no-subreaper") && !a.on("tcp-established"));
        assert_eq!(a.positionals, ["id1"]);
        assert_eq!(
            a.tokens_without(&["image-path", "bundle", "pid-file", "work-path", "detach"]),
            ["--no-subreaper", "--tcp-established=false"]
        );
        let c = CREATE.parse(&v("-b /b -pid-file=/p c1")).unwrap();
        assert_eq!((c.value("bundle"), c.value("pid-file")), (Some("/b"), Some("/p")));
        assert!(CREATE.parse(&v("--bogus c1")).is_none());
        assert!(CHECKPOINT.parse(&v("c1 --image-path")).is_none());
    }
}
