//! Attaching the terminal to an attachable job: `cedana job attach JID`, `cedana attach PID`,
//! `cedana run process --attach`, `cedana restore job --attach`.
//!
//! Our stdin goes to the job (a thread reads it; at end of file the job's stdin is closed), the job's
//! stdout and stderr come to ours, and its exit code becomes ours. Ctrl+C (SIGINT) detaches: the job keeps
//! running and can be attached to again.

use std::io::{Read, Write};

use anyhow::Context;
use cedana::config::Config;
use cedana_protos::v1 as pb;
use pb::attach_output::Out;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::daemon;

/// How much of our stdin one message carries at most.
const STDIN_CHUNK: usize = 32 * 1024;

/// Attach to job `jid` until it exits (its exit code becomes ours) or the user detaches (Ctrl+C).
pub fn attach_job(config: &Config, jid: &str) -> anyhow::Result<i32> {
    let target = daemon::Target::of(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(attach(target, jid))
}

/// Attach to the attachable job whose process is `pid`.
pub fn attach_pid(config: &Config, pid: i32) -> anyhow::Result<i32> {
    let list = super::jobs::with_daemon(config, async |c| c.list(pb::ListRequest {}).await.map(|r| r.into_inner()))?;
    let jid = job_of_pid(&list.jobs, pid)?;
    attach_job(config, &jid)
}

/// The job to attach to for `pid`: its running job, which must be attachable.
fn job_of_pid(jobs: &[pb::Job], pid: i32) -> anyhow::Result<String> {
    let mut with_pid = jobs.iter().filter(|j| j.pid == pid);
    let job = match with_pid.clone().find(|j| j.state() == pb::JobState::Running) {
        Some(job) => job,
        None => match with_pid.next() {
            Some(j) => anyhow::bail!(
                "job {} (PID {pid}) is {}, not running: there is nothing to attach to{}",
                j.jid,
                j.status,
                if j.state() == pb::JobState::Halted {
                    format!(" (restore it with `cedana restore job {} --attach`)", j.jid)
                } else {
                    String::new()
                }
            ),
            None => anyhow::bail!(
                "no managed job has PID {pid}: `cedana ps` lists the jobs and their PIDs (only jobs started with \
                 `cedana run process --attach` or --attachable can be attached to)"
            ),
        },
    };
    if !job.attachable {
        anyhow::bail!(
            "job {} (PID {pid}) is not attachable: its output goes to {} (only jobs started with `cedana run \
             process --attach` or --attachable can be attached to)",
            job.jid,
            job.log
        );
    }
    Ok(job.jid.clone())
}

async fn attach(target: daemon::Target, jid: &str) -> anyhow::Result<i32> {
    // Installed before anything else, so that a Ctrl+C always detaches rather than killing us halfway.
    let mut interrupt = signal(SignalKind::interrupt()).context("handling Ctrl+C")?;
    let mut client = daemon::connect(target).await?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::AttachInput { jid: jid.to_string(), ..Default::default() })
        .await
        .map_err(|_| anyhow::anyhow!("attach stream closed"))?;
    let mut output =
        client.attach(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(|s| status_error(jid, s))?.into_inner();
    // A plain thread, not the runtime's blocking pool: a read of a terminal never returns until the user
    // types, and the runtime would wait for it when we are done.
    std::thread::Builder::new().name("attach-stdin".into()).spawn(move || forward_stdin(tx))?;

    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    loop {
        let msg = tokio::select! {
            _ = interrupt.recv() => {
                eprintln!("detached from {jid} (it keeps running)");
                return Ok(0);
            }
            msg = output.message() => msg,
        };
        let out = match msg {
            Ok(Some(pb::AttachOutput { out: Some(out) })) => out,
            Ok(Some(pb::AttachOutput { out: None })) => continue,
            Ok(None) => anyhow::bail!(
                "the daemon ended the attach to {jid} before the job exited (was the daemon stopped?): once the \
                 daemon runs again, `cedana ps` shows whether the job still runs"
            ),
            Err(s) if s.code() == tonic::Code::Aborted => {
                // The job was checkpointed: not a failure of ours, and the message says how to go on.
                eprintln!("{}", s.message());
                return Ok(0);
            }
            Err(s) => return Err(status_error(jid, s)),
        };
        let written = match out {
            Out::Stdout(data) => stdout.write_all(&data).and_then(|()| stdout.flush()),
            Out::Stderr(data) => stderr.write_all(&data).and_then(|()| stderr.flush()),
            Out::ExitCode(code) => return Ok(code),
        };
        match written {
            Ok(()) => {}
            // Whoever read our output is gone (`cedana job attach X | head`): detach quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
            Err(e) => return Err(e).context("writing the job's output"),
        }
    }
}

/// Our stdin into the attach stream until end of file, then close the job's stdin.
fn forward_stdin(tx: mpsc::Sender<pb::AttachInput>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if tx.blocking_send(pb::AttachInput { stdin: buf[..n].to_vec(), ..Default::default() }).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading stdin failed: closing the job's stdin");
                break;
            }
        }
    }
    let _ = tx.blocking_send(pb::AttachInput { close_stdin: true, ..Default::default() });
}

/// A status from the daemon as an error for the user.
fn status_error(jid: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => anyhow::anyhow!(
            "lost the connection to the daemon while attached to {jid} ({}): once the daemon runs again, \
             `cedana ps` shows whether the job still runs",
            s.message()
        ),
        code => anyhow::anyhow!("{} ({})", s.message(), daemon::convert::kind_of(code)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(jid: &str, pid: i32, state: pb::JobState, attachable: bool) -> pb::Job {
        pb::Job {
            jid: jid.into(),
            pid,
            state: state as i32,
            status: state.as_str_name().into(),
            attachable,
            log: "/var/log/x.log".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_pid_names_its_running_attachable_job() {
        let jobs = [
            job("old", 10, pb::JobState::Exited, true),
            job("live", 10, pb::JobState::Running, true),
            job("plain", 11, pb::JobState::Running, false),
            job("halted", 12, pb::JobState::Halted, true),
        ];
        assert_eq!(job_of_pid(&jobs, 10).unwrap(), "live");
        let e = job_of_pid(&jobs, 11).unwrap_err().to_string();
        assert!(e.contains("not attachable") && e.contains("/var/log/x.log"), "{e}");
        let e = job_of_pid(&jobs, 12).unwrap_err().to_string();
        assert!(e.contains("restore job halted --attach"), "{e}");
        let e = job_of_pid(&jobs, 13).unwrap_err().to_string();
        assert!(e.contains("no managed job has PID 13") && e.contains("cedana ps"), "{e}");
    }
}
