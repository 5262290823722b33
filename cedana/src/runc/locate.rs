//! Finding the real runc: `$CEDANA_RUNC_BINARY`, else `runc` on PATH, else the usual install places; never
//! cedana-runc itself (it may be installed as `runc`, and must not end up calling itself).

use std::path::{Path, PathBuf};

use super::RuncError;

/// Environment variable naming the real runc binary.
pub const RUNC_BINARY_ENV: &str = "CEDANA_RUNC_BINARY";

const FALLBACKS: [&str; 4] = ["/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc", "/usr/local/bin/runc"];

/// The real runc binary.
pub fn locate() -> Result<PathBuf, RuncError> {
    let me = std::env::current_exe().ok().and_then(|p| p.canonicalize().ok());
    if let Some(path) = std::env::var_os(RUNC_BINARY_ENV).filter(|v| !v.is_empty()).map(PathBuf::from) {
        let resolved =
            resolve(&path).ok_or_else(|| RuncError::NotFound { tried: format!("{RUNC_BINARY_ENV}={}", path.display()) })?;
        if is_self(&resolved, me.as_deref()) {
            return Err(RuncError::Recursion { binary: path, resolved });
        }
        return Ok(resolved);
    }
    crate::binary::candidates("runc", &FALLBACKS)
        .iter()
        .filter_map(|c| resolve(c))
        .find(|r| !is_self(r, me.as_deref()))
        .ok_or_else(|| RuncError::NotFound { tried: format!("runc on PATH, {}", FALLBACKS.join(", ")) })
}

/// The canonical path of an executable file, if `path` is one (relative names are looked up on PATH).
fn resolve(path: &Path) -> Option<PathBuf> {
    let path = if path.components().count() == 1 {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(path)).find(|c| c.is_file()))?
    } else {
        path.to_path_buf()
    };
    let resolved = path.canonicalize().ok()?;
    use std::os::unix::fs::PermissionsExt;
    let meta = resolved.metadata().ok()?;
    (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(resolved)
}

fn is_self(resolved: &Path, me: Option<&Path>) -> bool {
    me == Some(resolved) || resolved.file_name().is_some_and(|n| n == "cedana-runc")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cedana_runc_is_never_the_real_runc() {
        assert!(is_self(Path::new("/x/cedana-runc"), None));
        assert!(is_self(Path::new("/x/runc"), Some(Path::new("/x/runc"))));
        assert!(!is_self(Path::new("/usr/sbin/runc"), Some(Path::new("/x/runc"))));
    }

    #[test]
    fn resolve_needs_an_executable_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("runc");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        assert_eq!(resolve(&f), None);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve(&f), Some(f.canonicalize().unwrap()));
        assert_eq!(resolve(dir.path()), None);
    }
}
