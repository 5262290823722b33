//! The `cedana` binary: the CLI front end of the engine, and the daemon (`cedana daemon start`).

mod cli;
mod containerd;
mod daemon;

use clap::Parser;

fn main() {
    // CRIU runs this binary as its action script during dumps and restores.
    cedana::criu::hook::run_if_invoked();
    // The daemon runs it as the stdio holder of each attachable job.
    cedana::jobs::holder::run_if_invoked();
    let cli = cli::Cli::parse();
    // The flag, else the configuration (its file or CEDANA_LOG_LEVEL), else warn; RUST_LOG overrides all.
    let level = cli.log_level.clone().unwrap_or_else(|| match cedana::config::Config::load_from(cli.config.as_deref()) {
        Ok(c) => c.log_level().to_string(),
        Err(_) => cedana::config::DEFAULT_LOG_LEVEL.to_string(),
    });
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    match cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("Error: {}", cli::advice::render(&err));
            std::process::exit(1);
        }
    }
}
