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

    tools/folio_cost.py --rewrite [--dir DIR] [--size 256M] [--reps 3]

The converse, behind repdisk.core.image.REFOLIO_MIN: what a sequential
rewrite in 1 MiB RawImage.pwrite calls costs, per MiB, after each of the
states a disk image's page cache is commonly in (random 4 KiB writes over a
tenth or half of it, synced or not; all of it written in big pieces or in
4 KiB ones; read; nothing cached), with the drop of partly cached clean
ranges (RawImage._drop_fragments) on and off.
"""

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from repdisk.core.image import WRITE_PIECE, RawImage, parse_size  # noqa: E402

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


# label -> (what is done to the file before the rewrite, fsync after it)
REWRITE_STATES = {
    "nothing cached": ("nothing", False),
    "4K writes over 1/10, synced": ("scatter 10", True),
    "4K writes over 1/2, synced": ("scatter 2", True),
    "4K writes over 1/2, dirty": ("scatter 2", False),
    "all written in 4K, synced": ("every page", True),
    "all written in 128K, synced": ("big writes", True),
    "all read": ("read", False),
}


def rewrite_run(path: str, size: int, state: tuple[str, bool], drop: bool, seed: int) -> tuple[float, float]:
    """(wall, system) ms per MiB of rewriting the file in 1 MiB pwrites
    after `state` (a REWRITE_STATES value)."""
    img = RawImage.open(path, size)
    try:
        chunk = os.urandom(MIB)
        for off in range(0, size, MIB):  # on disk, nothing cached
            img.pwrite(chunk, off)
        img.fsync()
        os.posix_fadvise(img.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        rnd, small, pages = random.Random(seed), os.urandom(4096), size >> 12
        what, sync = state
        if what.startswith("scatter"):  # "scatter N": pages/N writes at random pages
            for _ in range(pages // int(what.split()[1])):
                os.pwrite(img.fd, small, rnd.randrange(pages) << 12)
        elif what == "every page":
            order = list(range(pages))
            rnd.shuffle(order)
            for i in order:
                os.pwrite(img.fd, small, i << 12)
        elif what == "big writes":
            for off in range(0, size, MIB):
                img.pwrite(chunk, off)
        elif what == "read":
            for off in range(0, size, MIB):
                os.pread(img.fd, MIB, off)
        if sync:
            img.fsync()
        time.sleep(0.5)  # let write-back started by the kernel settle
        if not drop:
            img._drop_fragments = lambda offset, length: None
        c0, t0 = os.times(), time.perf_counter()
        for off in range(0, size, MIB):
            img.pwrite(chunk, off)
        wall, c1 = time.perf_counter() - t0, os.times()
        img.fsync()
        return wall / (size / MIB) * 1e3, (c1.system - c0.system) / (size / MIB) * 1e3
    finally:
        img.close()
        os.unlink(path)


def rewrite_main(args, size: int, path: str) -> int:
    print(f"{os.uname().release}, {size // MIB} MiB file in {os.path.abspath(args.dir)}, rewritten in 1 MiB "
          f"RawImage.pwrite calls, {args.reps} reps; ms per MiB, median (min-max)")
    print(f"{'before the rewrite':32} {'wall, no drop':>20} {'wall, drop':>20} {'sys, no drop':>20} "
          f"{'sys, drop':>20}")
    for label, state in REWRITE_STATES.items():
        runs = {drop: [rewrite_run(path, size, state, drop, seed) for seed in range(args.reps)]
                for drop in (False, True)}
        print(f"{label:32} " + " ".join(f"{spread([r[k] for r in runs[d]], 3):>20}"
                                        for k in (0, 1) for d in (False, True)), flush=True)
    return 0


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):8.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".", help="directory on the file system to measure (default: .)")
    ap.add_argument("--size", help="file size (default 512M, 256M with --rewrite)")
    ap.add_argument("--writes", type=int, default=30000, help="random 4 KiB writes per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rewrite", action="store_true",
                    help="measure 1 MiB rewrites after small writes instead (default size 256M)")
    args = ap.parse_args()
    size = parse_size(args.size if args.size is not None else "256M" if args.rewrite else "512M") // MIB * MIB
    if size < MIB:
        ap.error("--size must be at least 1M")
    path = os.path.join(args.dir, f".folio_cost.{os.getpid()}")
    if args.rewrite:
        return rewrite_main(args, size, path)
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
