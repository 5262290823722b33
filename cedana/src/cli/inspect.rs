//! `cedana checkpoint inspect PATH`: print a checkpoint's manifest.

use std::path::PathBuf;

use cedana::checkpoint::read_manifest;
use comfy_table::{presets::NOTHING, Table};
use indicatif::HumanBytes;

#[derive(clap::Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Print the manifest of a checkpoint (and verify it with --verify).
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Checkpoint file or folder.
    pub path: PathBuf,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also check every file against its checksum.
    #[arg(long)]
    pub verify: bool,
}

pub fn run(cmd: CheckpointCommand) -> anyhow::Result<i32> {
    let CheckpointCommand::Inspect(a) = cmd;
    let m = read_manifest(&a.path, a.verify)?;
    if a.json {
        println!("{}", String::from_utf8_lossy(&m.to_json()));
        return Ok(0);
    }
    println!("Checkpoint   {}", a.path.display());
    println!("Kind         {}", m.kind);
    println!("Created      {} on {}", m.created_at.to_rfc3339(), m.hostname);
    println!("Format       v{} ({}), cedana {}, CRIU {}", m.format_version, m.compression, m.cedana_version, m.criu_version);
    println!(
        "Process      PID {} ({}), {} process(es): {:?}",
        m.process.pid,
        m.process.comm,
        m.process.pids.len(),
        m.process.pids
    );
    println!("Command      {}", shell_words::join(&m.process.cmdline));
    println!("Cwd          {}", m.process.cwd);
    if let Some(c) = &m.container {
        println!("Container    {}", c.id);
    }
    let o = &m.criu_options;
    let flags: Vec<&str> = [
        (o.tcp_established, "tcp-established"),
        (o.file_locks, "file-locks"),
        (o.shell_job, "shell-job"),
        (o.ext_unix_sk, "ext-unix-sk"),
    ]
    .iter()
    .filter_map(|(on, n)| on.then_some(*n))
    .collect();
    println!("Restore opts {}", if flags.is_empty() { "-".to_string() } else { flags.join(", ") });
    if let Some(s) = &m.stats {
        println!(
            "CRIU stats   frozen {} us, freezing {} us, memdump {} us, memwrite {} us, pages written {}",
            s.frozen_time_us, s.freezing_time_us, s.memdump_time_us, s.memwrite_time_us, s.pages_written
        );
    }
    if !m.phases.is_empty() {
        let phases: Vec<String> = m.phases.iter().map(|p| format!("{} {:.1} ms", p.phase, p.ms)).collect();
        println!("Dump phases  {}", phases.join(", "));
    }
    if let Some(g) = &m.gpu {
        println!("GPU          {}", super::dump_report::gpu_line(g));
    }
    println!("Images       {} in {} files ({})", HumanBytes(m.images_size()), m.files.len(), m.checksum);
    if a.verify {
        println!("Verified     every checksum matches");
    }
    let mut table = Table::new();
    table.load_style(NOTHING);
    table.set_header(["FILE", "SIZE", "CHECKSUM"]);
    for f in &m.files {
        table.add_row([f.name.clone(), HumanBytes(f.size).to_string(), f.xxh3.clone()]);
    }
    println!("{table}");
    Ok(0)
}
