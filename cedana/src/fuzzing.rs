//! The decoders of untrusted input, for the fuzz targets in `fuzz/` (not a stable API).

use std::path::Path;

use crate::checkpoint::{CheckpointError, Manifest};

/// Parse `bytes` as a checkpoint's manifest, with every check a reader makes before trusting it.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, CheckpointError> {
    let path = Path::new("<fuzz>");
    let manifest = crate::checkpoint::reader::parse_manifest(path, bytes)?;
    crate::checkpoint::reader::check_version(path, &manifest)?;
    Ok(manifest)
}
