#!/usr/bin/env python3
"""Async mode's batching: write rate and latency by batch size.

For each --async-batch value it starts a fresh async repdisk pair (512 MiB,
unix socket), fills the disk once, then runs fio's 4 KiB random writes at QD1
with O_DIRECT on the primary's disk.img and prints IOPS, p50/p99/p99.9
completion latency and the CPU time the primary spent per write.  Batch 1 is
batching off: the baseline, measured in the same run.  The first value's rate
is what the others' ratios are against.

Usage: .venv/bin/python tools/batch_sweep.py [--runtime S] [--reps N] [BATCH ...]
(default: 1 16 64; run as root, like tools/bench).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib.targets import RepdiskPair  # noqa: E402
from benchlib.util import cpu_seconds  # noqa: E402


def fio_randwrite(path: str, runtime: int) -> dict:
    out = subprocess.run(
        ["fio", "--name=w", f"--filename={path}", "--rw=randwrite", "--bs=4k", "--ioengine=psync", "--direct=1",
         "--size=512m", "--time_based", f"--runtime={runtime}", "--output-format=json"],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["jobs"][0]["write"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("batches", nargs="*", type=int, default=[1, 16, 64])
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio run (default 8)")
    ap.add_argument("--reps", type=int, default=2, help="fio runs per batch size (default 2)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix=".benchtmp-batch-", dir=os.getcwd())
    base = None
    try:
        for batch in args.batches:
            pair = RepdiskPair(os.path.join(work, str(batch)), 512 << 20, mode="async", transport="unix",
                               extra_primary=["--async-batch", str(batch)])
            pair.start()
            try:
                subprocess.run(["fio", "--name=fill", f"--filename={pair.pri_view}", "--rw=write", "--bs=1m",
                                "--direct=1", "--size=512m", "--end_fsync=1"], capture_output=True, check=True)
                for _ in range(args.reps):
                    pair.quiesce()
                    cpu0 = sum(cpu_seconds(pair.pids["primary"]))
                    w = fio_randwrite(pair.pri_view, args.runtime)
                    cpu = sum(cpu_seconds(pair.pids["primary"])) - cpu0
                    pct = w["clat_ns"]["percentile"]
                    base = base or w["iops"]
                    print(f"batch {batch:4d}: {w['iops']:8.0f} IOPS (x{w['iops'] / base:.2f})"
                          f"  p50 {pct['50.000000'] / 1e3:6.1f}  p99 {pct['99.000000'] / 1e3:6.1f}"
                          f"  p99.9 {pct['99.900000'] / 1e3:6.1f} us"
                          f"  primary CPU {cpu * 1e6 / w['total_ios']:5.1f} us/write", flush=True)
            finally:
                pair.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
