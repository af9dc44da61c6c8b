#!/usr/bin/env python3
"""What it costs this machine to put new pages into the page cache.

The benchmark's first-touch rows (1 MiB writes into a fresh, sparse image)
are bounded by the kernel allocating page-cache pages, not by repdisk or
QEMU.  On a VM whose kernel reports free pages to the host (free page
reporting: `page_reporting` in /sys/module, used by virtio-balloon and
Firecracker), memory that stayed free for a couple of seconds goes back to
the host, and touching it again faults it back in through the host: several
times the cost of reusing pages that were freed a moment ago.  This measures
the three cases, writing --size bytes in 1 MiB pwrites from one reused buffer:

  cached    overwriting a file whose pages are in the page cache (no allocation)
  recycled  a new file right after a file of the same size was deleted
  idle      a new file after memory stayed free for --idle seconds
  idle_pieces  the same, but each MiB written as repdisk writes it, in
            pieces of WRITE_PIECE (128 KiB)

and prints system CPU time and wall time per MiB for each, plus the free
page reporting settings when the kernel has them and how much memory it
reported to the host during the idle wait.  Reporting starts only once more
than max_waiting_mib of memory is free and waiting, so by default the files
are that much plus 512 MiB (256 MiB without reporting).  Measured here
(6.18 Firecracker guest, max_waiting_mib 1024): 1.5 GiB files cost 0.23
(cached), 0.34 (recycled) and 1.71 (idle) ms of system time per MiB; with
256 MiB files nothing was reported and idle cost the same as recycled.
On 2026-12-06 the same probe gave 0.09, 0.23, 1.12 and, in 128 KiB pieces,
0.36 (wall, ms per MiB): a 1 MiB pwrite into a new region makes a 1 MiB
folio (large folios, ext4 on 6.18), and on memory the host took back such
folios cost 3x what small ones cost (ad hoc: 512 KiB pieces 0.25-0.28;
two threads each writing half of every MiB in 128 KiB pieces 0.39-0.45, so
no gain from a second thread).  repdisk writes in such pieces (WRITE_PIECE);
fio's buffered jobs on a plain file write whole MiB.
tools/bench records the same figures in its JSON (meta.first_touch), so a run's first-touch rows can
be read against the machine's cost at the time.

    tools/first_touch.py [--dir DIR] [--size BYTES] [--idle 5]
    tools/first_touch.py [--dir DIR] --budget 10     # see budget()
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from repdisk.core.image import WRITE_PIECE, parse_size  # noqa: E402

MIB = 1 << 20
CASES = ("cached", "recycled", "idle", "idle_pieces")
REPORTING = "/sys/module/page_reporting/parameters"


def page_reporting() -> dict:
    """The kernel's free page reporting parameters ({} when it has none)."""
    out = {}
    try:
        names = sorted(os.listdir(REPORTING))
    except OSError:
        return out
    for name in names:
        try:
            with open(os.path.join(REPORTING, name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        out[name] = int(text) if text.lstrip("-").isdigit() else text
    return out


def reported_kib() -> int | None:
    """KiB of free memory the kernel has reported to the host since boot
    (None without free page reporting)."""
    v = page_reporting().get("reported_kib")
    return v if isinstance(v, int) else None


def _fill(path: str, size: int, chunk: memoryview, create: bool, piece: int = MIB,
          sync: bool = False) -> tuple[float, float]:
    """Write `size` bytes into `path` in pwrites of `piece` bytes (fsynced
    after the timing when `sync`); (system s, wall s) per MiB."""
    flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0)
    pieces = [chunk[i : i + piece] for i in range(0, MIB, piece)]
    fd = os.open(path, flags, 0o600)
    try:
        s0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
        for off in range(0, size, MIB):
            for i, p in enumerate(pieces):
                os.pwrite(fd, p, off + i * piece)
        wall = time.perf_counter() - t0
        sys_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    mib = size / MIB
    return sys_s / mib, wall / mib


def default_size() -> int:
    """Enough to make the kernel report: max_waiting_mib + 512 MiB, or 256 MiB."""
    waiting = page_reporting().get("max_waiting_mib")
    return (waiting + 512) * MIB if isinstance(waiting, int) else 256 * MIB


def measure(directory: str, size: int | None = None, idle: float = 5.0) -> dict:
    """The three cases (see the module doc) in ms per MiB, measured in files
    under `directory` (removed afterwards)."""
    size = max(MIB, (size or default_size()) // MIB * MIB)
    chunk = memoryview(os.urandom(MIB))
    a, b, c, d = (os.path.join(directory, f".first-touch-{n}-{os.getpid()}") for n in "abcd")
    res = {"size_mib": size // MIB, "idle_s": idle}
    try:
        _fill(a, size, chunk, create=True)
        res["cached"] = _fill(a, size, chunk, create=False)
        os.unlink(a)
        res["recycled"] = _fill(b, size, chunk, create=True)
        os.unlink(b)
        before = reported_kib()
        time.sleep(idle)
        after = reported_kib()
        if before is not None and after is not None:
            res["reported_mib_while_idle"] = (after - before) // 1024
        res["idle"] = _fill(c, size, chunk, create=True)
        os.unlink(c)
        time.sleep(idle)
        res["idle_pieces"] = _fill(d, size, chunk, create=True, piece=WRITE_PIECE)
        res["piece_kib"] = WRITE_PIECE >> 10
    finally:
        for p in (a, b, c, d):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    for k in CASES:
        sys_ms, wall_ms = res[k]
        res[k] = {"sys_ms_per_mib": round(sys_ms * 1000, 3), "wall_ms_per_mib": round(wall_ms * 1000, 3)}
    res["page_reporting"] = page_reporting()
    return res


def budget(directory: str, files: int = 10, file_mib: int = 512) -> list[dict]:
    """How much new page cache the machine gives cheaply: write `files` new
    files of `file_mib` MiB one after another, in WRITE_PIECE pieces, each
    fsynced and kept (as a benchmark's live images are), then remove them.
    One dict per file: its write rate and system ms per MiB.  On a VM whose
    host backs only part of its memory cheaply the cost jumps once the files
    pass that part (measured 2026-12-06 here: 0.25-0.37 ms/MiB for the
    first 3.5-4.5 GiB, then 2.2-5.6, with or without 10 s between files,
    with 23 GiB free in the guest)."""
    chunk = memoryview(os.urandom(MIB))
    paths, out = [], []
    try:
        for k in range(files):
            path = os.path.join(directory, f".first-touch-budget-{k}-{os.getpid()}")
            paths.append(path)
            sys_s, wall = _fill(path, file_mib * MIB, chunk, create=True, piece=WRITE_PIECE, sync=True)
            out.append({"written_mib": (k + 1) * file_mib, "mib_per_s": round(1 / wall),
                        "sys_ms_per_mib": round(sys_s * 1000, 3)})
    finally:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=".", help="directory on the file system to measure (default .)")
    ap.add_argument("--size", help="bytes per file (default: max_waiting_mib + 512M with free page "
                    "reporting, else 256M)")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds memory stays free before 'idle' (default 5)")
    ap.add_argument("--budget", type=int, metavar="FILES", help="instead: write FILES new 512 MiB files one "
                    "after another, kept until the end, and print each one's cost (how much new page cache "
                    "the machine gives cheaply)")
    args = ap.parse_args()
    if args.budget:
        for row in budget(args.dir, args.budget):
            print(f"{row['written_mib']:6} MiB written: {row['mib_per_s']:5} MiB/s, "
                  f"{row['sys_ms_per_mib']:.2f} ms/MiB system")
        return 0
    r = measure(args.dir, parse_size(args.size) if args.size else None, args.idle)
    print(f"{'case':10} {'sys ms/MiB':>10} {'wall ms/MiB':>11}")
    for k in CASES:
        print(f"{k:10} {r[k]['sys_ms_per_mib']:10.3f} {r[k]['wall_ms_per_mib']:11.3f}")
    pr = r["page_reporting"]
    print(f"({r['size_mib']} MiB per file, {r['idle_s']:g} s idle)")
    print("free page reporting: " + (", ".join(f"{k}={v}" for k, v in pr.items()) if pr else "not in this kernel"))
    if "reported_mib_while_idle" in r:
        print(f"reported to the host during the idle wait: {r['reported_mib_while_idle']} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
