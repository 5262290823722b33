//! `cedana dump ...`

use cedana::codec::Compression;
use cedana::engine::{self, Destination, DumpRequest, Engine, TargetSpec};
use indicatif::HumanBytes;

use super::{ms, CriuFlags};

#[derive(clap::Subcommand, Debug)]
pub enum DumpCommand {
    /// Checkpoint a process tree by PID.
    Process(ProcessArgs),
    /// Checkpoint a runc container (also Docker's) by id.
    Runc(super::runc::DumpArgs),
    /// Checkpoint a managed job (through the daemon).
    Job(JobArgs),
}

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// The job's id.
    pub jid: String,
    #[command(flatten)]
    pub common: CommonDumpArgs,
}

/// `cedana dump job JID`: the daemon checkpoints the job and records the checkpoint.
pub fn job(config: &cedana::config::Config, a: JobArgs) -> anyhow::Result<i32> {
    use cedana_protos::v1 as pb;
    let options = a.common.criu.to_options()?;
    let req = pb::DumpRequest {
        target: Some(pb::dump_request::Target::Jid(a.jid.clone())),
        dir: match &a.common.dir {
            Some(d) if !d.contains("://") => std::path::absolute(d)?.display().to_string(),
            Some(d) => d.clone(),
            None => String::new(),
        },
        name: a.common.name.clone().unwrap_or_default(),
        compression: a.common.compression.map(|c| c.to_string()).unwrap_or_default(),
        criu: Some(crate::daemon::convert::criu_to_pb(&options, a.common.criu.leave_running)),
        runtime_root: String::new(),
    };
    let out = super::jobs::with_daemon(config, async |c| c.dump(req).await.map(|r| r.into_inner()))?;
    println!(
        "Dumped job {} (PID {}, {}) in {}, size {}: {}",
        a.jid,
        out.pid,
        out.comm,
        ms(std::time::Duration::from_micros(out.total_time_us)),
        super::jobs::human_size(out.size),
        out.path
    );
    Ok(0)
}

/// Flags of every dump.
#[derive(clap::Args, Debug)]
pub struct CommonDumpArgs {
    /// Parent folder of the checkpoint (default: the configured one, or /tmp).
    #[arg(long, short = 'd')]
    pub dir: Option<String>,
    /// Name of the checkpoint (default: dump-<type>-<id>-<time>).
    #[arg(long)]
    pub name: Option<String>,
    /// none | tar | gzip | lz4 | zlib | zstd (default: the configured one, or tar).
    #[arg(long, value_parser = parse_compression)]
    pub compression: Option<Compression>,
    #[command(flatten)]
    pub criu: CriuFlags,
}

#[derive(clap::Args, Debug)]
pub struct ProcessArgs {
    /// PID of the root of the tree to checkpoint.
    pub pid: i32,
    #[command(flatten)]
    pub common: CommonDumpArgs,
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    s.parse().map_err(|e: cedana::codec::CodecError| e.to_string())
}

impl CommonDumpArgs {
    pub(super) fn request(&self, engine: &Engine, target: TargetSpec) -> anyhow::Result<DumpRequest> {
        let config = engine.config();
        let destination = match &self.dir {
            Some(d) => Destination::parse(d),
            None => Destination::dir(config.checkpoint_dir()),
        };
        Ok(DumpRequest {
            target,
            destination,
            name: self.name.clone(),
            compression: self.compression.unwrap_or_else(|| config.compression()),
            leave_running: self.criu.leave_running,
            options: self.criu.to_options()?,
        })
    }
}

pub fn run(engine: &Engine, cmd: DumpCommand) -> anyhow::Result<i32> {
    let req = match cmd {
        DumpCommand::Process(a) => a.common.request(engine, TargetSpec::Process { pid: a.pid })?,
        DumpCommand::Runc(a) => super::runc::dump(engine, &a)?,
        DumpCommand::Job(a) => return job(engine.config(), a),
    };
    // A signal cancels the dump at the next safe point; CRIU then resumes the process.
    let ctx = super::op_context(true)?;
    let out = engine.dump(req, &ctx)?;
    print_summary(&out);
    Ok(0)
}

fn print_summary(out: &engine::DumpOutcome) {
    let m = &out.manifest;
    match &m.container {
        Some(c) => println!("Dumped container {} (PID {}, {}) to {}", c.id, m.process.pid, m.process.comm, out.path.display()),
        None => println!("Dumped PID {} ({}) to {}", m.process.pid, m.process.comm, out.path.display()),
    }
    println!("  size      {} ({}, images {})", HumanBytes(out.size), m.compression, HumanBytes(m.images_size()));
    if let Some(s) = &m.stats {
        let us = |v: u64| ms(std::time::Duration::from_micros(v));
        println!(
            "  frozen    {} (freezing {}, memdump {}, memwrite {})",
            us(s.frozen_time_us),
            us(s.freezing_time_us),
            us(s.memdump_time_us),
            us(s.memwrite_time_us)
        );
        println!("  pages     {} written, {} scanned", s.pages_written, s.pages_scanned);
    }
    println!("  time      {} (criu {}, packaging {})", ms(out.total_time), ms(out.criu_time), ms(out.package_time));
    if !out.detected.is_empty() {
        println!("  detected  {}", out.detected.join(" "));
    }
    if m.process.pids.len() > 1 {
        println!("  tree      {} processes", m.process.pids.len());
    }
}
