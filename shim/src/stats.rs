//! Container statistics: the JSON of `RUNTIME events --stats ID` (runc's `types.Stats`, the same on cgroup v1
//! and v2) turned into containerd's cgroup v1 `Metrics`, which the runc shim answers Stats with on cgroup v1
//! (`ctr task metrics` prints memory, cpuacct and pids from it).

use std::collections::HashMap;

use containerd_shim_protos::cgroups::metrics::{
    BlkIOEntry, BlkIOStat, CPUStat, CPUUsage, HugetlbStat, MemoryEntry, MemoryStat, Metrics, PidsStat, Throttle,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The type URL containerd's clients decode cgroup v1 metrics by.
pub const METRICS_V1_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    data: Stats,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Stats {
    cpu: Cpu,
    memory: Memory,
    pids: Pids,
    blkio: Blkio,
    hugetlb: HashMap<String, Hugetlb>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Cpu {
    usage: CpuUsage,
    throttling: Throttling,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CpuUsage {
    total: u64,
    percpu: Vec<u64>,
    kernel: u64,
    user: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Throttling {
    periods: u64,
    throttled_periods: u64,
    throttled_time: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Memory {
    usage: MemEntry,
    swap: MemEntry,
    kernel: MemEntry,
    #[serde(rename = "kernelTCP")]
    kernel_tcp: MemEntry,
    raw: HashMap<String, u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MemEntry {
    limit: u64,
    usage: u64,
    max: u64,
    failcnt: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Pids {
    current: u64,
    limit: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Blkio {
    io_service_bytes_recursive: Option<Vec<BlkEntry>>,
    io_serviced_recursive: Option<Vec<BlkEntry>>,
    io_queued_recursive: Option<Vec<BlkEntry>>,
    io_service_time_recursive: Option<Vec<BlkEntry>>,
    io_wait_time_recursive: Option<Vec<BlkEntry>>,
    io_merged_recursive: Option<Vec<BlkEntry>>,
    io_time_recursive: Option<Vec<BlkEntry>>,
    sectors_recursive: Option<Vec<BlkEntry>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct BlkEntry {
    major: u64,
    minor: u64,
    op: String,
    value: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Hugetlb {
    usage: u64,
    max: u64,
    failcnt: u64,
}

fn entry(e: &MemEntry) -> MessageField<MemoryEntry> {
    MessageField::some(MemoryEntry { limit: e.limit, usage: e.usage, max: e.max, failcnt: e.failcnt, ..Default::default() })
}

fn blk(entries: &Option<Vec<BlkEntry>>) -> Vec<BlkIOEntry> {
    entries
        .iter()
        .flatten()
        .map(|e| BlkIOEntry { op: e.op.clone(), major: e.major, minor: e.minor, value: e.value, ..Default::default() })
        .collect()
}

/// The cgroup v1 metrics in the output of `RUNTIME events --stats` (one JSON object).
pub fn metrics_from_runtime_json(json: &[u8]) -> Result<Metrics> {
    let event: Event =
        serde_json::from_slice(json).map_err(|e| Error::internal(format!("reading the runtime's statistics: {e}")))?;
    let s = event.data;
    let raw = |k: &str| s.memory.raw.get(k).copied().unwrap_or_default();
    let memory = MemoryStat {
        cache: raw("cache"),
        rss: raw("rss"),
        rss_huge: raw("rss_huge"),
        mapped_file: raw("mapped_file"),
        dirty: raw("dirty"),
        writeback: raw("writeback"),
        pg_pg_in: raw("pgpgin"),
        pg_pg_out: raw("pgpgout"),
        pg_fault: raw("pgfault"),
        pg_maj_fault: raw("pgmajfault"),
        inactive_anon: raw("inactive_anon"),
        active_anon: raw("active_anon"),
        inactive_file: raw("inactive_file"),
        active_file: raw("active_file"),
        unevictable: raw("unevictable"),
        hierarchical_memory_limit: raw("hierarchical_memory_limit"),
        hierarchical_swap_limit: raw("hierarchical_memsw_limit"),
        total_cache: raw("total_cache"),
        total_rss: raw("total_rss"),
        total_rss_huge: raw("total_rss_huge"),
        total_mapped_file: raw("total_mapped_file"),
        total_dirty: raw("total_dirty"),
        total_writeback: raw("total_writeback"),
        total_pg_pg_in: raw("total_pgpgin"),
        total_pg_pg_out: raw("total_pgpgout"),
        total_pg_fault: raw("total_pgfault"),
        total_pg_maj_fault: raw("total_pgmajfault"),
        total_inactive_anon: raw("total_inactive_anon"),
        total_active_anon: raw("total_active_anon"),
        total_inactive_file: raw("total_inactive_file"),
        total_active_file: raw("total_active_file"),
        total_unevictable: raw("total_unevictable"),
        usage: entry(&s.memory.usage),
        swap: entry(&s.memory.swap),
        kernel: entry(&s.memory.kernel),
        kernel_tcp: entry(&s.memory.kernel_tcp),
        ..Default::default()
    };
    let cpu = CPUStat {
        usage: MessageField::some(CPUUsage {
            total: s.cpu.usage.total,
            kernel: s.cpu.usage.kernel,
            user: s.cpu.usage.user,
            per_cpu: s.cpu.usage.percpu.clone(),
            ..Default::default()
        }),
        throttling: MessageField::some(Throttle {
            periods: s.cpu.throttling.periods,
            throttled_periods: s.cpu.throttling.throttled_periods,
            throttled_time: s.cpu.throttling.throttled_time,
            ..Default::default()
        }),
        ..Default::default()
    };
    let blkio = BlkIOStat {
        io_service_bytes_recursive: blk(&s.blkio.io_service_bytes_recursive),
        io_serviced_recursive: blk(&s.blkio.io_serviced_recursive),
        io_queued_recursive: blk(&s.blkio.io_queued_recursive),
        io_service_time_recursive: blk(&s.blkio.io_service_time_recursive),
        io_wait_time_recursive: blk(&s.blkio.io_wait_time_recursive),
        io_merged_recursive: blk(&s.blkio.io_merged_recursive),
        io_time_recursive: blk(&s.blkio.io_time_recursive),
        sectors_recursive: blk(&s.blkio.sectors_recursive),
        ..Default::default()
    };
    let mut hugetlb: Vec<HugetlbStat> = s
        .hugetlb
        .iter()
        .map(|(size, h)| HugetlbStat {
            usage: h.usage,
            max: h.max,
            failcnt: h.failcnt,
            pagesize: size.clone(),
            ..Default::default()
        })
        .collect();
    hugetlb.sort_by(|a, b| a.pagesize.cmp(&b.pagesize));
    Ok(Metrics {
        hugetlb,
        pids: MessageField::some(PidsStat { current: s.pids.current, limit: s.pids.limit, ..Default::default() }),
        cpu: MessageField::some(cpu),
        memory: MessageField::some(memory),
        blkio: MessageField::some(blkio),
        ..Default::default()
    })
}

/// `metrics` as the Any of a Stats response.
pub fn metrics_any(metrics: &Metrics) -> Result<Any> {
    let value = metrics.write_to_bytes().map_err(|e| Error::internal(format!("encoding metrics: {e}")))?;
    Ok(Any { type_url: METRICS_V1_TYPE_URL.to_string(), value, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed output of runc 1.1.5 `events --stats` on cgroup v1.
    const RUNC: &str = r#"{"type":"stats","id":"p4","data":{"cpu":{"usage":{"total":8566472,"percpu":[322625,8243847],
        "kernel":0,"user":0},"throttling":{}},"memory":{"usage":{"limit":9223372036854771712,"usage":610304,"max":2260992,
        "failcnt":0},"swap":{"limit":1,"usage":2,"max":3,"failcnt":4},"kernelTCP":{"limit":7,"failcnt":0},
        "raw":{"cache":5,"rss":57344,"total_cache":6,"pgfault":664,"hierarchical_memory_limit":1048576}},
        "pids":{"current":1},"blkio":{"io_service_bytes_recursive":[{"major":8,"minor":0,"op":"Read","value":42}]},
        "hugetlb":{"2MB":{"usage":0,"max":0,"failcnt":1}},"intel_rdt":{},"network_interfaces":null}}"#;

    #[test]
    fn runc_stats_become_v1_metrics() {
        let m = metrics_from_runtime_json(RUNC.as_bytes()).unwrap();
        let mem = m.memory.as_ref().unwrap();
        assert_eq!((mem.usage.usage, mem.usage.limit, mem.usage.max), (610304, 9223372036854771712, 2260992));
        assert_eq!((mem.swap.limit, mem.swap.usage, mem.swap.failcnt), (1, 2, 4));
        assert_eq!(mem.kernel_tcp.limit, 7);
        assert_eq!((mem.cache, mem.rss, mem.total_cache, mem.pg_fault), (5, 57344, 6, 664));
        assert_eq!(mem.hierarchical_memory_limit, 1048576);
        let cpu = m.cpu.as_ref().unwrap();
        assert_eq!((cpu.usage.total, cpu.usage.per_cpu.clone()), (8566472, vec![322625, 8243847]));
        assert_eq!(m.pids.current, 1);
        assert_eq!(m.blkio.io_service_bytes_recursive[0].value, 42);
        assert_eq!((m.hugetlb[0].pagesize.as_str(), m.hugetlb[0].failcnt), ("2MB", 1));
        let any = metrics_any(&m).unwrap();
        assert_eq!(any.type_url, METRICS_V1_TYPE_URL);
        assert_eq!(Metrics::parse_from_bytes(&any.value).unwrap(), m);
    }

    #[test]
    fn garbage_is_an_internal_error() {
        assert_eq!(metrics_from_runtime_json(b"not json").unwrap_err().kind, crate::error::Kind::Internal);
    }
}
