use super::*;

fn sample() -> Vec<u8> {
    // Half pseudo-random bytes, half repetitive text, like a process image.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    v.extend(b"the quick brown fox ".iter().cycle().take(300_000));
    v
}

fn roundtrip(c: Compression, data: &[u8]) -> Vec<u8> {
    let mut enc = encoder(c, Vec::new()).unwrap();
    enc.write_all(data).unwrap();
    let out = enc.finish().unwrap();
    let mut dec = decoder(c, io::Cursor::new(out)).unwrap();
    let mut back = Vec::new();
    dec.read_to_end(&mut back).unwrap();
    back
}

#[test]
fn every_codec_round_trips() {
    let data = sample();
    for c in ALL {
        assert_eq!(roundtrip(c, &data), data, "{c} round trip");
    }
}

#[test]
fn empty_input_round_trips() {
    for c in ALL {
        assert!(roundtrip(c, &[]).is_empty(), "{c} empty round trip");
    }
}

#[test]
fn compressed_formats_are_detected_by_content() {
    let data = sample();
    for c in [Compression::Gzip, Compression::Lz4, Compression::Zlib, Compression::Zstd] {
        let mut enc = encoder(c, Vec::new()).unwrap();
        enc.write_all(&data).unwrap();
        let out = enc.finish().unwrap();
        assert_eq!(Compression::detect_bytes(&out[..512.min(out.len())]), Some(c), "{c}");
    }
}

#[test]
fn tar_is_detected_and_garbage_is_not() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(3);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, "a", &b"abc"[..]).unwrap();
    let bytes = builder.into_inner().unwrap();
    assert_eq!(Compression::detect_bytes(&bytes), Some(Compression::Tar));
    assert_eq!(Compression::detect_bytes(b"hello world, not an archive"), None);
    assert_eq!(Compression::detect_bytes(&[]), None);
}

#[test]
fn names_parse_and_unknown_names_are_refused() {
    for c in ALL {
        assert_eq!(c.name().parse::<Compression>().unwrap(), c);
    }
    assert_eq!("ZSTD".parse::<Compression>().unwrap(), Compression::Zstd);
    let err = "bzip2".parse::<Compression>().unwrap_err().to_string();
    assert!(err.contains("bzip2") && err.contains("zstd"), "{err}");
}

#[test]
fn extensions_follow_the_format() {
    assert_eq!(Compression::None.extension(), None);
    assert_eq!(Compression::Zstd.extension(), Some("tar.zst"));
    assert_eq!(Compression::Gzip.extension(), Some("tar.gz"));
}

#[test]
fn truncated_streams_fail_to_decode() {
    let data = sample();
    for c in [Compression::Gzip, Compression::Lz4, Compression::Zlib, Compression::Zstd] {
        let mut enc = encoder(c, Vec::new()).unwrap();
        enc.write_all(&data).unwrap();
        let mut out = enc.finish().unwrap();
        out.truncate(out.len() / 2);
        let mut dec = decoder(c, io::Cursor::new(out)).unwrap();
        let mut back = Vec::new();
        let res = dec.read_to_end(&mut back);
        assert!(res.is_err() || back != data, "{c}: truncated stream decoded to the full data");
    }
}

#[test]
fn corrupted_streams_fail_to_decode() {
    let data = sample();
    for c in [Compression::Gzip, Compression::Lz4, Compression::Zlib, Compression::Zstd] {
        let mut enc = encoder(c, Vec::new()).unwrap();
        enc.write_all(&data).unwrap();
        let mut out = enc.finish().unwrap();
        let mid = out.len() / 2;
        out[mid] ^= 0xFF;
        out[mid + 1] ^= 0x55;
        let mut dec = decoder(c, io::Cursor::new(out)).unwrap();
        let mut back = Vec::new();
        let res = dec.read_to_end(&mut back);
        assert!(res.is_err() || back != data, "{c}: corruption went unnoticed");
    }
}

#[test]
fn detect_path_reports_folders_and_unknown_files() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(Compression::detect_path(dir.path()).unwrap(), Compression::None);
    let junk = dir.path().join("junk.tar.zst");
    std::fs::write(&junk, b"definitely not zstd").unwrap();
    let err = Compression::detect_path(&junk).unwrap_err();
    assert!(matches!(err, CodecError::Unrecognized { .. }), "{err}");
    let missing = Compression::detect_path(&dir.path().join("missing")).unwrap_err();
    assert!(missing.to_string().contains("missing"));
}
