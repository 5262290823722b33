//! The `cedana` binary: the CLI front end of the engine, and the daemon (`cedana daemon start`).

mod cli;
mod daemon;

use clap::Parser;

fn main() {
    // CRIU runs this binary as its action script during dumps and restores.
    cedana::criu::hook::run_if_invoked();
    let cli = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    match cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("Error: {}", cli::advice::render(&err));
            std::process::exit(1);
        }
    }
}
