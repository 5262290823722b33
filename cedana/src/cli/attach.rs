//! Attaching the terminal to an attachable job: `cedana job attach JID`, `cedana attach PID`,
//! `cedana run process --attach`, `cedana restore job --attach`.

use cedana::config::Config;

/// Attach to job `jid` until it exits (its exit code becomes ours) or the user detaches (Ctrl+C).
pub fn attach_job(_config: &Config, jid: &str) -> anyhow::Result<i32> {
    anyhow::bail!("attaching to job {jid} is not built yet")
}

/// Attach to the attachable job whose process is `pid`.
pub fn attach_pid(_config: &Config, pid: i32) -> anyhow::Result<i32> {
    anyhow::bail!("attaching to PID {pid} is not built yet")
}
