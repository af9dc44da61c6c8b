#!/usr/bin/env python3
"""Async mode's batching: write rate and latency by batch size.

For each --async-batch value, fresh async repdisk pairs (512 MiB, unix
socket) run fio's 4 KiB random writes at QD1 with O_DIRECT on the primary's
disk.img; it prints IOPS, p50/p99/p99.9 completion latency and the CPU time
the primary spent per write, then each value's median and its ratio to the
first value's (batch 1 is batching off: the baseline, measured in the same
run).  It is tools/option_ab.py with the option, mode and node filled in.

Usage: .venv/bin/python tools/batch_sweep.py [--runtime S] [--reps N] [BATCH ...]
(default: 1 16 64; run as root, like tools/bench).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import option_ab  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("batches", nargs="*", type=int, default=[1, 16, 64])
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio run (default 8)")
    ap.add_argument("--reps", type=int, default=2, help="pairs per batch size (default 2)")
    args = ap.parse_args()
    return option_ab.main(["--option=--async-batch", "--on", "primary", "--mode", "async",
                           "--runtime", str(args.runtime), "--rounds", str(args.reps),
                           *map(str, args.batches)])


if __name__ == "__main__":
    sys.exit(main())
