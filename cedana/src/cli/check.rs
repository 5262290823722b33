//! `cedana check`: which CRIU, which version, and whether it works here; `--full` checks everything else
//! too (see [`super::check_full`]).

use cedana::config::Config;
use cedana::criu::Criu;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Check everything, as one table: CRIU and its features, runc, containerd, GPUs, checkpoint storage.
    #[arg(long)]
    pub full: bool,
}

pub fn run(config: &Config, args: CheckArgs) -> anyhow::Result<i32> {
    if args.full {
        return Ok(super::check_full::run(config));
    }
    let criu = match Criu::locate(config.criu.binary_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            println!("CRIU        missing");
            println!("  {e}: {}", super::advice::CRIU_INSTALL);
            return Ok(1);
        }
    };
    println!("CRIU binary {}", criu.binary().display());
    let version = match criu.supported_version() {
        Ok(v) => v,
        Err(e) => {
            println!("CRIU        unusable");
            println!("  {e}: {}", super::advice::CRIU_INSTALL);
            return Ok(1);
        }
    };
    println!("CRIU        {version}");
    let (ok, output) = criu.check()?;
    println!("criu check  {}", if ok { "ok" } else { "FAILED" });
    for line in output.lines() {
        println!("  {line}");
    }
    let tracking = criu.has_feature("mem_dirty_track")?;
    println!(
        "mem tracking {}",
        if tracking {
            "ok (pre-dumps and incremental checkpoints)"
        } else {
            "off: this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY), so pre-dumps are not possible; full checkpoints work"
        }
    );
    let iptables = ["/usr/sbin/iptables-restore", "/sbin/iptables-restore"].iter().any(|p| std::path::Path::new(p).exists());
    println!(
        "iptables    {}",
        if iptables {
            "ok (network locking for --tcp-established and containers)"
        } else {
            "missing: install iptables (scripts/setup.sh does)"
        }
    );
    if nix::unistd::geteuid().is_root() {
        println!("privileges  root");
    } else {
        println!("privileges  not root: CRIU needs root; run cedana with sudo");
        return Ok(1);
    }
    if !ok {
        println!("CRIU does not work on this machine: see its output above; scripts/setup.sh installs a CRIU that does");
        return Ok(1);
    }
    Ok(0)
}
