//! Object URLs: `s3://bucket/key`, `gs://bucket/key` (or `gcs://`).

use std::fmt;

use super::StorageError;

/// Which kind of object store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Amazon S3, or an S3-compatible store (MinIO, Ceph, R2, moto: set an endpoint).
    S3,
    /// Google Cloud Storage.
    Gcs,
}

/// An object (or, with a key ending in `/` or empty, a prefix) in a bucket: `s3://bucket/prefix/name.tar.zst`.
///
/// Parsed from what the user wrote, and shown the same way: the URL carries no credentials (they come
/// from the environment), so it is safe to print.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectUrl {
    /// The kind of store.
    pub scheme: Scheme,
    /// The bucket's name.
    pub bucket: String,
    /// The object's key within the bucket, without a leading `/` (empty for the whole bucket).
    pub key: String,
    /// The scheme as the user spelled it (`s3`, `gs`, `gcs`), for display.
    spelled: &'static str,
}

impl ObjectUrl {
    /// Parse `s3://bucket/key`, `gs://bucket/key` or `gcs://bucket/key`. The key may be empty or end in `/`
    /// (a prefix, for [`super::list`]); it may not contain empty segments (`a//b`), `.` or `..` segments.
    pub fn parse(url: &str) -> Result<Self, StorageError> {
        let bad = |detail: &str| StorageError::InvalidUrl { url: scrub_url(url), detail: detail.to_string() };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad("expected s3://BUCKET/KEY or gs://BUCKET/KEY"));
        };
        let (scheme, spelled) = match scheme.to_ascii_lowercase().as_str() {
            "s3" => (Scheme::S3, "s3"),
            "gs" => (Scheme::Gcs, "gs"),
            "gcs" => (Scheme::Gcs, "gcs"),
            _ => return Err(bad("unsupported scheme: use s3:// (S3 and S3-compatible stores) or gs:// (Google Cloud Storage)")),
        };
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.contains('@') {
            return Err(bad(
                "credentials do not belong in the URL: set them in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or GOOGLE_APPLICATION_CREDENTIALS)",
            ));
        }
        if bucket.is_empty() {
            return Err(bad("the bucket name is missing (s3://BUCKET/KEY)"));
        }
        if bucket.len() < 3 || bucket.len() > 222 || (scheme == Scheme::S3 && bucket.len() > 63) {
            return Err(bad("a bucket name has 3 to 63 characters"));
        }
        if !bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')) {
            return Err(bad("a bucket name has only lower-case letters, digits, '-', '.' and '_'"));
        }
        if key.contains(['?', '#']) {
            return Err(bad("a key may not contain '?' or '#'"));
        }
        let trimmed = key.strip_suffix('/').unwrap_or(key);
        if !trimmed.is_empty() && trimmed.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(bad("the key has an empty, '.' or '..' segment"));
        }
        Ok(Self { scheme, bucket: bucket.to_string(), key: key.to_string(), spelled })
    }

    /// The object `name` under this URL taken as a prefix: `s3://bkt/ckpts` or `s3://bkt/ckpts/` joined with
    /// `x.tar.zst` is `s3://bkt/ckpts/x.tar.zst`. `name` must be one plain name (no `/`).
    pub fn join(&self, name: &str) -> Result<Self, StorageError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains(['?', '#']) {
            return Err(StorageError::InvalidUrl {
                url: format!("{self}"),
                detail: format!("cannot append {name:?}: a checkpoint name is one non-empty segment without '/'"),
            });
        }
        let key = match self.key.as_str() {
            "" => name.to_string(),
            k if k.ends_with('/') => format!("{k}{name}"),
            k => format!("{k}/{name}"),
        };
        Ok(Self { key, ..self.clone() })
    }

    /// Whether this names a prefix (an empty key, or one ending in `/`) rather than an object.
    pub fn is_prefix(&self) -> bool {
        self.key.is_empty() || self.key.ends_with('/')
    }

    /// The object's name: the key's last segment.
    pub fn name(&self) -> &str {
        self.key.trim_end_matches('/').rsplit('/').next().unwrap_or("")
    }

    /// The key as object_store's path (no leading or trailing `/`).
    pub(crate) fn path(&self) -> Result<object_store::path::Path, StorageError> {
        object_store::path::Path::parse(&self.key)
            .map_err(|e| StorageError::InvalidUrl { url: self.to_string(), detail: e.to_string() })
    }

    /// The URL of another key in the same bucket, spelled like this one.
    pub(crate) fn with_key(&self, key: impl Into<String>) -> Self {
        Self { key: key.into(), ..self.clone() }
    }
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}/{}", self.spelled, self.bucket, self.key)
    }
}

impl std::str::FromStr for ObjectUrl {
    type Err = StorageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Whether `s` looks like an object URL (`s3://`, `gs://`, `gcs://`) rather than a local path.
pub fn is_object_url(s: &str) -> bool {
    let lower = s.get(..6).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("s3://") || lower.starts_with("gs://") || lower.starts_with("gcs://")
}

/// `url` for an error message, without a `user:password@` part should one have been given.
fn scrub_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let end = url[s + 3..].find('/').map_or(url.len(), |i| s + 3 + i);
            if at < end {
                return format!("{}<credentials>@{}", &url[..s + 3], &url[at + 1..]);
            }
            url.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_scheme_bucket_and_key() {
        let u = ObjectUrl::parse("s3://my-bucket/ckpt/a.tar.zst").unwrap();
        assert_eq!((u.scheme, u.bucket.as_str(), u.key.as_str()), (Scheme::S3, "my-bucket", "ckpt/a.tar.zst"));
        assert_eq!(u.to_string(), "s3://my-bucket/ckpt/a.tar.zst");
        assert_eq!(u.name(), "a.tar.zst");
        assert!(!u.is_prefix());
        let g = ObjectUrl::parse("gcs://bkt/x").unwrap();
        assert_eq!((g.scheme, g.to_string().as_str()), (Scheme::Gcs, "gcs://bkt/x"), "shown as given");
        assert_eq!(ObjectUrl::parse("GS://bkt/x").unwrap().scheme, Scheme::Gcs);
        let whole = ObjectUrl::parse("s3://bkt").unwrap();
        assert_eq!((whole.key.as_str(), whole.is_prefix()), ("", true));
        assert!(ObjectUrl::parse("s3://bkt/dir/").unwrap().is_prefix());
        assert!(is_object_url("s3://bkt/x") && is_object_url("GS://b") && !is_object_url("/var/x") && !is_object_url("s3"));
    }

    #[test]
    fn bad_urls_are_refused_with_the_reason_and_no_credentials() {
        for (url, why) in [
            ("/tmp/x", "expected s3://"),
            ("ftp://b/x", "unsupported scheme"),
            ("s3:///x", "bucket name is missing"),
            ("s3://", "bucket name is missing"),
            ("s3://Bucket/x", "lower-case"),
            ("s3://ab/x", "3 to 63"),
            ("s3://bkt/a//c", "empty"),
            ("s3://bkt/a/../c", "'..'"),
            ("s3://bkt/a?x=1", "'?'"),
        ] {
            let e = ObjectUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
        let e = ObjectUrl::parse("s3://AKIDEXAMPLE:s3cr3t@bucket/x").unwrap_err().to_string();
        assert!(e.contains("credentials do not belong in the URL"), "{e}");
        assert!(!e.contains("s3cr3t") && !e.contains("AKIDEXAMPLE"), "{e}");
    }

    #[test]
    fn names_join_onto_prefixes() {
        for base in ["s3://bkt/ckpts", "s3://bkt/ckpts/"] {
            let u = ObjectUrl::parse(base).unwrap().join("x.tar.zst").unwrap();
            assert_eq!(u.to_string(), "s3://bkt/ckpts/x.tar.zst");
        }
        assert_eq!(ObjectUrl::parse("gs://bkt").unwrap().join("x").unwrap().to_string(), "gs://bkt/x");
        for bad in ["", "a/b", "..", "."] {
            assert!(ObjectUrl::parse("s3://bkt/p").unwrap().join(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_become_object_store_paths() {
        let u = ObjectUrl::parse("s3://bkt/p/q/").unwrap();
        assert_eq!(u.path().unwrap().as_ref(), "p/q");
        assert_eq!(ObjectUrl::parse("s3://bkt").unwrap().path().unwrap().as_ref(), "");
    }
}
