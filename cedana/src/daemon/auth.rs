//! Access control for the daemon on TCP. The Unix socket is root-only (0600), but a TCP port is open to every
//! local user (and to the network, unless bound to loopback) while the daemon runs as root and can dump and
//! restore any process: every call over TCP, except the standard health check, must carry the token of a
//! root-only file as `authorization: Bearer <token>` (compared in constant time).
//!
//! `cedana daemon token` writes a fresh token (32 random bytes, hex) to that file, 0600, atomically.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The fewest characters a token may have (a generated one has 64).
pub const MIN_TOKEN_LEN: usize = 32;

/// Random bytes in a generated token.
const GENERATED_BYTES: usize = 32;

/// How a token file can be unusable; every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no token file at {path}: the daemon serves TCP only with a token every client must send; create one \
         with `sudo cedana daemon token` (or set daemon.token_file / CEDANA_DAEMON_TOKEN_FILE to another file \
         of yours, mode 0600)"
    )]
    Missing { path: PathBuf },
    #[error(
        "cannot read the daemon's token file {path} ({source}): over TCP every call needs that token: run as \
         root, or set daemon.token_file / CEDANA_DAEMON_TOKEN_FILE to a copy only you can read"
    )]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "the token file {path} can be read by group or others (mode {mode:04o}), and anyone who reads it \
         controls the daemon: run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "the token file {path} belongs to uid {owner}, not to the daemon's user (uid {expected}): run \
         `chown root {path}` or create a new one with `sudo cedana daemon token --force`"
    )]
    Owner { path: PathBuf, owner: u32, expected: u32 },
    #[error("the token file {path} holds no usable token ({reason}): create one with `sudo cedana daemon token --force`")]
    Invalid { path: PathBuf, reason: &'static str },
    #[error("the token file {path} already exists: pass --force to replace it (clients then need the new token)")]
    Exists { path: PathBuf },
    #[error("writing the token file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// A daemon token, read from its file. Its `Debug` hides it.
#[derive(Clone)]
pub struct Token {
    secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// The token in a file's text: surrounding whitespace (a trailing newline) is ignored; the rest must be
    /// at least [`MIN_TOKEN_LEN`] visible ASCII characters (it travels in a gRPC metadata value).
    pub fn parse(text: &str) -> Result<Token, &'static str> {
        let secret = text.trim();
        if secret.is_empty() {
            return Err("the file is empty");
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("only visible ASCII characters are allowed, without spaces");
        }
        if secret.len() < MIN_TOKEN_LEN {
            return Err("shorter than 32 characters");
        }
        Ok(Token { secret: secret.to_string() })
    }

    /// The daemon's token: the file must belong to the daemon's user and be readable by it alone.
    pub fn load_for_server(path: &Path) -> Result<Token, TokenError> {
        let meta = std::fs::metadata(path).map_err(|e| read_error(path, e))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Permissions { path: path.into(), mode });
        }
        let expected = nix::unistd::geteuid().as_raw();
        if meta.uid() != expected {
            return Err(TokenError::Owner { path: path.into(), owner: meta.uid(), expected });
        }
        Self::load(path)
    }

    /// A client's token: the file's content (who may read it is up to its permissions).
    pub fn load(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|e| read_error(path, e))?;
        Token::parse(&text).map_err(|reason| TokenError::Invalid { path: path.into(), reason })
    }

    /// The token, for [`cedana_protos::BearerToken::new`].
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ: both are hashed
    /// (so their lengths do not matter either) and every byte of the digests is compared.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(&Sha256::digest(self.secret.as_bytes()), &Sha256::digest(presented))
    }
}

fn read_error(path: &Path, e: std::io::Error) -> TokenError {
    match e.kind() {
        std::io::ErrorKind::NotFound => TokenError::Missing { path: path.into() },
        _ => TokenError::Read { path: path.into(), source: e },
    }
}

/// Equal slices, compared without an early exit (the lengths are not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Write a new token (32 random bytes from the kernel, hex) to `path`, mode 0600: written to a temporary file in
/// the same folder and renamed over `path`, so a reader never sees half a token. An existing file is kept
/// unless `force`. Returns nothing secret: the token is only in the file.
pub fn generate(path: &Path, force: bool) -> Result<(), TokenError> {
    let write_err = |source| TokenError::Write { path: path.into(), source };
    if !force && path.symlink_metadata().is_ok() {
        return Err(TokenError::Exists { path: path.into() });
    }
    let mut bytes = [0u8; GENERATED_BYTES];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).map_err(write_err)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(write_err)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "token".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            // The mode given to open is masked by the umask; make it exact.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(format!("{hex}\n").as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    tracing::info!(path = %path.display(), "wrote a new daemon token");
    Ok(())
}

/// The server interceptor of the daemon's services on TCP: requests without `authorization: Bearer <token>`
/// matching the daemon's token are refused with UNAUTHENTICATED, saying where the token is configured.
#[derive(Clone)]
pub struct RequireToken {
    token: Arc<Token>,
    file: Arc<PathBuf>,
}

impl RequireToken {
    /// Require `token`, read from `file` (named in refusals).
    pub fn new(token: Token, file: PathBuf) -> Self {
        RequireToken { token: Arc::new(token), file: Arc::new(file) }
    }

    /// Check one request's metadata.
    fn check(&self, request: &tonic::Request<()>) -> Result<(), tonic::Status> {
        let where_ = format!(
            "the token is in the daemon's token file {} (config daemon.token_file, env CEDANA_DAEMON_TOKEN_FILE; \
             `cedana daemon token` creates one), and the CLI sends it when it can read that file",
            self.file.display()
        );
        let Some(value) = request.metadata().get(cedana_protos::AUTHORIZATION) else {
            return Err(tonic::Status::unauthenticated(format!(
                "the cedana daemon on TCP needs a token: send `authorization: Bearer <token>`; {where_}"
            )));
        };
        let presented = value.to_str().ok().and_then(bearer_of);
        match presented {
            Some(t) if self.token.matches(t.as_bytes()) => Ok(()),
            Some(_) => Err(tonic::Status::unauthenticated(format!("wrong token for the cedana daemon; {where_}"))),
            None => Err(tonic::Status::unauthenticated(format!("the authorization metadata is not `Bearer <token>`; {where_}"))),
        }
    }
}

/// The token of an `authorization` value `Bearer <token>` (the scheme is case-insensitive).
fn bearer_of(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        match self.check(&request) {
            Ok(()) => Ok(request),
            Err(status) => {
                let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
                tracing::warn!(peer = %peer, reason = %status.message(), "refused an unauthenticated call");
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    const GOOD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn constant_time_eq_compares_every_byte() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"xbc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
        let t = Token::parse(GOOD).unwrap();
        assert!(t.matches(GOOD.as_bytes()));
        assert!(!t.matches(&GOOD.as_bytes()[1..]));
        assert!(!t.matches(b""));
        assert!(!t.matches(format!("{GOOD}0").as_bytes()));
    }

    #[test]
    fn parsing_trims_and_refuses_short_empty_or_odd_tokens() {
        assert_eq!(Token::parse(&format!("  {GOOD}\n")).unwrap().secret(), GOOD);
        assert_eq!(Token::parse("").unwrap_err(), "the file is empty");
        assert_eq!(Token::parse("\n \n").unwrap_err(), "the file is empty");
        assert!(Token::parse("short").unwrap_err().contains("32"));
        assert!(Token::parse(&format!("{GOOD} second")).unwrap_err().contains("visible ASCII"));
        assert!(Token::parse(&format!("{GOOD}é")).unwrap_err().contains("visible ASCII"));
        assert!(!format!("{:?}", Token::parse(GOOD).unwrap()).contains(GOOD), "Debug hides the token");
    }

    #[test]
    fn the_server_refuses_a_file_others_can_read_and_says_chmod_600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, GOOD).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Token::load_for_server(&p).unwrap_err();
            assert!(matches!(err, TokenError::Permissions { .. }), "{mode:o}: {err}");
            let text = err.to_string();
            assert!(text.contains(&format!("chmod 600 {}", p.display())) && text.contains(&format!("{mode:04o}")), "{text}");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Token::load_for_server(&p).unwrap().secret(), GOOD);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Token::load_for_server(&p).is_ok());

        let missing = Token::load_for_server(&dir.path().join("none")).unwrap_err().to_string();
        assert!(missing.contains("cedana daemon token") && missing.contains("CEDANA_DAEMON_TOKEN_FILE"), "{missing}");
        std::fs::write(&p, "tiny\n").unwrap();
        let invalid = Token::load_for_server(&p).unwrap_err().to_string();
        assert!(invalid.contains("shorter than 32") && invalid.contains("--force"), "{invalid}");
    }

    #[test]
    fn generate_writes_64_hex_characters_0600_and_keeps_an_existing_file_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("token");
        generate(&p, false).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let first = std::fs::read_to_string(&p).unwrap();
        assert_eq!(first.trim().len(), 64);
        assert!(first.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(Token::load_for_server(&p).is_ok());
        let err = generate(&p, false).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), first, "kept");
        generate(&p, true).unwrap();
        assert_ne!(std::fs::read_to_string(&p).unwrap(), first, "replaced");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["token"], "no temporary file left");
    }

    #[test]
    fn the_interceptor_wants_the_bearer_token() {
        let mut check = RequireToken::new(Token::parse(GOOD).unwrap(), PathBuf::from("/etc/cedana/token"));
        let with = |value: Option<&str>| {
            let mut r = tonic::Request::new(());
            if let Some(v) = value {
                r.metadata_mut().insert(cedana_protos::AUTHORIZATION, v.parse().unwrap());
            }
            r
        };
        assert!(check.call(with(Some(&format!("Bearer {GOOD}")))).is_ok());
        assert!(check.call(with(Some(&format!("bearer {GOOD}")))).is_ok());
        let mut via_client = cedana_protos::BearerToken::new(GOOD).unwrap();
        assert!(check.call(via_client.call(tonic::Request::new(())).unwrap()).is_ok());
        for (value, says) in [
            (None, "needs a token"),
            (Some(format!("Bearer {}", &GOOD[1..])), "wrong token"),
            (Some("Bearer ".to_string() + &"x".repeat(64)), "wrong token"),
            (Some(GOOD.to_string()), "not `Bearer <token>`"),
            (Some(format!("Basic {GOOD}")), "not `Bearer <token>`"),
        ] {
            let status = check.call(with(value.as_deref())).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{value:?}");
            assert!(status.message().contains(says), "{value:?}: {}", status.message());
            assert!(status.message().contains("/etc/cedana/token"), "{}", status.message());
        }
    }
}
