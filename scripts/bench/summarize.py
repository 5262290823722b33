#!/usr/bin/env python3
"""Helpers of scripts/bench-process.sh.

  summarize.py --stats IMAGES/stats-dump      CRIU's dump statistics as "key seconds" lines
  summarize.py --cedana-dump OUT              the timings tree of `cedana dump`, same form
  summarize.py --cedana-restore OUT           the timings of `cedana restore` 's summary line
  summarize.py --table results.tsv            the report (markdown tables)

results.tsv rows: round, mode, metric, value. Round 0 is the warm-up, left out of the statistics. Restore
pairs on one checkpoint (mode none) are recorded under round*100 + pair.
"""
import re
import statistics
import struct
import sys
from collections import defaultdict

IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306


def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def proto_fields(buf):
    """Top-level fields of a protobuf message: {tag: value or bytes} (varints and length-delimited only)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = varint(buf, i)
        tag, wire = key >> 3, key & 7
        if wire == 0:
            out[tag], i = varint(buf, i)
        elif wire == 2:
            n, i = varint(buf, i)
            out[tag], i = buf[i:i + n], i + n
        elif wire == 5:
            out[tag], i = struct.unpack_from("<I", buf, i)[0], i + 4
        elif wire == 1:
            out[tag], i = struct.unpack_from("<Q", buf, i)[0], i + 8
        else:
            raise ValueError(f"wire type {wire}")
    return out


def dump_stats(path):
    data = open(path, "rb").read()
    m1, m2, n = struct.unpack_from("<III", data, 0)
    if (m1, m2) != (IMG_SERVICE_MAGIC, STATS_MAGIC):
        raise SystemExit(f"{path}: not a CRIU stats image")
    dump = proto_fields(proto_fields(data[12:12 + n])[1])
    names = {1: "freezing", 2: "frozen", 3: "memdump", 4: "memwrite"}
    for tag, name in names.items():
        print(f"{name} {dump.get(tag, 0) / 1e6:.6f}")
    print(f"pages_written {dump.get(7, 0)}")


def ms_to_s(text):
    return f"{float(text) / 1000:.6f}"


def cedana_dump(path):
    """The phases of the timings tree that `cedana dump` prints (lines like "│  └─ frozen   34.3 ms")."""
    names = {"criu dump": "criu", "packaging": "packaging", "total": "total",
             "freezing": "freezing", "frozen": "frozen", "memdump": "memdump", "memwrite": "memwrite"}
    for line in open(path):
        m = re.match(r"^[\s│├└─]*([a-z][a-z ]*?)\s+([\d.]+) ms$", line.rstrip("\n"))
        if m and m.group(1) in names:
            print(names[m.group(1)], ms_to_s(m.group(2)))


def cedana_restore(path):
    m = re.search(r"\(verify ([\d.]+) ms, criu ([\d.]+) ms\)", open(path).read())
    if m:
        print("verify", ms_to_s(m.group(1)))
        print("criu", ms_to_s(m.group(2)))


# --- the report ------------------------------------------------------------------------------------------------

TARGETS = {"none": (1.05, 1.10), "zstd": (1.10, 1.10)}
# Against raw CRIU alone (the streaming issue's targets): dump / max(raw dump, codec alone) for zstd, dump / raw
# dump for lz4; restore / raw restore from uncompressed files.
RAW_TARGETS = {"zstd": (1.10, 1.30), "lz4": (1.00, 1.10)}
# The most memory the streaming side may hold beyond CRIU's own (peak RSS), MiB.
RSS_BEYOND = 64
CODEC = {
    "zstd": ("tar \\| zstd -1 -T0", "zstd -d -T0 \\| tar -x"),
    "gzip": ("tar \\| gzip -1", "gzip -d \\| tar -x"),
    "lz4": ("tar \\| lz4 -1 -B7", "lz4 -d \\| tar -x"),
    "zlib": ("tar \\| zlib level 1 (Python)", "zlib -d (Python) \\| tar -x"),
}


def table(path):
    data = defaultdict(dict)  # (mode, metric) -> {round: value}
    modes = []
    for line in open(path):
        r, mode, metric, value = line.rstrip("\n").split("\t")
        data[(mode, metric)][int(r)] = float(value)
        if mode not in modes:
            modes.append(mode)

    def vals(mode, metric, warm=False):
        d = data.get((mode, metric), {})
        return [v for r, v in sorted(d.items()) if (r == 0) == warm]

    def summed(mode, metrics):
        d = [data.get((mode, m), {}) for m in metrics]
        rounds = sorted(set.intersection(*(set(x) for x in d))) if d else []
        return [sum(x[r] for x in d) for r in rounds if r != 0]

    def fmt(xs):
        if not xs:
            return "| – | – | – "
        return f"| {statistics.median(xs):.3f} | {min(xs):.3f} | {max(xs):.3f} "

    def med(xs):
        return statistics.median(xs) if xs else float("nan")

    def row(label, xs, mode=None, key=None, ratio="", target=""):
        cpu = foreign = "–"
        if key:
            c, f = vals(mode, key + ".cpu"), vals(mode, key + ".foreign")
            cpu = f"{med(c):.2f}" if c else "–"
            foreign = f"{max(f):.2f}" if f else "–"
        print(f"| {label} {fmt(xs)}| {cpu} | {foreign} | {ratio} | {target} |")

    def paired(mode, ced_key, base_keys):
        """Median of per-round ratios (cedana / baseline of the same round): immune to drift between rounds."""
        ced = {r: v for r, v in data.get((mode, ced_key), {}).items() if r != 0}
        bases = [data.get((mode, k), {}) for k in base_keys]
        ratios = [ced[r] / sum(b[r] for b in bases) for r in ced if all(r in b for b in bases)]
        return med(ratios)

    def verdict(r, limit):
        return f"≤ {limit:.2f}: {'PASS' if r <= limit else 'FAIL'}"

    summary = []
    against_raw = []
    nrounds = len(set(r for (_, metric), d in data.items() if metric == "raw.dump.wall" for r in d if r != 0))
    print(f"\nSeconds over {nrounds} measured rounds (warm-up excluded). CPU = median user+sys of the command and"
          " the children it reaped (not the work CRIU does inside the dumped/restored workload); foreign = the most"
          " CPU-seconds other processes on this 2-core machine used during one of these steps. Ratios are of"
          " medians.")
    for mode in modes:
        raw_d, ced_d = vals(mode, "raw.dump.wall"), vals(mode, "ced.dump.wall")
        raw_r, ced_r = vals(mode, "raw.restore.wall"), vals(mode, "ced.restore.wall")
        pairs = bool(vals(mode, "raw.restore.afterdump.wall"))  # restores compared on one checkpoint
        print(f"\n### {mode}\n")
        print("| step | median s | min | max | CPU s | foreign s | ratio | target |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        if mode == "none":
            base_d, base_r = raw_d, raw_r
            row("raw `criu dump`", raw_d, mode, "raw.dump")
        else:
            s3 = bool(vals(mode, "raw.upload.wall"))  # an object store's mode: the raw tool's transfer too
            base_d = summed(mode, ["raw.dump.wall", "codec.c.wall"] + (["raw.upload.wall"] if s3 else []))
            base_r = summed(mode, (["raw.download.wall"] if s3 else []) + ["codec.d.wall", "raw.restore.wall"])
            row("raw `criu dump`", raw_d, mode, "raw.dump")
            row(f"codec alone: `{CODEC[mode.split(':')[0]][0]}`", vals(mode, "codec.c.wall"), mode, "codec.c")
            if s3:
                row("upload of its archive alone (boto3, 8 MiB parts, 4 at once)", vals(mode, "raw.upload.wall"), mode,
                    "raw.upload")
            row("**raw dump + codec" + (" + upload**" if s3 else "**"), base_d)
        rd = med(ced_d) / med(base_d)
        lim = TARGETS.get(mode, (None, None))
        row("**`cedana dump`**", ced_d, mode, "ced.dump", f"**{rd:.2f}**", verdict(rd, lim[0]) if lim[0] else "")
        row("&nbsp;&nbsp;cedana: criu part (page images packed beside it)", vals(mode, "ced.dump.criu"))
        row("&nbsp;&nbsp;cedana: packaging left after CRIU (in post-dump hook)", vals(mode, "ced.dump.packaging"))
        row("&nbsp;&nbsp;cedana: other (wall − criu − packaging)",
            [w - c - p for w, c, p in zip(ced_d, vals(mode, "ced.dump.criu"), vals(mode, "ced.dump.packaging"))])
        row("CRIU frozen time: raw", vals(mode, "raw.dump.frozen"))
        row("CRIU frozen time: cedana (includes the hook)", vals(mode, "ced.dump.frozen"))
        row("CRIU memwrite (pages into the images folder): raw", vals(mode, "raw.dump.memwrite"))
        row("CRIU memwrite: cedana", vals(mode, "ced.dump.memwrite"))
        if mode != "none":
            if s3:
                row("download of the archive alone (boto3, ranged GETs, 4 at once)", vals(mode, "raw.download.wall"),
                    mode, "raw.download")
            row(f"codec alone: `{CODEC[mode.split(':')[0]][1]}`", vals(mode, "codec.d.wall"), mode, "codec.d")
            row("raw `criu restore -d`", raw_r, mode, "raw.restore")
            row("**" + ("download + " if s3 else "") + "codec + raw restore**", base_r)
        elif pairs:
            row(f"raw `criu restore -d` of cedana's checkpoint ({len(raw_r)} restore pairs, by turns)", raw_r, mode,
                "raw.restore")
        else:
            row("raw `criu restore -d`", raw_r, mode, "raw.restore")
        rr = med(ced_r) / med(base_r)
        row("**`cedana restore`**" + (" of the same checkpoint" if pairs else ""), ced_r, mode, "ced.restore",
            f"**{rr:.2f}**", verdict(rr, lim[1]) if lim[1] else "")
        row("&nbsp;&nbsp;cedana: verify, as waited for (a folder is hashed mostly while CRIU starts)", vals(mode, "ced.restore.verify"))
        row("&nbsp;&nbsp;cedana: criu part (without its wait for the verification)", vals(mode, "ced.restore.criu"))
        row("&nbsp;&nbsp;cedana: other (wall − verify − criu)",
            [w - v - c for w, v, c in zip(ced_r, vals(mode, "ced.restore.verify"), vals(mode, "ced.restore.criu"))])
        if pairs:
            raw_a, ced_a = vals(mode, "raw.restore.afterdump.wall"), vals(mode, "ced.restore.afterdump.wall")
            ra = med(ced_a) / med(raw_a) if raw_a and ced_a else float("nan")
            row("(info) raw `criu restore -d` right after its own dump", raw_a, mode, "raw.restore.afterdump")
            row("(info) `cedana restore` right after its own dump", ced_a, mode, "ced.restore.afterdump",
                f"{ra:.2f}", "(noisy: see the script)")
        if mode != "none":
            row("(info) `rm -rf` of the raw images", vals(mode, "rm.images.wall"))
        raw_size = med(vals(mode, "raw.images.size"))
        sizes = [f"raw images {raw_size / 2**20:.1f} MiB"]
        if mode != "none":
            cs = med(vals(mode, "codec.size"))
            sizes.append(f"codec alone {cs / 2**20:.1f} MiB ({cs / raw_size:.3f}×)")
        cz = med(vals(mode, "ced.size"))
        sizes.append(f"cedana {cz / 2**20:.1f} MiB ({cz / raw_size:.3f}×)")
        print(f"\nSizes (median): {'; '.join(sizes)}.")
        warm = []
        for key, label in (("raw.dump", "raw dump"), ("codec.c", "codec"), ("ced.dump", "cedana dump"),
                           ("codec.d", "codec -d"), ("raw.restore", "raw restore"), ("ced.restore", "cedana restore"),
                           ("raw.restore.afterdump", "raw restore"), ("ced.restore.afterdump", "cedana restore")):
            w = vals(mode, key + ".wall", warm=True)
            if w:
                warm.append(f"{label} {'/'.join(f'{x:.2f}' for x in w)}")
        if warm:
            print(f"Warm-up round (fresh guest memory, not counted): {', '.join(warm)} s.")
        if mode == "none":
            pd, pr = paired(mode, "ced.dump.wall", ["raw.dump.wall"]), paired(mode, "ced.restore.wall", ["raw.restore.wall"])
        else:
            pd = paired(mode, "ced.dump.wall", ["raw.dump.wall", "codec.c.wall"])
            pr = paired(mode, "ced.restore.wall", ["codec.d.wall", "raw.restore.wall"])
        summary.append((mode, rd, rr, lim, cz / raw_size, pd, pr))
        codec = mode.split(":")[0]
        if codec in RAW_TARGETS:
            base = [max(a, b) for a, b in zip(raw_d, vals(mode, "codec.c.wall"))] if codec == "zstd" else raw_d
            rss = [med(vals(mode, k + ".rss")) / 1024 for k in ("raw.dump", "ced.dump", "raw.restore", "ced.restore")]
            against_raw.append((mode, med(ced_d) / med(base), med(ced_r) / med(raw_r), RAW_TARGETS[codec], rss))

    print("\n### Summary\n")
    print("Ratios of medians; in brackets the median of per-round paired ratios (for the `none` restore: of the"
          " restore pairs on one checkpoint).\n")
    print("| mode | dump ratio | target | restore ratio | target | size vs raw images |")
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for mode, rd, rr, lim, sz, pd, pr in summary:
        base = "criu" if mode == "none" else "criu + codec"
        t_d = verdict(rd, lim[0]) if lim[0] else "(none)"
        t_r = verdict(rr, lim[1]) if lim[1] else "(none)"
        print(f"| {mode} (cedana / {base}) | {rd:.2f} ({pd:.2f}) | {t_d} | {rr:.2f} ({pr:.2f}) | {t_r} | {sz:.3f} |")

    stores = [(m, m[:-len(":s3")]) for m in modes if m.endswith(":s3") and m[:-len(":s3")] in modes]
    if stores:
        print("\nTo and from the object store against the same to and from a local file (ratios of cedana's"
              " medians in the same rounds; the issue's targets: dump 1.3x, restore 1.5x).\n")
        print("| mode | dump: store / local file | target | restore: store / local file | target |")
        print("| --- | ---: | --- | ---: | --- |")
        for s3m, local in stores:
            rd = med(vals(s3m, "ced.dump.wall")) / med(vals(local, "ced.dump.wall"))
            rr = med(vals(s3m, "ced.restore.wall")) / med(vals(local, "ced.restore.wall"))
            print(f"| {s3m} / {local} | {rd:.2f} | {verdict(rd, 1.3)} | {rr:.2f} | {verdict(rr, 1.5)} |")

    if against_raw:
        print("\nAgainst raw CRIU alone (dump: zstd against the slower of raw `criu dump` and the codec alone, lz4"
              " against raw `criu dump`; restore against raw `criu restore` from uncompressed files). Peak RSS: of"
              " the command or any child it waited for (CRIU's own included), medians in MiB.\n")
        print("| mode | dump ratio | target | restore ratio | target | peak RSS dump raw / cedana (beyond) |"
              " peak RSS restore raw / cedana (beyond) |")
        print("| --- | ---: | --- | ---: | --- | --- | --- |")
        for mode, rd, rr, lim, (rdr, cdr, rrr, crr) in against_raw:
            mem = [f"{a:.0f} / {b:.0f} ({b - a:+.0f}: {'PASS' if b - a <= RSS_BEYOND else 'FAIL'})"
                   for a, b in ((rdr, cdr), (rrr, crr))]
            print(f"| {mode} | {rd:.2f} | {verdict(rd, lim[0])} | {rr:.2f} | {verdict(rr, lim[1])} | {mem[0]} | {mem[1]} |")

    disturbed = []
    for (mode, metric), d in data.items():
        if not metric.endswith(".wall"):
            continue
        key = metric[:-len(".wall")]
        for r, wall in d.items():
            comp = data.get((mode, key + ".compilers"), {}).get(r, 0)
            foreign = data.get((mode, key + ".foreign"), {}).get(r, 0)
            if r != 0 and foreign > 0.15 + 0.02 * wall:
                disturbed.append(f"{r}/{mode}/{key} ({foreign:.2f} CPU-s)")
    if disturbed:
        print(f"\nWARNING: other work ran during {len(disturbed)} measured steps (round/mode/step): "
              + ", ".join(sorted(disturbed)) + ". Repeat the run on a quiet machine.")
    else:
        print("\nNo measured step overlapped more than 0.15 CPU-s (+2% of its time) of other processes.")


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    cmd, arg = sys.argv[1:]
    {"--stats": dump_stats, "--cedana-dump": cedana_dump, "--cedana-restore": cedana_restore, "--table": table}[cmd](arg)


if __name__ == "__main__":
    main()
