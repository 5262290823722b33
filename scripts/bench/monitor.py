#!/usr/bin/env python3
"""monitor.py ROOT_PID OUT_FILE [INTERVAL]: watch for work on the machine that is not the benchmark's.

Every INTERVAL seconds (default 0.2) appends one line to OUT_FILE:

    <unix time> <foreign CPU seconds since the last line> <compilers running> <busiest foreign command>

"Foreign" means user-space processes that are not ROOT_PID or its descendants (the benchmark, CRIU, cedana and
the workload, which is restored as a child of ROOT_PID) and not this monitor; kernel threads are left out.
Compilers are rustc, cc1, ld, cargo and the like: someone building on this 2-core machine. Processes that live
less than one interval are missed, but a compiler run of any length is not. Exits when ROOT_PID is gone.
"""
import os
import sys
import time

PF_KTHREAD = 0x00200000
COMPILERS = {"rustc", "cc1", "cc1plus", "ld", "ld.lld", "ld.gold", "collect2", "cargo", "clippy-driver", "rust-lld"}


def snapshot():
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        r = s.rindex(b")")
        comm = s[s.index(b"(") + 1:r].decode(errors="replace")
        f = s[r + 2:].split()
        flags, ppid = int(f[6]), int(f[1])
        if flags & PF_KTHREAD:
            continue
        procs[int(d)] = (ppid, int(f[11]) + int(f[12]), int(f[19]), comm)
    return procs


def main():
    root, out = int(sys.argv[1]), open(sys.argv[2], "a", buffering=1)
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.2
    hz = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    prev = snapshot()
    while os.path.exists(f"/proc/{root}"):
        time.sleep(interval)
        cur = snapshot()
        ours = {}

        def is_ours(pid, depth=0):
            if pid in ours:
                return ours[pid]
            if pid == root:
                res = True
            elif pid <= 1 or pid not in cur or depth > 64:
                res = False
            else:
                res = is_ours(cur[pid][0], depth + 1)
            ours[pid] = res
            return res

        foreign, compilers, top = 0, 0, ("-", 0)
        for pid, (ppid, cpu, start, comm) in cur.items():
            if pid == me or is_ours(pid):
                continue
            if comm in COMPILERS:
                compilers += 1
            old = prev.get(pid)
            delta = cpu - old[1] if old and old[2] == start else cpu
            foreign += delta
            if delta > top[1]:
                top = (comm.replace(" ", "_"), delta)
        out.write(f"{time.time():.3f} {foreign / hz:.2f} {compilers} {top[0]}\n")
        prev = cur


if __name__ == "__main__":
    main()
