#!/usr/bin/env python3
"""What the primary's activity log costs: random 4 KiB writes with and without it.

The log bounds the resync after a crash of the primary (README, *Crash
safety*): a write to a 4 MiB extent not in the log first stores the log
(one small write and fdatasync), and a full log evicts a batch of idle
extents after an fdatasync of the image.  Its cost depends on the working
set, so this measures two:

  spread   random writes over the whole --size disk (default 1 TiB): nearly
           every write is in a new extent, the worst case
  hot      random writes over --hot bytes (default 1 GiB), which fit in the log

For each, a fresh sync-mode repdisk pair (unix socket) with the defaults
("rf": the log kept durable, and a write into an extent it does not hold
goes replica first instead of waiting for the log's flush), one with
`--replica-first off` ("log": such a write waits for the log's fdatasync),
one with the log in the page cache ("cached", --al-durability process: a
host crash means a full resync) and one with `--al-extents 0` (no log: any
crash means a full resync) runs fio
psync QD1 with 2 jobs for --runtime seconds, then fsyncs disk.img, --reps
times.  It prints the median IOPS counting the time of that flush (without
the log the image's dirty pages wait in the page cache and the flush pays
for them; with it each eviction flushes them during the run) and before it,
p50/p99 latency, log updates per write, evictions, and the log's ratio to
no log.

Usage: .venv/bin/python tools/al_cost.py [--size BYTES] [--hot BYTES]
       [--runtime S] [--reps N] [--case spread|hot] [--config rf|log|cached|"no log"]   (run as root, like tools/bench)
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib.fio import run_fio  # noqa: E402
from benchlib.targets import RepdiskPair  # noqa: E402
from benchlib.util import human_size  # noqa: E402
from repdisk.core.image import parse_size  # noqa: E402


CONFIGS = {"rf": [], "log": ["--replica-first", "off"], "cached": ["--al-durability", "process"],
           "no log": ["--al-extents", "0"]}


def measure(work: str, size: int, region: int, al: list[str], runtime: int) -> dict:
    pair = RepdiskPair(work, size, mode="sync", transport="unix", extra_primary=al)
    pair.start()
    try:
        al0 = pair.status("primary")["activity_log"]
        r = run_fio(pair.pri_view, {"ioengine": "psync", "iodepth": 1, "rw": "randwrite", "bs": "4k",
                                    "numjobs": 2, "group_reporting": 1, "size": region,
                                    "time_based": 1, "runtime": runtime, "randrepeat": 0,
                                    "allow_file_create": 0}, direct=False, timeout=runtime + 120)
        # Without the log the image's dirty pages wait in the page cache; with
        # it each eviction flushes them.  Count the flush that makes the writes
        # durable in both cases, so neither defers work past the measurement.
        t0 = time.monotonic()
        fd = os.open(pair.pri_view, os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        flush_s = time.monotonic() - t0
        al1 = pair.status("primary")["activity_log"]
    except Exception:
        for name, proc in pair.procs.items():  # the nodes' own account, before the work dir goes
            print(f"{name} log: {proc.tail(12)}", file=sys.stderr)
        raise
    finally:
        pair.stop()
        shutil.rmtree(work, ignore_errors=True)
    ios = max(1, r["ios"])
    return {"iops": r["iops"], "p50_us": r["p50_us"], "p99_us": r["p99_us"], "flush_s": flush_s,
            "durable_iops": r["ios"] / (r["runtime_ms"] / 1000 + flush_s),
            "al_writes_per_io": (al1["writes"] - al0["writes"]) / ios,
            "evictions": al1["evictions"] - al0["evictions"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 40, help="disk size (default 1T)")
    ap.add_argument("--hot", type=parse_size, default=1 << 30, help="the hot working set (default 1G)")
    ap.add_argument("--runtime", type=int, default=20, help="seconds per fio run (default 20)")
    ap.add_argument("--reps", type=int, default=3, help="runs per case (default 3)")
    ap.add_argument("--case", action="append", choices=("spread", "hot"), help="only this case (repeatable)")
    ap.add_argument("--config", action="append", choices=CONFIGS, help="only this configuration (repeatable)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix=".benchtmp-al-", dir=os.getcwd())
    try:
        for case, region in (("spread", args.size), ("hot", args.hot)):
            if args.case and case not in args.case:
                continue
            medians = {}
            for name, al in CONFIGS.items():
                if args.config and name not in args.config:
                    continue
                runs = []
                for rep in range(args.reps):
                    runs.append(measure(os.path.join(work, f"{case}-{name.replace(' ', '')}-{rep}"),
                                        args.size, region, al, args.runtime))
                m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                medians[name] = m
                spread = f"{min(r['durable_iops'] for r in runs):.0f}-{max(r['durable_iops'] for r in runs):.0f}"
                print(f"{case:6s} ({human_size(region)} of {human_size(args.size)}) {name:6s}: "
                      f"{m['durable_iops']:6.0f} IOPS with the flush ({spread}; {m['iops']:.0f} before it, "
                      f"flush {m['flush_s']:.1f} s)  p50 {m['p50_us']:.0f}  p99 {m['p99_us']:.0f} us"
                      f"  log writes/write {m['al_writes_per_io']:.2f}  evictions {m['evictions']:.0f}",
                      flush=True)
            for name in ("rf", "log", "cached"):
                if name not in medians or "no log" not in medians:
                    continue
                print(f"{case:6s}: {name} / no log = "
                      f"{medians[name]['durable_iops'] / medians['no log']['durable_iops']:.2f} with the flush, "
                      f"{medians[name]['iops'] / medians['no log']['iops']:.2f} before it", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
