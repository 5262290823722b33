//! The Attach call: a client's stdin into an attachable job, the job's output and exit status back.
//!
//! The first message names the job. The job's hub ([`cedana::jobs::attach::OutputHub`], held by the
//! supervisor) gives a [`Subscription`]: the last 64 KiB of output, then live output, then the exit. Its
//! `recv` blocks, so a thread of its own per call forwards it into a bounded channel whose receiving end
//! is the response stream. Meanwhile a task pumps the client's later messages into the job's stdin.
//!
//! The stream ends with `exit_code` (the code, 128 + the signal that killed the job, or -1 when the
//! status is unknown). When the job is checkpointed (halted) while a client is attached, the stream ends
//! with an `ABORTED` status saying how to restore it instead. A client that falls too far behind ends with
//! `RESOURCE_EXHAUSTED`, and every client with `UNAVAILABLE` when the daemon stops. When the client goes away, the forwarding thread notices (the channel closes),
//! drops its subscription and ends; the job keeps running. Any number of clients may attach at once.

use std::time::Duration;

use cedana::error::ErrorKind;
use cedana::jobs::attach::{Chunk, RecvError, Subscription};
use cedana::jobs::model::{Job, JobState};
use cedana::jobs::supervisor::ExitInfo;
use cedana_protos::v1 as pb;
use pb::attach_output::Out;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::access::Caller;
use super::convert::status;
use super::service::{Reply, Service};

/// The stream of a job's output, as the generated service wants it.
pub type AttachStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AttachOutput, tonic::Status>> + Send>>;

/// How many output messages may wait for a slow client before the forwarding thread waits (the hub then
/// queues up to its own limit, and disconnects the client beyond it; the job is never held up).
const OUTPUT_QUEUE: usize = 64;
/// How often a forwarding thread with no output to forward checks whether its client is still there.
const IDLE_CHECK: Duration = Duration::from_millis(250);

/// Serve one Attach call.
pub async fn serve(service: Service, request: Request<tonic::Streaming<pb::AttachInput>>) -> Reply<AttachStream> {
    // Listening from the start, so that a stop asked for while this call is set up is not missed.
    let stop = shutdown();
    let caller = Caller::of(&request);
    let mut input = request.into_inner();
    let first = input
        .message()
        .await?
        .ok_or_else(|| status(ErrorKind::InvalidArgument, "the attach stream ended before naming a job"))?;
    if first.jid.is_empty() {
        return Err(status(ErrorKind::InvalidArgument, "no job id given: the first attach message names the job"));
    }
    let (job, subscription) = {
        let service = service.clone();
        let jid = first.jid.clone();
        tokio::task::spawn_blocking(move || open(&service, &caller, &jid))
            .await
            .map_err(|e| status(ErrorKind::Internal, format!("looking up the job: {e}")))??
    };
    tracing::info!(jid = %job.jid, pid = job.pid, "client attached");

    let stdin_task = tokio::spawn(pump_stdin(service.clone(), job.pid, first, input));
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    let forward = Forward { service, job, subscription, tx, stdin_task: stdin_task.abort_handle() };
    let thread = std::thread::Builder::new().name(format!("cedana-attach-{}", forward.job.pid)).spawn(move || forward.run());
    if let Err(e) = thread {
        stdin_task.abort();
        return Err(status(ErrorKind::Internal, format!("starting the attach thread: {e}")));
    }
    let stream = UntilShutdown { inner: tokio_stream::wrappers::ReceiverStream::new(rx), shutdown: stop, done: false };
    Ok(Response::new(Box::pin(stream) as AttachStream))
}

/// Resolves when the daemon is asked to stop (SIGTERM or SIGINT, as [`super::serve`] stops on).
fn shutdown() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    async fn recv(s: Option<Signal>) {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let (term, int) = (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok());
    Box::pin(async move {
        tokio::select! {
            _ = recv(term) => {}
            _ = recv(int) => {}
        }
    })
}

/// The output stream, ended when the daemon stops: the server's graceful shutdown waits for open calls,
/// and an attached job may run (and a client stay attached) for days.
struct UntilShutdown {
    inner: tokio_stream::wrappers::ReceiverStream<Result<pb::AttachOutput, Status>>,
    shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    done: bool,
}

impl tokio_stream::Stream for UntilShutdown {
    type Item = Result<pb::AttachOutput, Status>;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            this.done = true;
            // The forwarding thread sees the channel closed and drops its subscription.
            this.inner.close();
            return Poll::Ready(Some(Err(status(ErrorKind::Unavailable, "the daemon is shutting down"))));
        }
        std::pin::Pin::new(&mut this.inner).poll_next(cx)
    }
}

/// The job named `jid` and a subscription to its output, or why it cannot be attached to.
fn open(service: &Service, caller: &Caller, jid: &str) -> Result<(Job, Subscription), Status> {
    let job = service.store.get(jid).map_err(|e| match e.kind() {
        ErrorKind::NotFound => status(ErrorKind::NotFound, format!("there is no job {jid}: `cedana ps` lists the jobs")),
        kind => status(kind, &e),
    })?;
    caller.check_job(&job)?;
    if !job.attachable {
        return Err(status(
            ErrorKind::FailedPrecondition,
            format!(
                "job {jid} is not attachable: its output goes to {}; start jobs with `cedana run process|runc --attach` \
                 (or --attachable) to attach to them",
                log_of(&job)
            ),
        ));
    }
    if job.state == JobState::Halted {
        return Err(status(
            ErrorKind::FailedPrecondition,
            format!("job {jid} is halted (checkpointed): restore it and attach with `cedana restore job {jid} --attach`"),
        ));
    }
    match service.supervisor.subscribe(job.pid) {
        Ok(sub) => Ok((job, sub)),
        Err(_) if job.state == JobState::Running => Err(status(
            ErrorKind::FailedPrecondition,
            format!(
                "job {jid} (PID {}) runs, but the daemon no longer holds its standard streams (the daemon was \
                 restarted since the job started): its output goes to {}",
                job.pid,
                log_of(&job)
            ),
        )),
        Err(_) => Err(status(
            ErrorKind::FailedPrecondition,
            format!("job {jid} is {}: there is nothing to attach to (its output went to {})", job.state, log_of(&job)),
        )),
    }
}

fn log_of(job: &Job) -> String {
    job.log.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "no log".into())
}

/// The exit code an attached client reports for `status`.
fn exit_code(status: Option<ExitInfo>) -> i32 {
    match status {
        Some(ExitInfo::Exited(code)) => code,
        Some(ExitInfo::Signaled(sig)) => 128 + sig,
        None => -1,
    }
}

/// The client's messages after the first (and the first's own stdin, if any) into the job's stdin, in
/// order. Once writing fails (stdin closed, the job gone), later stdin bytes are dropped.
async fn pump_stdin(service: Service, pid: i32, first: pb::AttachInput, mut input: tonic::Streaming<pb::AttachInput>) {
    let mut writable = true;
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        let pb::AttachInput { stdin, close_stdin, .. } = msg;
        if writable && !stdin.is_empty() {
            let supervisor = service.supervisor.clone();
            // Blocks while the job does not read: off the async threads, one write at a time.
            match tokio::task::spawn_blocking(move || supervisor.write_stdin(pid, &stdin)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(pid, error = %e, "the job's stdin takes no more input");
                    writable = false;
                }
                Err(e) => {
                    tracing::warn!(pid, error = %e, "writing the job's stdin failed");
                    writable = false;
                }
            }
        }
        if close_stdin {
            if let Err(e) = service.supervisor.close_stdin(pid) {
                tracing::debug!(pid, error = %e, "closing the job's stdin");
            }
            writable = false;
        }
        next = match input.message().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(pid, error = %e, "the attached client's input ended");
                None
            }
        };
    }
}

/// One attached client's output: the subscription into the response channel.
struct Forward {
    service: Service,
    job: Job,
    subscription: Subscription,
    tx: mpsc::Sender<Result<pb::AttachOutput, Status>>,
    stdin_task: tokio::task::AbortHandle,
}

impl Forward {
    fn run(mut self) {
        let (jid, pid) = (self.job.jid.clone(), self.job.pid);
        let last = loop {
            let out = match self.subscription.recv_timeout(IDLE_CHECK) {
                Ok(Chunk::Stdout(d)) => Out::Stdout(d),
                Ok(Chunk::Stderr(d)) => Out::Stderr(d),
                Ok(Chunk::Exit(info)) => break self.end(info),
                Err(RecvError::Timeout) => {
                    if self.tx.is_closed() {
                        tracing::info!(%jid, pid, "client detached");
                        break None;
                    }
                    continue;
                }
                Err(RecvError::Ended) => break Some(Ok(Out::ExitCode(-1))),
                Err(RecvError::Lagged) => {
                    break Some(Err(status(
                        ErrorKind::ResourceExhausted,
                        format!(
                            "this client fell too far behind job {jid}'s output and was disconnected (the job \
                             keeps running): attach again with `cedana job attach {jid}`"
                        ),
                    )))
                }
            };
            if self.tx.blocking_send(Ok(pb::AttachOutput { out: Some(out) })).is_err() {
                tracing::info!(%jid, pid, "client detached");
                break None;
            }
        };
        if let Some(last) = last {
            let _ = self.tx.blocking_send(last.map(|out| pb::AttachOutput { out: Some(out) }));
        }
        // The output is over: stop taking input for this client (an unfinished write gives up by itself
        // once the job is gone).
        self.stdin_task.abort();
    }

    /// The last message for a job that ended with `info`: its exit code, unless a dump ended it.
    fn end(&self, info: Option<ExitInfo>) -> Option<Result<Out, Status>> {
        let jid = &self.job.jid;
        let halted = matches!(self.service.store.get(jid), Ok(j) if j.state == JobState::Halted && j.pid == self.job.pid);
        if halted {
            tracing::info!(%jid, "the attached job was checkpointed");
            return Some(Err(Status::aborted(format!(
                "job {jid} was checkpointed and is halted: `cedana restore job {jid} --attach` continues it"
            ))));
        }
        tracing::info!(%jid, pid = self.job.pid, ?info, "the attached job exited");
        Some(Ok(Out::ExitCode(exit_code(info))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_as_a_shell_reports_them() {
        assert_eq!(exit_code(Some(ExitInfo::Exited(3))), 3);
        assert_eq!(exit_code(Some(ExitInfo::Signaled(9))), 137);
        assert_eq!(exit_code(None), -1);
    }
}
