//! Errors of the object-store module: each says what to check, and none carries a credential.

use std::error::Error as StdError;
use std::io;

use crate::error::ErrorKind;

/// What went wrong talking to an object store. Every message is free of credentials: details that come
/// from the store (its error bodies, request URLs) pass through [`Secrets::scrub`] first. Cloneable, so a
/// sink can return the same failure to every call after it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The URL is not one we can use.
    #[error("{url}: {detail}")]
    InvalidUrl { url: String, detail: String },
    /// The settings (endpoint, part size, credentials file) are wrong.
    #[error("object store settings: {detail}")]
    Config { detail: String },
    /// No such object (or no such bucket).
    #[error("{url} not found: check the bucket and key")]
    NotFound { url: String },
    /// The object exists already, and would not be replaced.
    #[error("{url} already exists: choose another name or ask to replace it")]
    AlreadyExists { url: String },
    /// The store refused the credentials, or found none.
    #[error("{url}: access denied ({detail}): check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or GOOGLE_APPLICATION_CREDENTIALS) and the bucket's permissions")]
    Denied { url: String, detail: String },
    /// The store could not be reached at all, even after the retries: no connection (refused, reset, timed
    /// out), so nothing is known of the object.
    #[error("{url}: the object store at {endpoint} is unreachable ({detail}): check that it runs and that this machine reaches it (the endpoint setting, e.g. AWS_ENDPOINT_URL, and the network), then try again")]
    Unreachable { url: String, endpoint: String, detail: String },
    /// The store stopped taking an upload: no part completed for the stall limit.
    #[error("{url}: the object store at {endpoint} stopped taking the upload (no part completed in {secs} s): check that it runs and answers, then try again")]
    Stalled { url: String, endpoint: String, secs: u64 },
    /// The store answered with server errors (5xx, slow down), even after the retries.
    #[error("{url}: the object store is unavailable ({detail}): check the endpoint and the network, then try again")]
    Unavailable { url: String, detail: String },
    /// The object was replaced or deleted while it was being read.
    #[error("{url} changed while it was being read: read it again")]
    Changed { url: String },
    /// The store does not support an operation we need.
    #[error("{url}: not supported by this object store: {detail}")]
    Unsupported { url: String, detail: String },
    /// The caller used the module wrongly (a patch outside a held range, a write after the end).
    #[error("{url}: {detail}")]
    Usage { url: String, detail: String },
    /// Anything else the store answered.
    #[error("{url}: the object store failed: {detail}")]
    Other { url: String, detail: String },
}

impl StorageError {
    /// The class of this error, for wire protocols.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StorageError::InvalidUrl { .. } | StorageError::Config { .. } => ErrorKind::InvalidArgument,
            StorageError::NotFound { .. } => ErrorKind::NotFound,
            StorageError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            // ErrorKind has no PermissionDenied/Unauthenticated: the request is fine, the credentials are not.
            StorageError::Denied { .. } | StorageError::Changed { .. } => ErrorKind::FailedPrecondition,
            StorageError::Unreachable { .. } | StorageError::Unavailable { .. } | StorageError::Stalled { .. } => {
                ErrorKind::Unavailable
            }
            StorageError::Unsupported { .. } => ErrorKind::Unimplemented,
            StorageError::Usage { .. } | StorageError::Other { .. } => ErrorKind::Internal,
        }
    }

    /// The nearest [`io::ErrorKind`], for the `Write`/`Read` interfaces of sinks and sources.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            StorageError::InvalidUrl { .. } | StorageError::Config { .. } | StorageError::Usage { .. } => {
                io::ErrorKind::InvalidInput
            }
            StorageError::NotFound { .. } => io::ErrorKind::NotFound,
            StorageError::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
            StorageError::Denied { .. } => io::ErrorKind::PermissionDenied,
            StorageError::Unreachable { .. } | StorageError::Unavailable { .. } | StorageError::Stalled { .. } => {
                io::ErrorKind::TimedOut
            }
            StorageError::Changed { .. } => io::ErrorKind::InvalidData,
            StorageError::Unsupported { .. } => io::ErrorKind::Unsupported,
            StorageError::Other { .. } => io::ErrorKind::Other,
        }
    }

    /// Classify an error of object_store about `url`, with every secret in `secrets` removed from its text.
    pub(crate) fn from_store(url: &str, err: &object_store::Error, secrets: &Secrets) -> Self {
        use object_store::Error as E;
        let url = url.to_string();
        let detail = secrets.scrub(&chain(err));
        match err {
            E::NotFound { .. } => StorageError::NotFound { url },
            E::AlreadyExists { .. } => StorageError::AlreadyExists { url },
            E::Precondition { .. } | E::NotModified { .. } => StorageError::Changed { url },
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => StorageError::Denied { url, detail },
            E::NotSupported { .. } | E::NotImplemented { .. } => StorageError::Unsupported { url, detail },
            E::InvalidPath { .. } => StorageError::InvalidUrl { url, detail },
            E::UnknownConfigurationKey { .. } => StorageError::Config { detail },
            _ if is_transport(err) => StorageError::Unreachable { url, endpoint: secrets.endpoint(), detail },
            _ if is_server_error(&detail) => StorageError::Unavailable { url, detail },
            _ if detail.to_ascii_lowercase().contains("credential") => StorageError::Denied { url, detail },
            _ => StorageError::Other { url, detail },
        }
    }
}

impl From<StorageError> for io::Error {
    fn from(e: StorageError) -> Self {
        io::Error::new(e.io_kind(), e)
    }
}

/// The error and its sources in one line, without repeating a source the text already includes.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Whether the request never got an answer (connection refused or reset, timeout).
fn is_transport(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<object_store::client::HttpError>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Whether the store answered with a server error (5xx, or 429 slow down) after the retries.
fn is_server_error(detail: &str) -> bool {
    ["status code: 5", "status code: 429", "Server returned error response"].iter().any(|p| detail.contains(p))
}

/// Strings that must never appear in a message (secret keys, session tokens, key ids, passwords in an
/// endpoint URL): replaced by `<redacted>`; and the store's endpoint, which a message about reaching the
/// store names (scrubbed like the rest).
#[derive(Clone, Default)]
pub(crate) struct Secrets(Vec<String>, Option<String>);

impl Secrets {
    /// Name `endpoint` (the store's base URL) in messages about reaching the store.
    pub(crate) fn set_endpoint(&mut self, endpoint: String) {
        self.1 = Some(endpoint);
    }

    /// The store's endpoint as messages show it, without secrets.
    pub(crate) fn endpoint(&self) -> String {
        self.scrub(self.1.as_deref().unwrap_or("its endpoint"))
    }

    /// Add `secret`, when it is long enough to be one (short strings would blank out ordinary words).
    pub(crate) fn add(&mut self, secret: &str) {
        if secret.len() >= 4 && !self.0.iter().any(|s| s == secret) {
            self.0.push(secret.to_string());
            // Longest first, so that a secret containing another is removed whole.
            self.0.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    /// `text` without any of the secrets.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "<redacted>");
            }
        }
        out
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_kinds_without_secrets() {
        let mut secrets = Secrets::default();
        secrets.add("SECRETKEY123");
        secrets.add("ab"); // too short to redact
        let nf = object_store::Error::NotFound { path: "k".into(), source: "gone".into() };
        let e = StorageError::from_store("s3://b/k", &nf, &secrets);
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "s3://b/k not found: check the bucket and key");
        let denied =
            object_store::Error::PermissionDenied { path: "k".into(), source: "signature of SECRETKEY123 does not match".into() };
        let e = StorageError::from_store("s3://b/k", &denied, &secrets);
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let msg = e.to_string();
        assert!(msg.contains("<redacted>") && !msg.contains("SECRETKEY123") && msg.contains("check the credentials"), "{msg}");
        let busy = object_store::Error::Generic {
            store: "S3",
            source: "Server returned non-2xx status code: 503 Service Unavailable: slow down".into(),
        };
        assert_eq!(StorageError::from_store("s3://b/k", &busy, &secrets).kind(), ErrorKind::Unavailable);
        let refused = object_store::Error::Generic {
            store: "S3",
            source: Box::new(object_store::client::HttpError::new(
                object_store::client::HttpErrorKind::Connect,
                io::Error::from(io::ErrorKind::ConnectionRefused),
            )),
        };
        let mut with_endpoint = secrets.clone();
        with_endpoint.set_endpoint("http://127.0.0.1:9/".into());
        let e = StorageError::from_store("s3://b/k", &refused, &with_endpoint);
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        let msg = e.to_string();
        assert!(msg.starts_with("s3://b/k: the object store at http://127.0.0.1:9/ is unreachable ("), "{msg}");
        assert!(msg.contains("check that it runs"), "{msg}");
        let creds = object_store::Error::Generic { store: "S3", source: "Error getting credentials: timeout".into() };
        assert!(matches!(StorageError::from_store("s3://b/k", &creds, &secrets), StorageError::Denied { .. }));
        let io: io::Error = StorageError::NotFound { url: "s3://b/k".into() }.into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn secrets_are_scrubbed_longest_first() {
        let mut s = Secrets::default();
        s.add("abcd");
        s.add("abcdefgh");
        assert_eq!(s.scrub("x abcdefgh y abcd"), "x <redacted> y <redacted>");
        assert_eq!(format!("{s:?}"), "Secrets(2 redacted)");
    }
}
