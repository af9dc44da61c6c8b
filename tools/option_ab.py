#!/usr/bin/env python3
"""A/B one node option on a repdisk pair: a 4 KiB fio job's rate by setting.

For each round and each VALUE of OPTION (rounds alternate the values, so a
drift of the machine spreads over all of them), it starts a fresh pair (512
MiB; --mode, --transport; OPTION=VALUE on the nodes --on names), fills the
disk once with 1 MiB direct writes, warms up for 2 s, then runs one of the
benchmark's 4 KiB jobs (--workload: random writes QD1, random reads QD1, or
random writes with 4 jobs; tools/benchlib/fio.py) on the primary's disk.img,
direct unless --buffered, and prints IOPS, p50/p99/p99.9 completion latency
and the primary's CPU per request.  At the end: each value's median IOPS and
its ratio to the first value's, the baseline measured in the same run.

Usage: .venv/bin/python tools/option_ab.py --option=--fuse-poll-us 0 50
       [--mode async] [--transport tcp] [--workload randread] [--rounds 3]
(run as root, like tools/bench).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib.fio import job_options, run_fio  # noqa: E402
from benchlib.targets import RepdiskPair  # noqa: E402
from benchlib.util import MiB, cpu_seconds  # noqa: E402

SIZE = 512 * MiB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--option", required=True, help="the node option, e.g. --fuse-poll-us")
    ap.add_argument("values", nargs="+", help="its values; the first is the baseline")
    ap.add_argument("--on", choices=("both", "primary", "secondary"), default="both")
    ap.add_argument("--mode", choices=("sync", "async"), default="sync")
    ap.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    ap.add_argument("--workload", choices=("randwrite", "randread", "randwrite4"), default="randwrite")
    ap.add_argument("--buffered", action="store_true", help="fio without O_DIRECT")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio run (default 8)")
    ap.add_argument("--rounds", type=int, default=2, help="pairs per value (default 2)")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix=".benchtmp-ab-", dir=os.getcwd())
    iops = {v: [] for v in args.values}
    try:
        for rnd in range(args.rounds):
            for value in args.values:
                opt = [args.option, value]
                pair = RepdiskPair(os.path.join(work, f"{rnd}-{value}"), SIZE, mode=args.mode,
                                   transport=args.transport,
                                   extra_primary=opt if args.on != "secondary" else [],
                                   extra_secondary=opt if args.on != "primary" else [])
                pair.start()
                try:
                    subprocess.run(["fio", "--name=fill", f"--filename={pair.pri_view}", "--rw=write", "--bs=1m",
                                    "--direct=1", f"--size={SIZE}", "--end_fsync=1"], capture_output=True, check=True)
                    run_fio(pair.pri_view, job_options(args.workload, SIZE, 2), direct=not args.buffered)  # warm-up
                    pair.quiesce()
                    cpu0 = sum(cpu_seconds(pair.pids["primary"]))
                    r = run_fio(pair.pri_view, job_options(args.workload, SIZE, args.runtime), direct=not args.buffered)
                    cpu = sum(cpu_seconds(pair.pids["primary"])) - cpu0
                    iops[value].append(r["iops"])
                    print(f"round {rnd} {args.option} {value:>6}: {r['iops']:8.0f} IOPS"
                          f"  p50 {r['p50_us']:6.1f}  p99 {r['p99_us']:6.1f}  p99.9 {r['p999_us']:6.1f} us"
                          f"  primary CPU {cpu * 1e6 / r['ios']:5.1f} us/request", flush=True)
                finally:
                    pair.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(iops[args.values[0]])
    for value in args.values:
        med = statistics.median(iops[value])
        print(f"{args.option} {value:>6}: median {med:8.0f} IOPS (x{med / base:.2f})"
              f"  runs {', '.join(f'{x:.0f}' for x in sorted(iops[value]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
