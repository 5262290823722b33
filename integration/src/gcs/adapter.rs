//! The adapter in front of gcp-storage-emulator: an HTTP/1.1 server that answers the requests of
//! object_store 0.14's GCS client (GCS's XML API, `BASE/BUCKET/OBJECT`) the way GCS does, using the emulator
//! (its JSON API, and its one XML route, a plain PUT) for the objects themselves. What it adapts, and why:
//!
//! - **Names**: object_store percent-encodes every non-alphanumeric byte of the bucket and the object name
//!   (`cedana%2Dtest/ckpts%2Fm%2Etar%2Ezst`); the emulator's routes match bucket names by `[-.\w]+` and
//!   answer 501 to anything else. The adapter decodes both and re-encodes the object for the emulator.
//! - **ETags**: object_store needs an `ETag` on every PUT (a part's is its id at completion; it unwraps it)
//!   and on GET/HEAD (with `Last-Modified`); the emulator sends neither. The adapter answers GCS's XML-API
//!   ETag, the hex MD5 of the body in quotes (from the emulator's `md5Hash` for objects, computed for parts),
//!   `Last-Modified` from its `updated`, and `x-goog-generation`; a GET whose `If-Match` names another ETag
//!   gets 412, as from GCS.
//! - **HEAD** (the emulator has none): answered from the object's JSON metadata.
//! - **DELETE** of an object: sent to the emulator's JSON API (its XML route has no DELETE).
//! - **XML multipart upload** (the emulator has none): see [`multipart`]. Parts are files in the adapter's
//!   folder, not in memory; completion sends them to the emulator in one PUT; an abort drops them.
//!
//! Not adapted, as cedana does not use them: listing (object_store lists through the XML API, which the
//! emulator lacks; tests list through the emulator's JSON API), copies, conditional puts, generations.
//! For tests, it can be made to fail part uploads ([`Shared::fail_parts_after`]) and records the
//! `Authorization` headers it sees (they must hold no token: no credential was fetched from anywhere).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

mod multipart;

use multipart::{abort, complete, initiate, put_part};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// What the adapter serves from, and what tests read of it.
pub struct Shared {
    /// The emulator's address.
    upstream: SocketAddr,
    /// Uploads in progress: one folder per upload id, holding `target` and its parts.
    uploads: PathBuf,
    serial: AtomicU64,
    /// Part uploads fail (503) once this many parts are stored.
    /// Part uploads let through (counted before they are stored, so that parts in flight at once cannot
    /// pass [`Shared::fail_parts_after`] together).
    parts_admitted: AtomicUsize,
    fail_parts_after: AtomicUsize,
    parts_stored: AtomicUsize,
    parts_failed: AtomicUsize,
    authorizations: Mutex<BTreeSet<String>>,
}

impl Shared {
    /// An adapter's state for the emulator at `upstream`, keeping uploads in `uploads` (which must exist).
    pub fn new(upstream: SocketAddr, uploads: PathBuf) -> Shared {
        Shared {
            upstream,
            uploads,
            serial: AtomicU64::new(0),
            parts_admitted: AtomicUsize::new(0),
            fail_parts_after: AtomicUsize::new(usize::MAX),
            parts_stored: AtomicUsize::new(0),
            parts_failed: AtomicUsize::new(0),
            authorizations: Mutex::new(BTreeSet::new()),
        }
    }

    /// From now on, answer `503` to part uploads once `n` in all were let through (at most `n` are stored).
    pub fn fail_parts_after(&self, n: usize) {
        self.fail_parts_after.store(n, Ordering::SeqCst);
    }

    /// Parts stored so far, and part uploads answered with an injected failure.
    pub fn part_counts(&self) -> (usize, usize) {
        (self.parts_stored.load(Ordering::SeqCst), self.parts_failed.load(Ordering::SeqCst))
    }

    /// The distinct `Authorization` headers received (`""` for a request without one).
    pub fn authorizations(&self) -> Vec<String> {
        self.authorizations.lock().map(|a| a.iter().cloned().collect()).unwrap_or_default()
    }

    /// The ids of the uploads begun and neither completed nor aborted.
    pub fn pending_uploads(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.uploads)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

/// Serve connections from `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// A GCS XML error answer.
struct Fail {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn fail(status: StatusCode, code: &'static str, message: impl Into<String>) -> Fail {
    Fail { status, code, message: message.into() }
}

fn unavailable(e: impl std::fmt::Display) -> Fail {
    fail(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", format!("the emulator: {e}"))
}

async fn handle(s: &Shared, req: Request<Incoming>) -> Response<Body> {
    let auth = req.headers().get(header::AUTHORIZATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if let Ok(mut seen) = s.authorizations.lock() {
        seen.insert(auth.unwrap_or_default());
    }
    match route(s, req).await {
        Ok(r) => r,
        Err(f) => {
            let body = format!(
                "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{}</Code><Message>{}</Message></Error>",
                f.code,
                xml_escape(&f.message)
            );
            response(f.status, &[(header::CONTENT_TYPE, "application/xml".into())], full(body))
        }
    }
}

async fn route(s: &Shared, req: Request<Incoming>) -> Result<Response<Body>, Fail> {
    let (bucket, object) = names(req.uri().path())?;
    let query = query_pairs(req.uri().query().unwrap_or(""));
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let m = req.method().clone();
    let Some(object) = object else {
        return Err(fail(StatusCode::NOT_IMPLEMENTED, "NotImplemented", "bucket requests (listing) are not adapted"));
    };
    let t = Target { bucket, object };
    match (m, q("uploads"), q("uploadId"), q("partNumber")) {
        (Method::POST, Some(_), None, None) => initiate(s, &t, &req).await,
        (Method::PUT, None, Some(id), Some(n)) => put_part(s, &t, &id, &n, req).await,
        (Method::POST, None, Some(id), None) => complete(s, &t, &id, req).await,
        (Method::DELETE, None, Some(id), None) => abort(s, &t, &id).await,
        (Method::GET, None, None, None) => read(s, &t, &req, false).await,
        (Method::HEAD, None, None, None) => read(s, &t, &req, true).await,
        (Method::PUT, None, None, None) => put(s, &t, req).await,
        (Method::DELETE, None, None, None) => delete(s, &t).await,
        (m, ..) => Err(fail(StatusCode::NOT_IMPLEMENTED, "NotImplemented", format!("{m} {} is not adapted", req.uri()))),
    }
}

/// A decoded bucket and object name.
struct Target {
    bucket: String,
    object: String,
}

impl Target {
    /// The object in the emulator's JSON API (the name encoded whole, `/` included, as its routes expect).
    fn json_path(&self) -> String {
        format!("/storage/v1/b/{}/o/{}", self.bucket, utf8_percent_encode(&self.object, NON_ALPHANUMERIC))
    }
}

/// The bucket and (if any) object of a path `/BUCKET[/OBJECT]`, percent-decoded.
fn names(path: &str) -> Result<(String, Option<String>), Fail> {
    let bad = |what: &str| fail(StatusCode::BAD_REQUEST, "InvalidArgument", format!("{what} in {path}"));
    let rest = path.strip_prefix('/').ok_or_else(|| bad("no leading /"))?;
    let (b, o) = match rest.split_once('/') {
        Some((b, o)) => (b, Some(o)),
        None => (rest, None),
    };
    let decode = |s: &str| percent_decode_str(s).decode_utf8().map(|c| c.into_owned()).map_err(|_| bad("a name not UTF-8"));
    let bucket = decode(b)?;
    if bucket.len() < 3 || !bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c)) {
        return Err(fail(StatusCode::BAD_REQUEST, "InvalidBucketName", format!("bucket name {bucket:?}")));
    }
    let object = match o {
        Some(o) if !o.is_empty() => Some(decode(o)?),
        _ => None,
    };
    Ok((bucket, object))
}

fn query_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn response(status: StatusCode, headers: &[(header::HeaderName, String)], body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            r.headers_mut().insert(k.clone(), v);
        }
    }
    r
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// One request to the emulator, on a connection of its own (it speaks HTTP/1.0).
async fn upstream(
    s: &Shared,
    method: Method,
    path: &str,
    headers: &[(header::HeaderName, String)],
    body: Body,
) -> Result<Response<Incoming>, Fail> {
    let stream = tokio::net::TcpStream::connect(s.upstream).await.map_err(unavailable)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(unavailable)?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path).header(header::HOST, s.upstream.to_string());
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = req.body(body).map_err(unavailable)?;
    sender.send_request(req).await.map_err(unavailable)
}

/// What GCS's XML API says of an object in its headers.
struct Meta {
    size: u64,
    etag: String,
    generation: String,
    last_modified: String,
}

impl Meta {
    fn headers(&self) -> Vec<(header::HeaderName, String)> {
        vec![
            (header::ETAG, self.etag.clone()),
            (header::LAST_MODIFIED, self.last_modified.clone()),
            (header::HeaderName::from_static("x-goog-generation"), self.generation.clone()),
        ]
    }
}

/// The object's metadata from the emulator's JSON API; `None` when there is no such object.
async fn meta(s: &Shared, t: &Target) -> Result<Option<Meta>, Fail> {
    let r = upstream(s, Method::GET, &t.json_path(), &[], empty()).await?;
    match r.status() {
        StatusCode::NOT_FOUND => return Ok(None),
        st if !st.is_success() => return Err(unavailable(format!("metadata of {}: {st}", t.object))),
        _ => {}
    }
    let body = r.into_body().collect().await.map_err(unavailable)?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(unavailable)?;
    let text = |k: &str| v[k].as_str().map(str::to_string).ok_or_else(|| unavailable(format!("metadata without {k}")));
    let md5 = base64::engine::general_purpose::STANDARD.decode(text("md5Hash")?).map_err(unavailable)?;
    let updated = chrono::DateTime::parse_from_rfc3339(&text("updated")?).map_err(unavailable)?;
    Ok(Some(Meta {
        size: text("size")?.parse().map_err(unavailable)?,
        etag: format!("\"{}\"", hex(&md5)),
        generation: text("generation")?,
        last_modified: updated.with_timezone(&chrono::Utc).format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
    }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn no_such_key(t: &Target) -> Fail {
    fail(StatusCode::NOT_FOUND, "NoSuchKey", format!("no object {} in {}", t.object, t.bucket))
}

/// GET (ranged or whole) and HEAD of an object.
async fn read(s: &Shared, t: &Target, req: &Request<Incoming>, head: bool) -> Result<Response<Body>, Fail> {
    let meta = meta(s, t).await?.ok_or_else(|| no_such_key(t))?;
    if let Some(want) = req.headers().get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        if want.trim() != "*" && want.trim().trim_start_matches("W/") != meta.etag {
            return Err(fail(StatusCode::PRECONDITION_FAILED, "PreconditionFailed", "If-Match names another ETag"));
        }
    }
    let mut headers = meta.headers();
    if head {
        headers.push((header::CONTENT_LENGTH, meta.size.to_string()));
        return Ok(response(StatusCode::OK, &headers, empty()));
    }
    let range: Vec<_> = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| (header::RANGE, r.to_string()))
        .into_iter()
        .collect();
    let r = upstream(s, Method::GET, &format!("{}?alt=media", t.json_path()), &range, empty()).await?;
    match r.status() {
        StatusCode::NOT_FOUND => return Err(no_such_key(t)),
        st if !st.is_success() => return Err(unavailable(format!("GET {}: {st}", t.object))),
        _ => {}
    }
    for h in [header::CONTENT_LENGTH, header::CONTENT_RANGE, header::CONTENT_TYPE] {
        if let Some(v) = r.headers().get(&h).and_then(|v| v.to_str().ok()) {
            headers.push((h, v.to_string()));
        }
    }
    let status = r.status();
    Ok(response(status, &headers, r.into_body().map_err(BoxError::from).boxed()))
}

/// A plain PUT of a whole object.
async fn put(s: &Shared, t: &Target, req: Request<Incoming>) -> Result<Response<Body>, Fail> {
    let content_type = content_type(&req);
    let body = req.into_body().collect().await.map_err(unavailable)?.to_bytes();
    let len = body.len() as u64;
    store(s, t, &content_type, len, full(body)).await
}

fn content_type(req: &Request<Incoming>) -> String {
    req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/octet-stream").to_string()
}

/// Send an object's body to the emulator (its XML route) and answer as GCS does to a PUT.
async fn store(s: &Shared, t: &Target, content_type: &str, len: u64, body: Body) -> Result<Response<Body>, Fail> {
    let path = format!("/{}/{}", t.bucket, utf8_percent_encode(&t.object, NON_ALPHANUMERIC));
    let headers = [(header::CONTENT_TYPE, content_type.to_string()), (header::CONTENT_LENGTH, len.to_string())];
    let r = upstream(s, Method::PUT, &path, &headers, body).await?;
    match r.status() {
        StatusCode::NOT_FOUND => return Err(fail(StatusCode::NOT_FOUND, "NoSuchBucket", format!("no bucket {}", t.bucket))),
        st if !st.is_success() => return Err(unavailable(format!("PUT {}: {st}", t.object))),
        _ => {}
    }
    let meta = meta(s, t).await?.ok_or_else(|| unavailable("the object is gone after its PUT"))?;
    Ok(response(StatusCode::OK, &meta.headers(), empty()))
}

async fn delete(s: &Shared, t: &Target) -> Result<Response<Body>, Fail> {
    let r = upstream(s, Method::DELETE, &t.json_path(), &[], empty()).await?;
    match r.status() {
        StatusCode::NOT_FOUND => Err(no_such_key(t)),
        st if st.is_success() => Ok(response(StatusCode::NO_CONTENT, &[], empty())),
        st => Err(unavailable(format!("DELETE {}: {st}", t.object))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_decoded_and_checked() {
        let (b, o) = names("/cedana%2Dtest/ckpts%2Fm%2Etar%2Ezst").ok().unwrap();
        assert_eq!((b.as_str(), o.as_deref()), ("cedana-test", Some("ckpts/m.tar.zst")));
        assert_eq!(names("/bucket").ok().unwrap().1, None);
        assert!(names("/BAD%20bucket/x").is_err());
        assert_eq!(query_pairs("uploads=&x=a%2Fb"), vec![("uploads".into(), "".into()), ("x".into(), "a/b".into())]);
    }
}
