//! Upload and download throughput of an archive through the object-store sink and source (to a local moto
//! server), against the same bytes written to and read from a local file through `LocalFile` and
//! `LocalSource`. Run by `scripts/bench-storage.sh` (release build); see it for the settings.
//!
//! The bytes are generated as they are written (4 MiB writes, as the checkpoint writer's buffer makes them),
//! so the process's peak memory is the sink's own. Rounds alternate local and object store, deleting the
//! outputs between them (see FIELD-NOTES: fresh memory is slower to touch than reused memory).

use std::io::Read;
use std::time::Instant;

use cedana::checkpoint::{ArchiveSink, ArchiveSource, LocalFile, LocalSource};
use cedana::storage::{self, ObjectUrl, StorageConfig};
use cedana_integration::moto::MotoServer;

const WRITE: usize = 4 << 20;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `i`th 4 MiB chunk of the archive: pseudo-random (incompressible, like page images).
fn chunk(i: u64, buf: &mut [u8]) {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    for w in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// A cheap checksum of what was read back, so the reads cannot be optimised away and are checked.
fn sum(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(0u64, |a, w| a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap_or_default())))
}

/// Write `size` bytes through `sink` and finish it; seconds.
fn upload(mut sink: Box<dyn ArchiveSink>, size: usize) -> (f64, u64) {
    let mut buf = vec![0u8; WRITE];
    let mut total = 0u64;
    let start = Instant::now();
    for i in 0..(size / WRITE) as u64 {
        chunk(i, &mut buf);
        total = total.wrapping_add(sum(&buf));
        sink.write_all(&buf).expect("write");
    }
    sink.finish().expect("finish");
    (start.elapsed().as_secs_f64(), total)
}

/// Read all of `src` as one stream; seconds.
fn download(src: &dyn ArchiveSource) -> (f64, u64) {
    let mut buf = vec![0u8; 1 << 20];
    let (mut total, mut n) = (0u64, 0u64);
    let start = Instant::now();
    let mut r = src.read_from(0).expect("read_from");
    loop {
        // Whole buffers (the archive is whole 4 MiB chunks), so that the checksum sees whole words.
        let mut filled = 0;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]).expect("read") {
                0 => break,
                got => filled += got,
            }
        }
        total = total.wrapping_add(sum(&buf[..filled]));
        n += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    assert_eq!(n, src.len());
    (start.elapsed().as_secs_f64(), total)
}

/// CPU seconds (user + system) this process (not moto) used so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based), in clock ticks.
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(14) + ticks(15)) / hz
}

fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0)
        / 1024
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let size = env_num("BENCH_SIZE_MIB", 1024) << 20;
    let rounds = env_num("BENCH_ROUNDS", 3);
    let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let moto = MotoServer::start();
    let config = StorageConfig {
        part_size: env_num("BENCH_PART_MIB", 8) << 20,
        max_in_flight: env_num("BENCH_IN_FLIGHT", 4),
        read_segment: env_num("BENCH_SEGMENT_MIB", 64) as u64 * (1 << 20),
        ..MotoServer::storage_config(&moto.endpoint())
    };
    println!(
        "{} MiB, {rounds} rounds, part {} MiB, {} in flight, streams in GETs of {} MiB with {} MiB read ahead; local files in {dir}",
        size >> 20,
        config.part_size >> 20,
        config.max_in_flight,
        config.read_segment >> 20,
        (config.read_piece * config.read_ahead) >> 20
    );
    let mib = (size >> 20) as f64;
    let (mut lw, mut lr, mut ow, mut or, mut rss) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let path = std::path::Path::new(&dir).join(format!("cedana-bench-storage-{}.bin", std::process::id()));
        let (t, want) = upload(Box::new(LocalFile::create(path.clone()).expect("local file")), size);
        lw.push(mib / t);
        let (t, got) = download(&LocalSource::open(&path).expect("open"));
        assert_eq!(got, want, "local file read back differently");
        lr.push(mib / t);
        std::fs::remove_file(&path).expect("remove");

        let url = ObjectUrl::parse(&moto.url(&format!("bench/round-{round}.bin"))).expect("url");
        reset_peak_rss();
        let cpu = cpu_seconds();
        let (t, want) = upload(Box::new(storage::open_sink(&url, &config).expect("open sink")), size);
        let up_cpu = cpu_seconds() - cpu;
        rss.push(peak_rss_mib() as f64);
        ow.push(mib / t);
        let cpu = cpu_seconds();
        let (t, got) = download(&storage::open_source(&url, &config).expect("open source"));
        let down_cpu = cpu_seconds() - cpu;
        assert_eq!(got, want, "object read back differently");
        or.push(mib / t);
        println!(
            "round {round}: cedana's own CPU time: {up_cpu:.2} s uploading (generating the bytes included), {down_cpu:.2} s downloading"
        );
        storage::delete(&url, &config).expect("delete");
        println!(
            "round {round}: local write {:.0} MiB/s, read {:.0} MiB/s; object store upload {:.0} MiB/s, download {:.0} MiB/s (peak RSS while uploading {} MiB)",
            lw[round], lr[round], ow[round], or[round], rss[round]
        );
    }
    let span = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!("{lo:.0}-{hi:.0}")
    };
    let (slw, slr, sow, sor) = (span(&lw), span(&lr), span(&ow), span(&or));
    println!("median MiB/s (range): local write {:.0} ({slw}), local read {:.0} ({slr})", median(&mut lw), median(&mut lr));
    println!(
        "median MiB/s (range): object upload {:.0} ({sow}), object download {:.0} ({sor})",
        median(&mut ow),
        median(&mut or)
    );
    println!("peak RSS while uploading: {} MiB (whole process: runtime, client, sink)", rss.iter().fold(0f64, |a, &b| a.max(b)));
}
