//! Hashing images while CRIU writes them. CRIU writes each image file once, front to back, so a second
//! thread can follow the growing files and hash what has landed; when CRIU is done, only the tail is left
//! and a folder checkpoint costs almost nothing on top of CRIU's own dump.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::digest::{self, FileDigest, Hasher};
use super::writer::list_files;

const PIECE: usize = 4 << 20;
/// Growth from which a page image is hashed through a mapping rather than read.
const MAP_AT_LEAST: u64 = 1 << 20;
const PAGE: u64 = 4096;

struct Followed {
    ino: u64,
    offset: u64,
    /// A page image, which CRIU only ever appends to: safe to map.
    mappable: bool,
    hasher: Hasher,
    file: File,
}

/// A thread hashing the top-level files of a folder as they grow.
pub struct TailHasher {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<HashMap<String, Followed>>>,
}

impl TailHasher {
    /// Start following `dir`.
    pub fn start(dir: &Path) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (dir.to_path_buf(), Arc::clone(&stop));
        let handle = std::thread::Builder::new().name("tail-hash".into()).spawn(move || follow(&d, &s))?;
        Ok(Self { dir: dir.to_path_buf(), stop, handle: Some(handle) })
    }

    /// Stop following, hash whatever is left, and return the digests of every file under the folder
    /// (sorted by name). Files replaced or shrunk since they were followed are hashed again from scratch.
    pub fn finish(mut self, skip: &[&str]) -> io::Result<Vec<FileDigest>> {
        self.stop.store(true, Ordering::SeqCst);
        let mut followed = match self.handle.take().map(JoinHandle::join) {
            Some(Ok(f)) => f,
            _ => HashMap::new(),
        };
        let names = list_files(&self.dir)?;
        let mut buf = vec![0u8; PIECE];
        let mut out = Vec::with_capacity(names.len());
        for name in names.into_iter().filter(|n| !skip.contains(&n.as_str())) {
            let path = self.dir.join(&name);
            let meta = std::fs::metadata(&path)?;
            match followed.remove(&name) {
                Some(mut f) if f.ino == meta.ino() && f.offset <= meta.len() => {
                    read_until(&mut f, meta.len(), &mut buf)?;
                    out.push(f.hasher.finish(name));
                }
                _ => out.push(digest::digest_file(&path, &name)?),
            }
        }
        Ok(out)
    }
}

impl Drop for TailHasher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn follow(dir: &Path, stop: &AtomicBool) -> HashMap<String, Followed> {
    let mut files: HashMap<String, Followed> = HashMap::new();
    let mut buf = vec![0u8; PIECE];
    let spare_core = crate::codec::worker_threads() >= 2;
    let mut last_growth = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let mut progressed = false;
        if let Ok(rd) = std::fs::read_dir(dir) {
            for entry in rd.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let stale = files.get(&name).map(|f| f.ino != meta.ino()).unwrap_or(false);
                if stale {
                    files.remove(&name);
                }
                if !files.contains_key(&name) {
                    let Ok(file) = File::open(entry.path()) else { continue };
                    let mappable = super::is_page_image(&name);
                    files.insert(name.clone(), Followed { ino: meta.ino(), offset: 0, mappable, hasher: Hasher::new(), file });
                }
                if let Some(f) = files.get_mut(&name) {
                    if f.offset < meta.len() {
                        // Hash only up to the size seen now; the rest is for a later round.
                        if read_until(f, meta.len(), &mut buf).is_err() {
                            files.remove(&name);
                        } else {
                            progressed = true;
                        }
                    }
                }
                if stop.load(Ordering::SeqCst) {
                    break;
                }
            }
        }
        if progressed {
            last_growth = Instant::now();
        } else {
            // A CRIU that has written nothing for a while is not worth a busy core.
            wait_for_more(spare_core && last_growth.elapsed() < SPIN_FOR);
        }
    }
    files
}

/// How long after the last growth the hasher keeps polling rather than sleeping.
const SPIN_FOR: Duration = Duration::from_secs(1);

/// Wait for CRIU's next write. With a core to spare, poll (yielding to anything runnable) rather than sleep:
/// on a VM an idle vCPU halts, and waking it costs CRIU's cross-CPU work more than the poll costs. Raw
/// `criu dump` of 1 GiB here: 0.48 s (median of 8) with the other vCPU idle, 0.43 s with it busy; cedana
/// `--compression none` went from 0.51 s (sleeping 2 ms) to 0.45 s (polling). The poll lasts only while
/// CRIU dumps, when the dumped tree is frozen and leaves its CPU time unused.
fn wait_for_more(spin: bool) {
    if spin {
        let until = Instant::now() + Duration::from_millis(1);
        while Instant::now() < until {
            std::thread::yield_now();
        }
    } else {
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn read_until(f: &mut Followed, end: u64, buf: &mut [u8]) -> io::Result<()> {
    if f.mappable && end - f.offset >= MAP_AT_LEAST {
        return map_until(f, end);
    }
    while f.offset < end {
        let want = ((end - f.offset) as usize).min(PIECE);
        let n = f.file.read_at(&mut buf[..want], f.offset)?;
        if n == 0 {
            break;
        }
        f.hasher.update(&buf[..n]);
        f.offset += n as u64;
    }
    Ok(())
}

/// Hash `[offset, end)` of a page image through a read-only mapping: no copy into a buffer, so half the
/// memory traffic of `read` while CRIU is writing. Hashing beside CRIU still slows its page writing by 20-60 ms
/// per GiB on two vCPUs, about half of what hashing after CRIU costs.
fn map_until(f: &mut Followed, end: u64) -> io::Result<()> {
    let start = f.offset / PAGE * PAGE;
    let len = usize::try_from(end - start).map_err(io::Error::other)?;
    // SAFETY: read-only, private to this call, and within the size the file has now. CRIU writes each page
    // image once, front to back, and never truncates it, so the mapped range stays valid.
    let map = unsafe { memmap2::MmapOptions::new().offset(start).len(len).map(&f.file)? };
    let skip = usize::try_from(f.offset - start).map_err(io::Error::other)?;
    f.hasher.update(&map[skip..]);
    f.offset = end;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn digests_of_growing_files_match_whole_file_digests() {
        let dir = tempfile::tempdir().unwrap();
        let tail = TailHasher::start(dir.path()).unwrap();
        let mut f = File::create(dir.path().join("pages-1.img")).unwrap();
        for i in 0..40u32 {
            let block: Vec<u8> = (0..300_000u32).map(|j| (i * 7 + j) as u8).collect();
            f.write_all(&block).unwrap();
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Caught up at an offset that is not page-aligned, then a growth hashed through a mapping.
        std::thread::sleep(Duration::from_millis(30));
        f.write_all(&vec![0xa5u8; 3 << 20]).unwrap();
        std::fs::write(dir.path().join("core-1.img"), b"core").unwrap();
        // A file replaced after it was followed is hashed again.
        std::fs::write(dir.path().join("replaced.img"), b"first").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::remove_file(dir.path().join("replaced.img")).unwrap();
        std::fs::write(dir.path().join("replaced.img"), b"second version").unwrap();
        std::fs::write(dir.path().join("manifest.json"), b"{}").unwrap();
        let got = tail.finish(&["manifest.json"]).unwrap();
        let names: Vec<&str> = got.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["core-1.img", "pages-1.img", "replaced.img"]);
        for d in &got {
            assert_eq!(*d, digest::digest_file(&dir.path().join(&d.name), &d.name).unwrap());
        }
    }
}
