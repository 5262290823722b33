//! The checksums of a set of files already on disk, cut into [`CHUNK`]-sized pieces that any number of
//! threads take in turn. A restore starts one worker beside CRIU's start-up and the thread that then waits
//! for the verdict joins in, so no core sits idle and CRIU's own start-up is not slowed down by extra
//! hashing threads; `inspect --verify` and the dump's final pass run it on every core.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::digest::{combine, xxh3_128, FileDigest, Hasher, CHUNK};

/// One file to hash: its name in the manifest and its mapped content.
struct Source {
    name: String,
    len: u64,
    /// `None` for an empty file (nothing to map).
    map: Option<memmap2::Mmap>,
}

/// Hashing work over a set of files, shareable between threads.
pub struct DigestJob {
    files: Vec<Source>,
    /// (file index, byte offset) of every piece, files in order.
    pieces: Vec<(usize, usize)>,
    next: AtomicUsize,
    hashes: Vec<OnceLock<u128>>,
    /// Bytes hashed so far, by every worker.
    hashed: AtomicU64,
}

impl DigestJob {
    /// Open and map `files` (name, path). On failure, the index of the file that could not be opened.
    pub fn open(files: impl IntoIterator<Item = (String, PathBuf)>) -> Result<Self, (usize, io::Error)> {
        let mut sources = Vec::new();
        let mut pieces = Vec::new();
        for (i, (name, path)) in files.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|e| (i, e))?;
            let len = file.metadata().map_err(|e| (i, e))?.len();
            let map = if len == 0 {
                None
            } else {
                // SAFETY: the mapping is read-only and private to this job; checkpoint files are not modified
                // while they are hashed (CRIU has closed them, or they are a finished checkpoint). A
                // concurrent truncation by someone else would fault (SIGBUS) rather than corrupt memory.
                Some(unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| (i, e))?)
            };
            pieces.extend((0..len as usize).step_by(CHUNK).map(|offset| (i, offset)));
            sources.push(Source { name, len, map });
        }
        let hashes = (0..pieces.len()).map(|_| OnceLock::new()).collect();
        Ok(Self { files: sources, pieces, next: AtomicUsize::new(0), hashes, hashed: AtomicU64::new(0) })
    }

    /// Total bytes to hash.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    /// Hash pieces until none is left to take (others may still be finishing theirs).
    pub fn work(&self) {
        self.work_reporting(&|_| {});
    }

    /// [`Self::work`], telling `progress` how many more bytes every worker together has hashed, after each
    /// piece this thread hashed.
    fn work_reporting(&self, progress: &dyn Fn(u64)) -> u64 {
        let mut reported = 0;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&(file, offset)) = self.pieces.get(i) else { return reported };
            let Some(map) = &self.files[file].map else { continue };
            let end = (offset + CHUNK).min(map.len());
            let _ = self.hashes[i].set(xxh3_128(&map[offset..end]));
            let now = self.hashed.fetch_add((end - offset) as u64, Ordering::Relaxed) + (end - offset) as u64;
            if now > reported {
                progress(now - reported);
                reported = now;
            }
        }
    }

    /// Hash everything with `threads` threads in all, this one included, reporting progress in bytes.
    pub fn run(&self, threads: usize, progress: &dyn Fn(u64)) {
        let extra = threads.min(self.pieces.len()).saturating_sub(1);
        let reported = std::thread::scope(|scope| {
            for _ in 0..extra {
                scope.spawn(|| self.work());
            }
            self.work_reporting(progress)
        });
        progress(self.total_bytes().saturating_sub(reported));
    }

    /// The digests, in the order the files were given. Call once every worker has returned.
    pub fn digests(&self) -> Vec<FileDigest> {
        let mut chunks: Vec<Vec<u128>> = vec![Vec::new(); self.files.len()];
        for ((file, _), hash) in self.pieces.iter().zip(&self.hashes) {
            // Every piece was taken by a worker that returned, so every slot is set; a missing one would
            // only come from a worker that panicked, which the callers report before getting here.
            chunks[*file].push(hash.get().copied().unwrap_or_default());
        }
        self.files
            .iter()
            .zip(chunks)
            .map(|(f, c)| if f.len == 0 { Hasher::new().finish(f.name.clone()) } else { combine(f.name.clone(), f.len, &c) })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest computed sequentially, as a stream would.
    fn streamed(path: &std::path::Path, name: &str) -> FileDigest {
        let mut h = Hasher::new();
        for piece in std::fs::read(path).unwrap().chunks(1_000_003) {
            h.update(piece);
        }
        h.finish(name)
    }

    #[test]
    fn shared_work_gives_the_digests_of_each_file() {
        let dir = tempfile::tempdir().unwrap();
        let lens = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17];
        let mut files = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, (0..*len).map(|b| (b % 251) as u8).collect::<Vec<_>>()).unwrap();
            files.push((format!("f{i}"), p));
        }
        for threads in [1, 2, 5] {
            let job = DigestJob::open(files.clone()).unwrap();
            assert_eq!(job.total_bytes(), lens.iter().map(|l| *l as u64).sum::<u64>());
            let seen = std::sync::atomic::AtomicU64::new(0);
            job.run(threads, &|n| {
                seen.fetch_add(n, Ordering::Relaxed);
            });
            assert_eq!(seen.into_inner(), job.total_bytes(), "progress adds up, {threads} threads");
            let want: Vec<FileDigest> = files.iter().map(|(n, p)| streamed(p, n)).collect();
            assert_eq!(job.digests(), want, "{threads} threads");
        }
    }

    #[test]
    fn a_worker_that_joins_late_takes_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![7u8; 4 * CHUNK]).unwrap();
        let job = std::sync::Arc::new(DigestJob::open([("big".to_string(), p.clone())]).unwrap());
        let background = {
            let job = std::sync::Arc::clone(&job);
            std::thread::spawn(move || job.work())
        };
        job.work();
        background.join().unwrap();
        assert_eq!(job.digests(), vec![streamed(&p, "big")]);
    }

    #[test]
    fn a_missing_file_is_named_by_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok");
        std::fs::write(&ok, b"x").unwrap();
        let Err((i, e)) = DigestJob::open([("ok".into(), ok), ("gone".into(), dir.path().join("gone"))]) else {
            panic!("opened a missing file")
        };
        assert_eq!((i, e.kind()), (1, io::ErrorKind::NotFound));
    }
}
