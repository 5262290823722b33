//! `cedana features`: which commands support which types, computed from what is built in.
//!
//! Each cell is looked up in the CLI itself (its clap definition: the subcommands and flags it routes), not
//! written by hand: `dump × containerd` turns to yes the day `cedana dump containerd` exists.

use clap::CommandFactory;
use comfy_table::{presets::NOTHING, Table};

/// The columns: what a command acts on.
pub const TYPES: [&str; 4] = ["process", "job", "runc", "containerd"];

/// One cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    Yes,
    No,
    /// The row does not apply to the column (`run job`: a job is what `run` creates).
    NotApplicable,
}

impl Support {
    fn of(b: bool) -> Self {
        if b {
            Support::Yes
        } else {
            Support::No
        }
    }

    fn text(self) -> &'static str {
        match self {
            Support::Yes => "yes",
            Support::No => "no",
            Support::NotApplicable => "-",
        }
    }
}

/// A row: its name and how each cell is computed from the CLI's definition.
struct Feature {
    name: &'static str,
    cell: fn(&Cli, &str) -> Support,
}

/// The CLI as built: its clap definition.
struct Cli(clap::Command);

impl Cli {
    fn built() -> Self {
        Cli(super::Cli::command())
    }

    /// `cedana PATH...`, e.g. `["dump", "process"]`, when it is routed.
    fn command(&self, path: &[&str]) -> Option<&clap::Command> {
        path.iter().try_fold(&self.0, |cmd, name| cmd.find_subcommand(name))
    }

    fn has(&self, path: &[&str]) -> bool {
        self.command(path).is_some()
    }

    /// `cedana PATH... --flag` is accepted.
    fn has_flag(&self, path: &[&str], flag: &str) -> bool {
        self.command(path).is_some_and(|c| c.get_arguments().any(|a| a.get_long() == Some(flag)))
    }
}

/// The rows, in the order printed. `job` means managed jobs through the daemon (`cedana dump job JID`).
const FEATURES: &[Feature] = &[
    Feature { name: "dump", cell: |cli, ty| Support::of(cli.has(&["dump", ty])) },
    Feature { name: "restore", cell: |cli, ty| Support::of(cli.has(&["restore", ty])) },
    Feature { name: "run", cell: |cli, ty| not_for_jobs(ty, || cli.has(&["run", ty])) },
    Feature { name: "manage", cell: |cli, ty| not_for_jobs(ty, || cli.has(&["manage", ty])) },
    Feature {
        name: "manage --upcoming",
        cell: |cli, ty| not_for_jobs(ty, || cli.has_flag(&["manage"], "upcoming") || cli.has_flag(&["manage", ty], "upcoming")),
    },
    Feature {
        name: "attach",
        cell: |cli, ty| {
            let routed = match ty {
                "job" => cli.has(&["job", "attach"]),
                _ => cli.has_flag(&["run", ty], "attach"),
            };
            Support::of(routed)
        },
    },
    Feature {
        name: "GPU",
        cell: |cli, ty| {
            // GPU state is checkpointed wherever the engine dumps (its GPU hook); restores take --skip-gpu-check.
            Support::of(cli.has_flag(&["restore", ty], "skip-gpu-check"))
        },
    },
];

fn not_for_jobs(ty: &str, routed: impl FnOnce() -> bool) -> Support {
    if ty == "job" {
        Support::NotApplicable
    } else {
        Support::of(routed())
    }
}

/// The matrix: one row per feature, one cell per entry of [`TYPES`].
pub fn matrix() -> Vec<(&'static str, Vec<Support>)> {
    let cli = Cli::built();
    FEATURES.iter().map(|f| (f.name, TYPES.iter().map(|ty| (f.cell)(&cli, ty)).collect())).collect()
}

fn table() -> String {
    let mut table = Table::new();
    table.load_style(NOTHING);
    table.set_header(std::iter::once("FEATURE").chain(TYPES));
    for (name, cells) in matrix() {
        table.add_row(std::iter::once(name).chain(cells.iter().map(|c| c.text())));
    }
    format!("{table}\n")
}

pub fn run() -> anyhow::Result<i32> {
    super::config::print_out(&format!(
        "{}job: managed jobs through the daemon (process, runc and containerd jobs); -: does not apply\n",
        table()
    ))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(feature: &str, ty: &str) -> Support {
        let col = TYPES.iter().position(|t| *t == ty).unwrap();
        matrix().into_iter().find(|(n, _)| *n == feature).unwrap().1[col]
    }

    #[test]
    fn the_table_has_the_types_as_columns_and_reads_the_cli() {
        let text = table();
        let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["FEATURE", "process", "job", "runc", "containerd"]);
        assert_eq!(cell("dump", "process"), Support::Yes);
        assert_eq!(cell("dump", "containerd"), Support::Yes);
        assert_eq!(cell("restore", "containerd"), Support::Yes);
        assert_eq!(cell("run", "containerd"), Support::Yes);
        assert_eq!(cell("dump", "job"), Support::Yes);
        assert_eq!(cell("restore", "runc"), Support::Yes);
        assert_eq!(cell("run", "process"), Support::Yes);
        assert_eq!(cell("run", "job"), Support::NotApplicable);
        assert_eq!(cell("manage", "process"), Support::Yes);
        assert_eq!(cell("manage --upcoming", "process"), Support::Yes);
        assert_eq!(cell("manage --upcoming", "containerd"), Support::Yes);
        assert_eq!(cell("GPU", "process"), Support::Yes);
        assert_eq!(cell("GPU", "containerd"), Support::Yes);
        assert!(text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["dump", "yes", "yes", "yes", "yes"]), "{text}");
    }
}
