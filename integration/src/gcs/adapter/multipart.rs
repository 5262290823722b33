//! The adapter's XML multipart uploads (the emulator has none): each upload is a folder of the adapter's
//! own, named by its id, holding `target` (bucket, object and content type, a line each) and its parts
//! (`part-NNNNN`, their ETags in `part-NNNNN.etag`). Completion checks the listed parts' ETags and order,
//! sends the parts to the emulator in one PUT, read from disk one at a time, and drops the folder; an abort
//! drops it. Until completion the emulator holds nothing: an upload never completed leaves no object.

use super::*;

/// The folder of upload `id` of `t` and the content type it was begun with, or NoSuchUpload.
async fn upload_dir(s: &Shared, t: &Target, id: &str) -> Result<(PathBuf, String), Fail> {
    let none = || fail(StatusCode::NOT_FOUND, "NoSuchUpload", format!("no upload {id} of {}", t.object));
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(none());
    }
    let dir = s.uploads.join(id);
    let target = tokio::fs::read_to_string(dir.join("target")).await.map_err(|_| none())?;
    let mut lines = target.lines();
    if lines.next() != Some(t.bucket.as_str()) || lines.next() != Some(t.object.as_str()) {
        return Err(none());
    }
    let content_type = lines.next().unwrap_or("application/octet-stream").to_string();
    Ok((dir, content_type))
}

/// `POST ?uploads`: a new upload (404 when the bucket does not exist, as from GCS).
pub(super) async fn initiate(s: &Shared, t: &Target, req: &Request<Incoming>) -> Result<Response<Body>, Fail> {
    let r = upstream(s, Method::GET, &format!("/storage/v1/b/{}", t.bucket), &[], empty()).await?;
    if r.status() == StatusCode::NOT_FOUND {
        return Err(fail(StatusCode::NOT_FOUND, "NoSuchBucket", format!("no bucket {}", t.bucket)));
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let id = format!("{nanos:x}{:08x}", s.serial.fetch_add(1, Ordering::SeqCst));
    let dir = s.uploads.join(&id);
    let target = format!("{}\n{}\n{}\n", t.bucket, t.object, content_type(req));
    let made = async {
        tokio::fs::create_dir(&dir).await?;
        tokio::fs::write(dir.join("target"), target).await
    };
    made.await.map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()))?;
    let body = format!(
        "<?xml version='1.0' encoding='UTF-8'?><InitiateMultipartUploadResult><Bucket>{}</Bucket><Key>{}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>",
        xml_escape(&t.bucket),
        xml_escape(&t.object)
    );
    Ok(response(StatusCode::OK, &[(header::CONTENT_TYPE, "application/xml".into())], full(body)))
}

fn part_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("part-{n:05}"))
}

/// `PUT ?partNumber=N&uploadId=ID`: store the part on disk, answer its ETag (the hex MD5 of its bytes).
pub(super) async fn put_part(s: &Shared, t: &Target, id: &str, n: &str, req: Request<Incoming>) -> Result<Response<Body>, Fail> {
    let n: u32 = n
        .parse()
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| fail(StatusCode::BAD_REQUEST, "InvalidArgument", format!("part number {n:?} is not 1 to 10000")))?;
    let (dir, _) = upload_dir(s, t, id).await?;
    let limit = s.fail_parts_after.load(Ordering::SeqCst);
    if s.parts_admitted.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| (a < limit).then_some(a + 1)).is_err() {
        s.parts_failed.fetch_add(1, Ordering::SeqCst);
        return Err(fail(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "part upload failed on purpose (test)"));
    }
    let body = req.into_body().collect().await.map_err(unavailable)?.to_bytes();
    let etag = format!("\"{}\"", hex(&Md5::digest(&body)));
    let (path, tmp) = (part_path(&dir, n), dir.join(format!(".part-{n:05}.{}", s.serial.fetch_add(1, Ordering::SeqCst))));
    let written = async {
        tokio::fs::write(&tmp, &body).await?;
        tokio::fs::write(path.with_extension("etag"), &etag).await?;
        tokio::fs::rename(&tmp, &path).await
    };
    // An upload aborted meanwhile has no folder any more: its parts are not wanted.
    written.await.map_err(|_| fail(StatusCode::NOT_FOUND, "NoSuchUpload", format!("upload {id} ended")))?;
    s.parts_stored.fetch_add(1, Ordering::SeqCst);
    Ok(response(StatusCode::OK, &[(header::ETAG, etag)], empty()))
}

/// The (part number, ETag) list of a `CompleteMultipartUpload` body.
fn listed_parts(xml: &str) -> Vec<(u32, String)> {
    let value = |part: &str, tag: &str| {
        let start = part.find(&format!("<{tag}>"))? + tag.len() + 2;
        let end = start + part[start..].find(&format!("</{tag}>"))?;
        Some(part[start..end].replace("&quot;", "\"").trim().to_string())
    };
    xml.split("<Part>").skip(1).filter_map(|p| Some((value(p, "PartNumber")?.parse().ok()?, value(p, "ETag")?))).collect()
}

/// `POST ?uploadId=ID`: check the listed parts, send them to the emulator as one object, drop them.
pub(super) async fn complete(s: &Shared, t: &Target, id: &str, req: Request<Incoming>) -> Result<Response<Body>, Fail> {
    let (dir, content_type) = upload_dir(s, t, id).await?;
    let body = req.into_body().collect().await.map_err(unavailable)?.to_bytes();
    let parts = listed_parts(&String::from_utf8_lossy(&body));
    let invalid = |m: String| fail(StatusCode::BAD_REQUEST, "InvalidPart", m);
    if parts.is_empty() {
        return Err(fail(StatusCode::BAD_REQUEST, "MalformedXML", "no parts listed"));
    }
    if parts.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(fail(StatusCode::BAD_REQUEST, "InvalidPartOrder", "part numbers must ascend"));
    }
    let (mut files, mut len) = (Vec::new(), 0u64);
    for (n, etag) in &parts {
        let path = part_path(&dir, *n);
        let stored = tokio::fs::read_to_string(path.with_extension("etag")).await.unwrap_or_default();
        if stored.is_empty() || stored != *etag {
            return Err(invalid(format!("part {n} is not stored with ETag {etag}")));
        }
        len += tokio::fs::metadata(&path).await.map_err(|e| invalid(format!("part {n}: {e}")))?.len();
        files.push(path);
    }
    // One part in memory at a time, on its way to the emulator.
    let frames = futures::stream::iter(files)
        .then(|p| async move { tokio::fs::read(p).await.map(|b| Frame::data(Bytes::from(b))) })
        .map_err(BoxError::from);
    let stored = store(s, t, &content_type, len, BodyExt::boxed(StreamBody::new(frames))).await?;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let etag = stored.headers().get(header::ETAG).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = format!(
        "<?xml version='1.0' encoding='UTF-8'?><CompleteMultipartUploadResult><Bucket>{}</Bucket><Key>{}</Key><ETag>{}</ETag></CompleteMultipartUploadResult>",
        xml_escape(&t.bucket),
        xml_escape(&t.object),
        xml_escape(&etag)
    );
    let mut headers: Vec<_> =
        stored.headers().iter().filter_map(|(k, v)| Some((k.clone(), v.to_str().ok()?.to_string()))).collect();
    headers.push((header::CONTENT_TYPE, "application/xml".into()));
    Ok(response(StatusCode::OK, &headers, full(body)))
}

/// `DELETE ?uploadId=ID`: drop the upload's parts.
pub(super) async fn abort(s: &Shared, t: &Target, id: &str) -> Result<Response<Body>, Fail> {
    let (dir, _) = upload_dir(s, t, id).await?;
    tokio::fs::remove_dir_all(&dir).await.map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()))?;
    Ok(response(StatusCode::NO_CONTENT, &[], empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_bodies_list_their_parts() {
        let xml = "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"ab\"</ETag></Part><Part><PartNumber>2</PartNumber><ETag>&quot;cd&quot;</ETag></Part></CompleteMultipartUpload>";
        assert_eq!(listed_parts(xml), vec![(1, "\"ab\"".to_string()), (2, "\"cd\"".to_string())]);
    }
}
