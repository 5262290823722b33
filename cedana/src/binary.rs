//! Helpers for the external programs the engine drives (CRIU, runc): where to look for them, and how to
//! describe how they ended.

use std::path::PathBuf;
use std::process::ExitStatus;

/// `name` in every PATH folder, in order, then the `fallbacks` (absolute paths); existence is not checked.
pub fn candidates(name: &str, fallbacks: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect()).unwrap_or_default();
    out.extend(fallbacks.iter().map(PathBuf::from));
    out
}

/// The program `name`: itself when it is a path (holds a `/`) to an existing file, else the first file of
/// that name in PATH.
pub fn find(name: &std::path::Path) -> Option<PathBuf> {
    if name.components().count() > 1 || name.is_absolute() {
        return name.is_file().then(|| name.to_path_buf());
    }
    candidates(&name.to_string_lossy(), &[]).into_iter().find(|p| p.is_file())
}

/// `exit code N` or `killed by signal N`, for error messages.
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_described() {
        let exited = std::process::Command::new("sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(describe_status(exited), "exit code 3");
        let killed = std::process::Command::new("sh").args(["-c", "kill -9 $$"]).status().unwrap();
        assert_eq!(describe_status(killed), "killed by signal 9");
    }

    #[test]
    fn candidates_end_with_the_fallbacks() {
        let c = candidates("criu", &["/opt/x/criu"]);
        assert_eq!(c.last().map(PathBuf::as_path), Some(std::path::Path::new("/opt/x/criu")));
        assert!(c.iter().all(|p| p.ends_with("criu")));
    }

    #[test]
    fn programs_are_found_by_path_or_name() {
        assert!(find(std::path::Path::new("sh")).is_some_and(|p| p.is_absolute()));
        assert_eq!(find(std::path::Path::new("/bin/sh")).as_deref(), Some(std::path::Path::new("/bin/sh")));
        assert!(find(std::path::Path::new("./no-such-program")).is_none());
        assert!(find(std::path::Path::new("no-such-program-anywhere")).is_none());
    }
}
