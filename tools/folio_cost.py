#!/usr/bin/env python3
"""What a 4 KiB write costs in a file region that was written in big pieces.

The page cache sizes a folio after the write that creates it.  On kernels
with large folios (ext4, 6.x) one 1 MiB pwrite leaves a 1 MiB folio, and each
later 4 KiB pwrite into it costs several times the system time it costs in a
small folio.  repdisk therefore writes big buffers in pieces of
repdisk.core.image.WRITE_PIECE; this measures why, on the file system given.

    tools/folio_cost.py [--dir DIR] [--size 512M] [--writes 30000] [--reps 3]

For each piece size: the file is filled with 1 MiB writes issued as pieces of
that size, synced, then rewritten at random 4 KiB offsets.  Printed: fill
MiB/s and the 4 KiB write's wall and system time per write (medians over
--reps, with min-max).
"""

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from repdisk.core.image import WRITE_PIECE, parse_size  # noqa: E402

MIB = 1 << 20


def one_run(path: str, size: int, piece: int, writes: int, seed: int) -> tuple[float, float, float]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        chunk = memoryview(os.urandom(MIB))
        t0 = time.perf_counter()
        for off in range(0, size, MIB):
            for p in range(0, MIB, piece):
                os.pwrite(fd, chunk[p : p + piece], off + p)
        fill = time.perf_counter() - t0
        os.fsync(fd)
        small = os.urandom(4096)
        rnd = random.Random(seed)
        offsets = [rnd.randrange(size >> 12) << 12 for _ in range(writes)]
        c0 = os.times()
        t0 = time.perf_counter()
        for off in offsets:
            os.pwrite(fd, small, off)
        wall = time.perf_counter() - t0
        c1 = os.times()
        return size / MIB / fill, wall / writes * 1e6, (c1.system - c0.system) / writes * 1e6
    finally:
        os.close(fd)
        os.unlink(path)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".", help="directory on the file system to measure (default: .)")
    ap.add_argument("--size", default="512M", help="file size (default 512M)")
    ap.add_argument("--writes", type=int, default=30000, help="random 4 KiB writes per run")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size) // MIB * MIB
    if size < MIB:
        ap.error("--size must be at least 1M")
    path = os.path.join(args.dir, f".folio_cost.{os.getpid()}")
    print(f"{os.uname().release}, {size // MIB} MiB file in {os.path.abspath(args.dir)}, "
          f"{args.writes} random 4 KiB writes, {args.reps} reps (median (min-max))")
    print(f"{'fill piece':>12} {'fill MiB/s':>22} {'4K write wall us':>22} {'4K write sys us':>22}")
    for piece in sorted({MIB, 256 << 10, WRITE_PIECE, 64 << 10}, reverse=True):
        runs = [one_run(path, size, piece, args.writes, seed) for seed in range(args.reps)]
        mark = "  <- repdisk's WRITE_PIECE" if piece == WRITE_PIECE else ""
        print(f"{piece >> 10:>10}K  {spread([r[0] for r in runs]):>22} {spread([r[1] for r in runs]):>22} "
              f"{spread([r[2] for r in runs]):>22}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
