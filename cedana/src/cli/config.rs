//! `cedana config show`: the effective configuration and where each value came from.

use std::path::Path;

use cedana::config::Config;

#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the effective configuration and the source of each value (default, file, environment).
    Show,
}

pub fn run(_config: &Config, _file: Option<&Path>, _cmd: ConfigCommand) -> anyhow::Result<i32> {
    anyhow::bail!("config show is not built yet")
}
