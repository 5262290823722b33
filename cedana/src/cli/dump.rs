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
    let req = match &cmd {
        DumpCommand::Process(a) => a.common.request(engine, TargetSpec::Process { pid: a.pid })?,
        DumpCommand::Runc(a) => super::runc::dump(engine, a)?,
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
