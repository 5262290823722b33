//! Drive CRIU through either driver, for the driver benchmark (scripts/bench-criu-driver.sh) and the driver
//! tests (integration/tests/criu_drivers.rs):
//!
//!   criu_drivers dump    --driver cli|swrk --pid PID [--pid PID...] --dir DIR [--leave-running] [--refuse SCRIPT]
//!   criu_drivers restore --driver cli|swrk --dir DIR [--dir DIR...] [--as-child] [--wait] [--refuse SCRIPT]
//!                        [--inherit-fd fd[N]:RESOURCE...] [--stdio FILE]
//!   both take [--criu-opts 'CRIU ARGS'] (CriuOptions::extra)
//!
//! `--stdio FILE` gives CRIU FILE (opened for appending) as its stdin, stdout and stderr (`RestoreCall::stdio`).
//! Images go to DIR (with several PIDs, to DIR/PID, dumped at once from one thread each); CRIU's work folder
//! (log, hook socket) is DIR.work beside it. Several `--dir`s are restored at once likewise. Every
//! notification is answered `true` and reported on stderr as `notify: NAME`, except SCRIPT with `--refuse`.
//! stdout: `elapsed SECONDS` (the driver call alone), `restored PID N` per restore; with `--wait` (implies
//! `--as-child`) the restored roots are then waited for by PID and each ends in `PID N exited: code C` or
//! `PID N exited: signal S`. Exit status 1 on any failure.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cedana::criu::cli::CliDriver;
use cedana::criu::options::CriuOptions;
use cedana::criu::swrk::SwrkDriver;
use cedana::criu::{Criu, CriuDriver, DumpCall, RestoreCall};

struct Args {
    action: String,
    driver: String,
    pids: Vec<i32>,
    dirs: Vec<PathBuf>,
    leave_running: bool,
    as_child: bool,
    wait: bool,
    refuse: Option<String>,
    inherit_fd: Vec<String>,
    extra: Vec<String>,
    stdio: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let action = it.next().filter(|a| a == "dump" || a == "restore").ok_or("first argument: dump or restore")?;
    let mut a = Args {
        action,
        driver: String::new(),
        pids: Vec::new(),
        dirs: Vec::new(),
        leave_running: false,
        as_child: false,
        wait: false,
        refuse: None,
        inherit_fd: Vec::new(),
        extra: Vec::new(),
        stdio: None,
    };
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--driver" => a.driver = value()?,
            "--pid" => a.pids.push(value()?.parse().map_err(|e| format!("--pid: {e}"))?),
            "--dir" => a.dirs.push(PathBuf::from(value()?)),
            "--refuse" => a.refuse = Some(value()?),
            "--inherit-fd" => a.inherit_fd.push(value()?),
            "--stdio" => a.stdio = Some(PathBuf::from(value()?)),
            "--criu-opts" => a.extra.extend(cedana::criu::options::parse_extra(&value()?)?),
            "--leave-running" => a.leave_running = true,
            "--as-child" => a.as_child = true,
            "--wait" => a.wait = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.dirs.len() != 1 && a.action == "dump" {
        return Err("dump takes one --dir".into());
    }
    if a.dirs.is_empty() || (a.action == "dump" && a.pids.is_empty()) {
        return Err("missing --dir or --pid".into());
    }
    Ok(a)
}

fn work_dir(images: &Path) -> PathBuf {
    let mut name = images.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".work");
    images.with_file_name(name)
}

fn main() {
    // CRIU runs this binary as the CLI driver's action script.
    cedana::criu::hook::run_if_invoked();
    if let Err(e) = run() {
        eprintln!("criu_drivers: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse()?;
    let criu = Criu::locate(std::env::var_os("CEDANA_CRIU_BINARY_PATH").as_deref().map(Path::new)).map_err(|e| e.to_string())?;
    let driver: Box<dyn CriuDriver> = match args.driver.as_str() {
        "cli" => Box::new(CliDriver::new(criu)),
        "swrk" => Box::new(SwrkDriver::new(criu)),
        other => return Err(format!("--driver cli|swrk, not {other:?}")),
    };
    let driver: &dyn CriuDriver = driver.as_ref();
    let refuse = args.refuse.as_deref();
    let answer = |name: &str| {
        eprintln!("notify: {name}");
        Some(name) != refuse
    };
    if args.action == "dump" {
        let options = CriuOptions { extra: args.extra.clone(), ..CriuOptions::default() };
        let jobs: Vec<(i32, PathBuf)> = if args.pids.len() == 1 {
            vec![(args.pids[0], args.dirs[0].clone())]
        } else {
            args.pids.iter().map(|p| (*p, args.dirs[0].join(p.to_string()))).collect()
        };
        let started = Instant::now();
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(pid, dir)| {
                    let options = &options;
                    s.spawn(move || {
                        let work = work_dir(dir);
                        for d in [dir, &work] {
                            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
                        }
                        let call = DumpCall {
                            pid: *pid,
                            images_dir: dir,
                            work_dir: &work,
                            options,
                            leave_running: args.leave_running,
                            stream: false,
                        };
                        let mut notify = answer;
                        driver.dump(&call, &mut notify).map_err(|e| format!("dump of PID {pid}: {e}"))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a dump thread panicked".into()))).collect()
        });
        println!("elapsed {:.6}", started.elapsed().as_secs_f64());
        return results.into_iter().collect();
    }

    let options = CriuOptions { inherit_fd: args.inherit_fd.clone(), extra: args.extra.clone(), ..CriuOptions::default() };
    let as_child = args.as_child || args.wait;
    let stdio_path = args.stdio.as_deref();
    let started = Instant::now();
    let results: Vec<Result<i32, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = args
            .dirs
            .iter()
            .map(|dir| {
                let options = &options;
                s.spawn(move || {
                    let work = work_dir(dir);
                    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
                    let stdio = match stdio_path {
                        Some(p) => cedana::criu::CriuStdio::All(
                            std::fs::File::options()
                                .append(true)
                                .create(true)
                                .open(p)
                                .map_err(|e| format!("{}: {e}", p.display()))?,
                        ),
                        None => cedana::criu::CriuStdio::Caller,
                    };
                    let call = RestoreCall { images_dir: dir, work_dir: &work, options, stdio, as_child, stream: false };
                    let mut notify = answer;
                    driver.restore(&call, &mut notify).map_err(|e| format!("restore of {}: {e}", dir.display()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a restore thread panicked".into()))).collect()
    });
    println!("elapsed {:.6}", started.elapsed().as_secs_f64());
    let mut pids = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(pid) => {
                println!("restored PID {pid}");
                pids.push(pid);
            }
            Err(e) => failures.push(e),
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if args.wait {
        for pid in pids {
            // Waits for this PID only: the restored root must be our child.
            match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => println!("PID {pid} exited: code {code}"),
                Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => println!("PID {pid} exited: signal {}", sig as i32),
                Ok(other) => println!("PID {pid} wait: {other:?}"),
                Err(e) => failures.push(format!("waitpid({pid}): {e}")),
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}
