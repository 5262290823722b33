//! Settings of the object stores, and building a client for a URL from them and the environment.
//!
//! S3 (and S3-compatible stores) take the standard AWS variables, read by object_store's
//! `AmazonS3Builder::from_env`: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` / `AWS_ENDPOINT` (an S3-compatible store),
//! `AWS_ALLOW_HTTP`, the web-identity and container-credential variables. object_store does not read
//! `AWS_PROFILE` or the shared files; this module does, for static keys only: when no key is set otherwise,
//! the profile `AWS_PROFILE` (or `default`) of `AWS_SHARED_CREDENTIALS_FILE` (or `~/.aws/credentials`), and
//! its region from `AWS_CONFIG_FILE` (or `~/.aws/config`). Without any key, object_store asks the instance
//! metadata service. Google Cloud Storage takes `GOOGLE_APPLICATION_CREDENTIALS`,
//! `GOOGLE_SERVICE_ACCOUNT` (a key file) or `GOOGLE_SERVICE_ACCOUNT_KEY` (the key itself), and otherwise the
//! metadata server. Explicit settings in [`StorageConfig`] win over the environment.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::multipart::MultipartStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

use super::error::Secrets;
use super::url::{ObjectUrl, Scheme};
use super::StorageError;

/// S3's smallest part (every part of a multipart upload but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// S3's largest part.
pub const MAX_PART_SIZE: usize = 5 << 30;
/// The default size of an upload's first parts: S3's smallest (memory; later parts grow, see
/// [`super::parts::PartLayout`]).
pub const DEFAULT_PART_SIZE: usize = crate::config::DEFAULT_PART_SIZE_MIB << 20;
/// The default size of one ranged read (a checkpoint's unit of 8 MiB).
pub const DEFAULT_READ_PIECE: usize = 8 << 20;
/// The default size of the GETs a stream is read in: 64 MiB, so that a request streamed to a reader as slow as
/// 1.1 MiB/s ends within the default request timeout.
pub const DEFAULT_READ_SEGMENT: u64 = 64 << 20;

/// Static S3 keys, for when the environment should not be used. The secret is never shown (`Debug` hides
/// it) and is removed from every error message.
#[derive(Clone)]
pub struct Credentials {
    /// The access key id (`AWS_ACCESS_KEY_ID`).
    pub access_key_id: String,
    /// The secret access key (`AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: String,
    /// A session token, for temporary credentials (`AWS_SESSION_TOKEN`).
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("access_key_id", &"<redacted>").finish_non_exhaustive()
    }
}

/// How hard requests try before giving up: object_store's retry loop (with exponential back-off) around
/// every request, and the time limits of one attempt.
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Retries of one request after a server error (5xx, 429) or a failed connection.
    pub max_retries: usize,
    /// No retry starts after this long since the first attempt.
    pub retry_timeout: Duration,
    /// The first back-off; it doubles up to `max_backoff`.
    pub init_backoff: Duration,
    /// The longest back-off.
    pub max_backoff: Duration,
    /// One attempt of one request (an 8 MiB part must get through within it).
    pub request_timeout: Duration,
    /// Establishing a connection.
    pub connect_timeout: Duration,
    /// An upload fails when none of its parts completes for this long, whatever the retries would still
    /// try: a dump holds its workload frozen while it streams into the store, so a store that stops
    /// answering must not keep it frozen for the whole retry budget.
    pub stall_timeout: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(crate::config::DEFAULT_STALL_TIMEOUT_S),
        }
    }
}

/// Settings of object-store sinks and sources. Everything left unset comes from the environment.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// S3: the endpoint of an S3-compatible store (`http://127.0.0.1:9000`), instead of AWS (or
    /// `AWS_ENDPOINT_URL`). GCS: the base URL of an emulator.
    pub endpoint: Option<String>,
    /// Allow plain `http://` endpoints (as `AWS_ALLOW_HTTP=true` does).
    pub allow_http: bool,
    /// S3: the region (else `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's, or `us-east-1`).
    pub region: Option<String>,
    /// S3: static keys (else from the environment, see the module's doc).
    pub credentials: Option<Credentials>,
    /// Uploads: the size of every part but the last ([`MIN_PART_SIZE`] to [`MAX_PART_SIZE`]).
    pub part_size: usize,
    /// Uploads: parts uploading at once (each holds `part_size` bytes of memory).
    pub max_in_flight: usize,
    /// Ranged reads: the size of one ranged GET (a larger `read_exact_at` is split into GETs of this size).
    pub read_piece: usize,
    /// Ranged reads: GETs in flight at once for one large `read_exact_at`. Streams (`read_from`) buffer
    /// `read_ahead * read_piece` bytes ahead of their reader, and no more.
    pub read_ahead: usize,
    /// Streams: one GET serves at most this many bytes, the next one continuing where it ended (a request
    /// must finish within [`RetrySettings::request_timeout`], however slowly the stream is read).
    pub read_segment: u64,
    /// Retries, back-off and timeouts of every request.
    pub retry: RetrySettings,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            allow_http: false,
            region: None,
            credentials: None,
            part_size: DEFAULT_PART_SIZE,
            max_in_flight: crate::config::DEFAULT_MAX_IN_FLIGHT,
            read_piece: DEFAULT_READ_PIECE,
            read_ahead: 2,
            read_segment: DEFAULT_READ_SEGMENT,
            retry: RetrySettings::default(),
        }
    }
}

impl StorageConfig {
    /// Refuse settings no store accepts (a part size S3 refuses, nothing in flight).
    pub fn validate(&self) -> Result<(), StorageError> {
        let bad = |detail: String| Err(StorageError::Config { detail });
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return bad(format!(
                "part size {} is outside S3's limits ({} to {} MiB): set storage.part_size_mib within them",
                self.part_size,
                MIN_PART_SIZE >> 20,
                MAX_PART_SIZE >> 20
            ));
        }
        if self.max_in_flight == 0 || self.read_ahead == 0 || self.read_piece == 0 || self.read_segment == 0 {
            return bad("storage.max_in_flight (and read_ahead, read_piece, read_segment) must be at least 1".into());
        }
        Ok(())
    }
}

/// A client of the store a URL names: the same object as a plain store and as a multipart store, and the
/// secrets to keep out of its errors.
#[derive(Clone)]
pub(crate) struct Store {
    pub(crate) objects: Arc<dyn ObjectStore>,
    pub(crate) multipart: Arc<dyn MultipartStore>,
    pub(crate) secrets: Secrets,
}

impl Store {
    /// A store that is one object (InMemory, AmazonS3...), with no secrets.
    #[cfg(test)]
    pub(crate) fn of<S: ObjectStore + MultipartStore>(store: S) -> Self {
        let store = Arc::new(store);
        Self { objects: store.clone(), multipart: store, secrets: Secrets::default() }
    }

    /// Build a client for `url`'s bucket from `config` and the environment. Contacts nothing yet.
    pub(crate) fn connect(url: &ObjectUrl, config: &StorageConfig) -> Result<Self, StorageError> {
        config.validate()?;
        let r = &config.retry;
        let retry = RetryConfig {
            backoff: BackoffConfig { init_backoff: r.init_backoff, max_backoff: r.max_backoff, base: 2.0 },
            max_retries: r.max_retries,
            retry_timeout: r.retry_timeout,
        };
        // Set key by key: the builders' client options hold what the environment set (a proxy, AWS_ALLOW_HTTP).
        let mut client = vec![
            (ClientConfigKey::Timeout, format!("{}ms", r.request_timeout.as_millis())),
            (ClientConfigKey::ConnectTimeout, format!("{}ms", r.connect_timeout.as_millis())),
        ];
        if config.allow_http {
            client.push((ClientConfigKey::AllowHttp, "true".into()));
        }
        let mut secrets = env_secrets();
        if let Some(endpoint) = &config.endpoint {
            add_url_password(&mut secrets, endpoint);
        }
        let build_err =
            |e: object_store::Error, secrets: &Secrets| StorageError::Config { detail: secrets.scrub(&e.to_string()) };
        match url.scheme {
            Scheme::S3 => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(&url.bucket).with_retry(retry);
                for (key, value) in client {
                    b = b.with_config(AmazonS3ConfigKey::Client(key), value);
                }
                for var in ["AWS_ENDPOINT_URL", "AWS_ENDPOINT", "AWS_ENDPOINT_URL_S3"] {
                    if let Ok(endpoint) = std::env::var(var) {
                        add_url_password(&mut secrets, &endpoint);
                    }
                }
                if let Some(endpoint) = &config.endpoint {
                    b = b.with_endpoint(endpoint);
                }
                if let Some(region) = &config.region {
                    b = b.with_region(region);
                }
                let creds = match &config.credentials {
                    Some(c) => Some(c.clone()),
                    None if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() => profile::credentials()?,
                    None => None,
                };
                if let Some(c) = creds {
                    for s in [&c.access_key_id, &c.secret_access_key] {
                        secrets.add(s);
                    }
                    b = b.with_access_key_id(c.access_key_id).with_secret_access_key(c.secret_access_key);
                    if let Some(t) = c.session_token {
                        secrets.add(&t);
                        b = b.with_token(t);
                    }
                }
                let env_region = ["AWS_REGION", "AWS_DEFAULT_REGION"].iter().any(|k| std::env::var_os(k).is_some());
                if config.region.is_none() && !env_region {
                    if let Some(region) = profile::region() {
                        b = b.with_region(region);
                    }
                }
                let region = b.get_config_value(&AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
                let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
                secrets.set_endpoint(endpoint.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com")));
                let s3 = b.build().map_err(|e| build_err(e, &secrets))?;
                let s3 = Arc::new(s3);
                Ok(Self { objects: s3.clone(), multipart: s3, secrets })
            }
            Scheme::Gcs => {
                let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(&url.bucket).with_retry(retry);
                for (key, value) in client {
                    b = b.with_config(GoogleConfigKey::Client(key), value);
                }
                if let Some(endpoint) = &config.endpoint {
                    b = b.with_base_url(endpoint);
                }
                let endpoint = b.get_config_value(&GoogleConfigKey::BaseUrl);
                secrets.set_endpoint(endpoint.unwrap_or_else(|| "https://storage.googleapis.com".into()));
                let gcs = b.build().map_err(|e| build_err(e, &secrets))?;
                let gcs = Arc::new(gcs);
                Ok(Self { objects: gcs.clone(), multipart: gcs, secrets })
            }
        }
    }
}

/// The secrets the environment holds, to keep out of messages.
fn env_secrets() -> Secrets {
    let mut secrets = Secrets::default();
    for key in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_SERVICE_ACCOUNT_KEY"] {
        if let Ok(v) = std::env::var(key) {
            secrets.add(&v);
        }
    }
    secrets
}

/// The user info of an endpoint URL (`http://user:password@host`), should one be given.
fn add_url_password(secrets: &mut Secrets, endpoint: &str) {
    let Some((_, rest)) = endpoint.split_once("://") else { return };
    let authority = rest.split('/').next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        secrets.add(userinfo);
        if let Some((user, password)) = userinfo.split_once(':') {
            secrets.add(user);
            secrets.add(password);
        }
    }
}

/// The AWS shared files (`~/.aws/credentials`, `~/.aws/config`), read for `AWS_PROFILE`: static keys and
/// the region only.
mod profile {
    use super::*;

    fn name() -> String {
        std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into())
    }

    fn file(var: &str, default: &str) -> Option<PathBuf> {
        std::env::var_os(var).map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(default)))
    }

    /// The keys of the profile, if the credentials file has them. An explicitly named profile that is not
    /// there is an error; a missing `default` is not.
    pub(super) fn credentials() -> Result<Option<Credentials>, StorageError> {
        let explicit = std::env::var_os("AWS_PROFILE").is_some();
        let Some(path) = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials") else { return Ok(None) };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(_) if !explicit => return Ok(None),
            Err(e) => {
                let detail = format!("AWS_PROFILE is set but {} cannot be read: {e}", path.display());
                return Err(StorageError::Config { detail });
            }
        };
        let profile = name();
        let get = |key: &str| section_value(&text, &profile, key);
        match (get("aws_access_key_id"), get("aws_secret_access_key")) {
            (Some(access_key_id), Some(secret_access_key)) => {
                Ok(Some(Credentials { access_key_id, secret_access_key, session_token: get("aws_session_token") }))
            }
            _ if explicit => Err(StorageError::Config {
                detail: format!(
                    "profile {profile:?} in {} has no aws_access_key_id and aws_secret_access_key (other kinds of profile, such as SSO or role profiles, are not supported: export keys instead)",
                    path.display()
                ),
            }),
            _ => Ok(None),
        }
    }

    /// The region of the profile in the config file (`[profile NAME]`, or `[default]`).
    pub(super) fn region() -> Option<String> {
        let text = std::fs::read_to_string(file("AWS_CONFIG_FILE", ".aws/config")?).ok()?;
        let profile = name();
        let section = if profile == "default" { profile } else { format!("profile {profile}") };
        section_value(&text, &section, "region")
    }

    /// `key = value` in `[section]` of an INI file.
    pub(super) fn section_value(text: &str, section: &str, key: &str) -> Option<String> {
        let mut inside = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') && line.ends_with(']') {
                inside = line[1..line.len() - 1].trim() == section;
            } else if inside {
                if let Some((k, v)) = line.split_once('=') {
                    if k.trim() == key {
                        return Some(v.trim().to_string());
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_outside_s3_limits_are_refused() {
        assert!(StorageConfig::default().validate().is_ok());
        let small = StorageConfig { part_size: MIN_PART_SIZE - 1, ..Default::default() };
        assert_eq!(small.validate().unwrap_err().kind(), crate::error::ErrorKind::InvalidArgument);
        assert!(small.validate().unwrap_err().to_string().contains("set storage.part_size_mib"));
        assert!(StorageConfig { max_in_flight: 0, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn the_config_file_sets_the_upload_window() {
        let mut c = crate::config::Config::default();
        let s = crate::engine::remote::storage_config(&c);
        assert_eq!((s.part_size, s.max_in_flight), (5 << 20, 4));
        c.storage.part_size_mib = Some(16);
        c.storage.max_in_flight = Some(2);
        let s = crate::engine::remote::storage_config(&c);
        assert_eq!((s.part_size, s.max_in_flight), (16 << 20, 2));
        c.storage.part_size_mib = Some(1);
        assert!(crate::engine::remote::storage_config(&c).validate().unwrap_err().to_string().contains("storage.part_size_mib"));
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let c = Credentials { access_key_id: "AKIDX".into(), secret_access_key: "sekrit-value".into(), session_token: None };
        let config = StorageConfig { credentials: Some(c), ..Default::default() };
        let shown = format!("{config:?}");
        assert!(!shown.contains("sekrit") && !shown.contains("AKIDX"), "{shown}");
    }

    #[test]
    fn endpoint_passwords_are_secrets() {
        let mut s = Secrets::default();
        add_url_password(&mut s, "http://minio:hunter22@127.0.0.1:9000/x");
        assert_eq!(s.scrub("GET http://minio:hunter22@127.0.0.1:9000"), "GET http://<redacted>@127.0.0.1:9000");
        assert_eq!(s.scrub("hunter22"), "<redacted>");
    }

    #[test]
    fn profiles_are_read_from_ini_sections() {
        let text =
            "[default]\naws_access_key_id = A\n[work]\naws_access_key_id=B\nregion = eu-west-1\n[profile work]\nregion=x\n";
        assert_eq!(profile::section_value(text, "default", "aws_access_key_id").as_deref(), Some("A"));
        assert_eq!(profile::section_value(text, "work", "aws_access_key_id").as_deref(), Some("B"));
        assert_eq!(profile::section_value(text, "profile work", "region").as_deref(), Some("x"));
        assert_eq!(profile::section_value(text, "none", "region"), None);
    }

    #[test]
    fn clients_build_without_contacting_anything() {
        let url = ObjectUrl::parse("s3://bucket/k").unwrap();
        let config = StorageConfig {
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: true,
            region: Some("us-east-1".into()),
            credentials: Some(Credentials {
                access_key_id: "AKID".into(),
                secret_access_key: "s3cr3t".into(),
                session_token: None,
            }),
            ..Default::default()
        };
        let store = Store::connect(&url, &config).unwrap();
        assert_eq!(store.secrets.scrub("s3cr3t"), "<redacted>");
        // GCS with an emulator's base URL: building reads no key and contacts no metadata server (only a
        // request would).
        let gcs = ObjectUrl::parse("gs://bucket/k").unwrap();
        let emulator = StorageConfig { endpoint: Some("http://127.0.0.1:1".into()), ..Default::default() };
        assert!(Store::connect(&gcs, &emulator).is_ok());
    }
}
