//! `cedana config show`: the effective configuration and where each value came from.

use std::path::Path;

use cedana::config::{Config, Setting, Sources};
use comfy_table::{presets::NOTHING, Table};

#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the effective configuration and the source of each value (default, file, environment).
    Show {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `config` is the configuration the CLI loaded; it is loaded again (from the same file and environment) to
/// learn where each value came from.
pub fn run(_config: &Config, file: Option<&Path>, cmd: ConfigCommand) -> anyhow::Result<i32> {
    let ConfigCommand::Show { json } = cmd;
    let (config, sources) = Config::load_with_sources(file)?;
    let settings = config.describe(&sources);
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(&JsonView::new(&sources, &settings))?)
    } else {
        table(&sources, &settings)
    };
    print_out(&text)?;
    Ok(0)
}

/// Write to stdout; a closed pipe (`cedana config show | head`) is not an error.
pub(super) fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// `{"file": {"path", "chosen_by"} | null, "settings": [{"key", "value", "source", "path"|"var", "env"}]}`.
#[derive(serde::Serialize)]
struct JsonView<'a> {
    file: &'a Option<cedana::config::ConfigFile>,
    settings: &'a [Setting],
}

impl<'a> JsonView<'a> {
    fn new(sources: &'a Sources, settings: &'a [Setting]) -> Self {
        JsonView { file: &sources.file, settings }
    }
}

/// A line naming the config file (and how it was chosen), then KEY VALUE SOURCE.
fn table(sources: &Sources, settings: &[Setting]) -> String {
    let file = match &sources.file {
        Some(f) => format!("Config file: {} ({})", f.path.display(), f.chosen_by),
        None => "Config file: none (defaults and environment only)".to_string(),
    };
    let mut table = Table::new();
    table.load_style(NOTHING);
    table.set_header(["KEY", "VALUE", "SOURCE"]);
    for s in settings {
        table.add_row([s.key.to_string(), s.value.clone().unwrap_or_else(|| "-".into()), s.source.to_string()]);
    }
    format!("{file}\n{table}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_one_row_per_key_with_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[db]\npath = \"/x/jobs.db\"\n").unwrap();
        // The real environment: these assertions hold unless it sets CEDANA_DB_PATH or CEDANA_HOOKS_COMMAND.
        let (config, sources) = Config::load_with_sources(Some(&p)).unwrap();
        let settings = config.describe(&sources);
        let text = table(&sources, &settings);
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), format!("Config file: {} (flag --config)", p.display()));
        assert_eq!(lines.next().unwrap().split_whitespace().collect::<Vec<_>>(), ["KEY", "VALUE", "SOURCE"]);
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows.len(), Config::keys().count(), "{text}");
        assert!(rows.contains(&vec!["db.path", "/x/jobs.db", "file", p.to_str().unwrap()]), "{text}");
        assert!(rows.iter().any(|r| r[0] == "hooks.command" && r[1] == "-"), "{text}");
        let json = serde_json::to_value(JsonView::new(&sources, &settings)).unwrap();
        assert_eq!(json["file"]["chosen_by"], "flag --config");
        assert_eq!(json["settings"][0]["key"], "address");
        let db = json["settings"].as_array().unwrap().iter().find(|s| s["key"] == "db.path").unwrap();
        assert_eq!(db["source"], "file");
    }
}
