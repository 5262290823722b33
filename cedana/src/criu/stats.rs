//! CRIU's `stats-dump` image: timings and page counts of a dump.

use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};

const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

/// Name of the file CRIU writes its dump statistics to, in the images folder.
pub const DUMP_STATS_FILE: &str = "stats-dump";

/// Dump statistics, as CRIU reports them (times in microseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpStats {
    pub freezing_time_us: u64,
    pub frozen_time_us: u64,
    pub memdump_time_us: u64,
    pub memwrite_time_us: u64,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
    pub pages_lazy: u64,
}

#[derive(Clone, PartialEq, Message)]
struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    dump: Option<DumpStatsEntry>,
}

#[derive(Clone, PartialEq, Message)]
struct DumpStatsEntry {
    #[prost(uint32, tag = "1")]
    freezing_time: u32,
    #[prost(uint32, tag = "2")]
    frozen_time: u32,
    #[prost(uint32, tag = "3")]
    memdump_time: u32,
    #[prost(uint32, tag = "4")]
    memwrite_time: u32,
    #[prost(uint64, tag = "5")]
    pages_scanned: u64,
    #[prost(uint64, tag = "6")]
    pages_skipped_parent: u64,
    #[prost(uint64, tag = "7")]
    pages_written: u64,
    #[prost(uint64, tag = "9")]
    pages_lazy: u64,
}

/// Errors decoding a stats image.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Format(String),
}

/// Decode a `stats-dump` image.
pub fn decode_dump_stats(bytes: &[u8]) -> Result<DumpStats, StatsError> {
    let word = |at: usize| -> Result<u32, StatsError> {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| StatsError::Format("stats image is too short".into()))
    };
    if word(0)? != IMG_SERVICE_MAGIC || word(4)? != STATS_MAGIC {
        return Err(StatsError::Format("not a CRIU stats image (bad magic)".into()));
    }
    let len = word(8)? as usize;
    let body = bytes.get(12..12 + len).ok_or_else(|| StatsError::Format("stats entry is truncated".into()))?;
    let entry = StatsEntry::decode(body).map_err(|e| StatsError::Format(format!("stats entry: {e}")))?;
    let d = entry.dump.ok_or_else(|| StatsError::Format("stats image has no dump entry".into()))?;
    Ok(DumpStats {
        freezing_time_us: d.freezing_time.into(),
        frozen_time_us: d.frozen_time.into(),
        memdump_time_us: d.memdump_time.into(),
        memwrite_time_us: d.memwrite_time.into(),
        pages_scanned: d.pages_scanned,
        pages_skipped_parent: d.pages_skipped_parent,
        pages_written: d.pages_written,
        pages_lazy: d.pages_lazy,
    })
}

/// Read `stats-dump` from an images folder.
pub fn read_dump_stats(images_dir: &Path) -> Result<DumpStats, StatsError> {
    let path = images_dir.join(DUMP_STATS_FILE);
    let bytes = std::fs::read(&path).map_err(|source| StatsError::Io { path: path.display().to_string(), source })?;
    decode_dump_stats(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entry: &StatsEntry) -> Vec<u8> {
        let body = entry.encode_to_vec();
        let mut v = Vec::new();
        v.extend(IMG_SERVICE_MAGIC.to_le_bytes());
        v.extend(STATS_MAGIC.to_le_bytes());
        v.extend((body.len() as u32).to_le_bytes());
        v.extend(body);
        v
    }

    #[test]
    fn decodes_a_dump_entry() {
        let e = StatsEntry {
            dump: Some(DumpStatsEntry {
                freezing_time: 10,
                frozen_time: 2000,
                memdump_time: 300,
                memwrite_time: 400,
                pages_scanned: 5,
                pages_skipped_parent: 0,
                pages_written: 4,
                pages_lazy: 0,
            }),
        };
        let s = decode_dump_stats(&image(&e)).unwrap();
        assert_eq!(s.frozen_time_us, 2000);
        assert_eq!(s.pages_written, 4);
    }

    #[test]
    fn refuses_bad_magic_and_truncation() {
        assert!(decode_dump_stats(b"not an image at all").is_err());
        let e = StatsEntry { dump: Some(DumpStatsEntry { frozen_time: 1, ..Default::default() }) };
        let img = image(&e);
        assert!(decode_dump_stats(&img[..img.len() - 1]).is_err());
        assert!(decode_dump_stats(&image(&StatsEntry { dump: None })).is_err());
    }
}
