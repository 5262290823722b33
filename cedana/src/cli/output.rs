//! How a dump or a restore reports its result: text (a summary, the timings tree when profiling is on, and
//! for dumps a last line ending in the checkpoint's path) or one JSON object (`--output json`).

use serde_json::{Map, Value};

use super::timings::Timings;

/// The report's format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// A summary for people; scripts take the last field of the last line of a dump.
    #[default]
    Text,
    /// One JSON object on stdout, and nothing else.
    Json,
}

/// `--output text|json` (and `--json`, the same as `--output json`), taken by every dump and restore.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Report format: text, or json (one object with the whole result and nothing else on stdout).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Format::Text)]
    pub output: Format,
    /// The same as --output json.
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
}

impl OutputArgs {
    /// The format asked for.
    pub fn format(&self) -> Format {
        if self.json {
            Format::Json
        } else {
            self.output
        }
    }
}

/// What to print of a result: its format, and (text) whether timings are printed (`profiling.enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub format: Format,
    pub profiling: bool,
}

impl Report {
    /// The report `args` ask for under `config`.
    pub fn new(args: &OutputArgs, config: &cedana::config::Config) -> Report {
        Report { format: args.format(), profiling: config.profiling_enabled() }
    }

    /// The timings tree, if the report shows one (text with profiling on), else nothing.
    pub fn timings_text(&self, timings: &Timings) -> String {
        match (self.format, self.profiling) {
            (Format::Text, true) => timings.render(),
            _ => String::new(),
        }
    }
}

/// The `timings_ms` member of a JSON report: every phase by its path (`criu dump/frozen`), and `total`.
pub fn timings_json(timings: &Timings) -> Value {
    let map: Map<String, Value> = timings.flattened_ms().into_iter().map(|(k, v)| (k, Value::from(v))).collect();
    Value::Object(map)
}

/// One JSON object on one line.
pub fn json_line(value: &Value) -> String {
    format!("{value}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        out: OutputArgs,
    }

    #[test]
    fn output_json_and_its_alias_choose_json_and_text_is_the_default() {
        let f = |args: &[&str]| Cmd::try_parse_from([&["x"][..], args].concat()).map(|c| c.out.format());
        assert_eq!(f(&[]).unwrap(), Format::Text);
        assert_eq!(f(&["--output", "json"]).unwrap(), Format::Json);
        assert_eq!(f(&["--json"]).unwrap(), Format::Json);
        assert_eq!(f(&["--output", "text"]).unwrap(), Format::Text);
        assert!(f(&["--output", "yaml"]).is_err());
    }

    #[test]
    fn timings_are_text_only_and_only_when_profiling() {
        let t = Timings { phases: Vec::new(), total: std::time::Duration::from_millis(2) };
        assert!(Report { format: Format::Text, profiling: true }.timings_text(&t).ends_with("└─ total  2.0 ms\n"));
        assert_eq!(Report { format: Format::Text, profiling: false }.timings_text(&t), "");
        assert_eq!(Report { format: Format::Json, profiling: true }.timings_text(&t), "");
        assert_eq!(timings_json(&t), serde_json::json!({"total": 2.0}));
    }
}
