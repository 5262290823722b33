//! Page images served for a lazy restore from an archive read by ranges (an object in a store) or
//! compressed: fetched in the checksum's chunks (8 MiB; in a compressed archive each chunk is one unit of
//! its own, decoded alone), the last few kept, each chunk hashed the first time it arrives, so the page
//! images are verified against the manifest with no second read: [`ChunkedPages::verify`], once the
//! transfer is over, fetches the chunks never asked for and compares every image's digest.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::digest::{combine, xxh3_128, CHUNK};
use super::lazy::LazyPage;
use super::reader::corrupt;
use super::units_read::decode_unit;
use super::CheckpointError;
use crate::criu::pageserver::PageStore;

/// Chunks kept per image (the daemon's background transfer reads front to back; faults jump about).
const CACHED_CHUNKS: usize = 4;

struct Image {
    page: LazyPage,
    /// In a compressed archive: where each unit starts, from the page image's base.
    unit_starts: Vec<u64>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The hash of each chunk fetched so far.
    hashes: Vec<Option<u128>>,
    cache: VecDeque<(usize, Arc<Vec<u8>>)>,
}

/// Page images read by ranges, verified as they go.
pub struct ChunkedPages {
    images: HashMap<u32, Image>,
    location: PathBuf,
}

impl ChunkedPages {
    /// The page images of a checkpoint at `location`.
    pub fn new(pages: &[LazyPage], location: &Path) -> Self {
        let images = pages
            .iter()
            .filter_map(|p| {
                let chunks = p.digest.size.div_ceil(CHUNK as u64).max(1) as usize;
                let state = State { hashes: vec![None; chunks], cache: VecDeque::new() };
                let unit_starts =
                    p.units.iter().scan(0u64, |at, len| Some(std::mem::replace(at, at.saturating_add(*len)))).collect();
                Some((p.pages_id()?, Image { page: p.clone(), unit_starts, state: Mutex::new(state) }))
            })
            .collect();
        Self { images, location: location.to_path_buf() }
    }

    /// Fetch every chunk not fetched yet and compare each image with the manifest.
    pub fn verify(&self) -> Result<(), CheckpointError> {
        for image in self.images.values() {
            let chunks = {
                let state = image.state.lock().map_err(|_| corrupt(&self.location, "a page server thread panicked".into()))?;
                state.hashes.len()
            };
            let mut hashes = Vec::with_capacity(chunks);
            for i in 0..chunks {
                let known = image.state.lock().ok().and_then(|s| s.hashes[i]);
                let hash = match known {
                    Some(h) => h,
                    None => xxh3_128(&self.fetch(image, i).map_err(CheckpointError::io(&self.location))?),
                };
                hashes.push(hash);
            }
            let digest = combine(image.page.name.clone(), image.page.digest.size, &hashes);
            if digest != image.page.digest {
                return Err(corrupt(&self.location, format!("checksum mismatch in {}", image.page.name)));
            }
        }
        Ok(())
    }

    /// Chunk `i` of `image`, from the cache or fetched (and hashed, the first time).
    fn chunk(&self, image: &Image, i: usize) -> std::io::Result<Arc<Vec<u8>>> {
        if let Ok(state) = image.state.lock() {
            if let Some((_, c)) = state.cache.iter().find(|(n, _)| *n == i) {
                return Ok(Arc::clone(c));
            }
        }
        let bytes = Arc::new(self.fetch(image, i)?);
        let mut state = image.state.lock().map_err(|_| std::io::Error::other("a page server thread panicked"))?;
        if state.hashes[i].is_none() {
            state.hashes[i] = Some(xxh3_128(&bytes));
        }
        if state.cache.len() == CACHED_CHUNKS {
            state.cache.pop_front();
        }
        state.cache.push_back((i, Arc::clone(&bytes)));
        Ok(bytes)
    }

    fn fetch(&self, image: &Image, i: usize) -> std::io::Result<Vec<u8>> {
        let start = i as u64 * CHUNK as u64;
        let len = (image.page.digest.size - start).min(CHUNK as u64) as usize;
        if image.page.units.is_empty() {
            let mut buf = vec![0u8; len];
            image.page.source.read_exact_at(image.page.base + start, &mut buf)?;
            return Ok(buf);
        }
        let (Some(&at), Some(&size)) = (image.unit_starts.get(i), image.page.units.get(i)) else {
            let what = format!("{}: the manifest places no unit for chunk {i}", image.page.name);
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
        };
        let page = &image.page;
        decode_unit(&*page.source, page.compression, page.base + at, size, len)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: unit {i} {e}", page.name)))
    }
}

impl PageStore for ChunkedPages {
    fn read_at(&self, pages_id: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let image = self
            .images
            .get(&pages_id)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no pages-{pages_id}.img")))?;
        let end = offset + buf.len() as u64;
        if end > image.page.digest.size {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut at = offset;
        while at < end {
            let i = (at / CHUNK as u64) as usize;
            let chunk = self.chunk(image, i)?;
            let from = (at - i as u64 * CHUNK as u64) as usize;
            let n = (chunk.len() - from).min((end - at) as usize);
            let dst = (at - offset) as usize;
            buf[dst..dst + n].copy_from_slice(&chunk[from..from + n]);
            at += n as u64;
        }
        Ok(())
    }
}
