#!/usr/bin/env python3
"""repdisk benchmark: a plain file, QEMU's own block replication and repdisk, in one run.

Sections (run all, or pick with --only, comma separated or repeated):
  fio         seq write 1 MiB / rand write 4 KiB QD1 / rand read 4 KiB QD1 / rand write
              4 KiB x4 jobs, each O_DIRECT and buffered, on every target
  checkpoint  checkpoint latency after 16/64/256 MiB of random 4 KiB primary writes
              (+ 1/16 as many secondary writes), hidden-overlay bytes per primary byte,
              secondary failover (commit) time
  sync        repdisk's initial sync of an image with random data and holes, next to
              nbdcopy of the same image into the same kind of secondary
  nodes       start-up time and RSS of each node, idle with a 1 TiB sparse disk and after
              random writes
Every figure is the median of --reps repetitions (>= 3) with the spread (min-max).
Results: a table on stdout, bench-results/bench-<time>.json and .png.
--perf DIR also samples the whole machine (perf, cpu-clock) during every fio job
and says where the time went: idle share and top symbols (tools/benchlib/profile.py).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import signal
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import first_touch  # noqa: E402
from benchlib import profile, report  # noqa: E402
from benchlib.fio import CHECKPOINT_PERIOD, DESCRIPTION, IS_WRITE, WORKLOADS, job_options, run_fio, write_random  # noqa: E402
from benchlib.targets import REPO, PassthroughTarget, PlainPairTarget, PlainTarget, QemuPair, RepdiskPair  # noqa: E402
from repdisk.core.image import cachestat  # noqa: E402
from benchlib.util import (GiB, MiB, TiB, BenchError, cmd_version, dump_json, log,  # noqa: E402
                           copy_image, cpu_seconds, make_filled_image, make_random_image,
                           remove_tree, rss_bytes)

SECTIONS = ("fio", "checkpoint", "sync", "nodes")
ALIASES = {"rss": "nodes", "startup": "nodes", "failover": "checkpoint", "hidden": "checkpoint"}


class Config:
    def __init__(self, quick: bool, reps: int | None):
        self.quick = quick
        self.reps = reps or 3
        if quick:
            self.fio_size = 256 * MiB      # disk size and fio region
            self.runtime = 3               # seconds per time-based fio run
            self.ckpt_size = 2 * GiB
            self.ckpt_amounts = [16 * MiB, 64 * MiB, 256 * MiB]
            self.failover_amount = 64 * MiB
            self.sync_size = 512 * MiB
            self.sync_transports = ["unix"]
            self.rss_write = 128 * MiB
            self.fio_targets = ["plain", "plain-pair", "py-floor", "qemu-pri", "qemu-sec", "rd-sync-tcp", "rd-async-tcp",
                                "rd-sec"]
            self.ckpt_systems = ["qemu", "rd-sync", "rd-async"]
        else:
            self.fio_size = 512 * MiB
            self.runtime = 10
            self.ckpt_size = 4 * GiB
            self.ckpt_amounts = [16 * MiB, 64 * MiB, 256 * MiB]
            self.failover_amount = 256 * MiB
            self.sync_size = 1 * GiB
            self.sync_transports = ["unix", "tcp"]
            self.rss_write = 1 * GiB
            self.fio_targets = ["plain", "plain-pair", "py-floor", "qemu-pri", "qemu-sec", "rd-sync-unix", "rd-async-unix",
                                "rd-sync-tcp", "rd-async-tcp", "rd-sync-unix-norf", "rd-sec"]
            self.ckpt_systems = ["qemu", "rd-sync", "rd-async"]
        self.rss_disk = 1 * TiB
        self.fio_workloads = list(WORKLOADS)
        self.perf_dir = None  # --perf: a system-wide perf profile of every fio job
        self.release_pages = True  # --no-release-pages turns it off (_release_pages)
        self.read_cache = "warm"  # --read-cache (_prepare_read_cache)

    def as_dict(self):
        return {k: v for k, v in vars(self).items()}


# Every pair/target started goes through here so that a failure or a signal anywhere
# still stops every process and unmounts every mount.
_LIVE: list = []


@contextlib.contextmanager
def running(target):
    _LIVE.append(target)
    try:
        yield target
    finally:
        try:
            target.stop()
        finally:
            _LIVE.remove(target)


def stop_all():
    while _LIVE:
        t = _LIVE.pop()
        try:
            t.stop()
        except Exception as e:  # keep stopping the others
            log(f"error stopping {t}: {e}")


TARGET_LABEL = {
    "plain": "plain file", "plain-pair": PlainPairTarget.label, "py-floor": "pyfuse3 passthrough", "qemu-pri": "QEMU primary", "qemu-sec": "QEMU secondary view",
    "rd-sync-unix": "repdisk sync unix", "rd-async-unix": "repdisk async unix",
    "rd-sync-tcp": "repdisk sync tcp", "rd-async-tcp": "repdisk async tcp",
    "rd-sync-unix-norf": "repdisk sync unix, rf off",
    "rd-sec": "repdisk secondary view",
    # --direct-writes on (not in the default lists: a comparison, like -norf)
    "rd-sync-unix-dw": "repdisk sync unix, dw on", "rd-sec-dw": "repdisk view, dw on",
    # an async primary with --write-behind off (its default is 8M): a comparison too
    "rd-async-unix-nowb": "repdisk async unix, wb off",
}


def section_fio(cfg: Config, work: str, res: dict, have_repdisk: bool):
    """Each repetition starts every target at once (an idle target costs no
    CPU), then runs each job on all of them back to back, in an order rotated
    per repetition (so that each target is measured early, midway and late).  So repdisk and QEMU are measured seconds apart rather
    than minutes, and the drift of this machine's outside load (rates move
    20-50% over minutes) hits them alike.  Each target still sees the jobs in
    the same order (direct, then buffered; WORKLOADS order; --workloads may
    pick some)."""
    out = res.setdefault("fio", {"targets": {}, "labels": TARGET_LABEL})
    targets = [t for t in cfg.fio_targets if have_repdisk or not t.startswith("rd-")]
    for rep in range(cfg.reps):
        live = {}
        with contextlib.ExitStack() as stack:
            for key in targets:
                d = os.path.join(work, f"fio-{key}-{rep}")
                stack.callback(remove_tree, d)
                log(f"fio rep {rep + 1}/{cfg.reps}: starting {TARGET_LABEL[key]}")
                try:
                    t, path = _start_fio_target(key, d, cfg.fio_size)
                except Exception as e:
                    log(f"  cannot start {key}: {e}")
                    tres = out["targets"].setdefault(key, {})
                    for io in ("direct", "buffered"):
                        for wl in cfg.fio_workloads:
                            tres.setdefault(io, {}).setdefault(wl, {"runs": [], "errors": []})[
                                "errors"].append(f"start failed: {e}")
                    continue
                stack.enter_context(running(t))
                t.bench_dir = d  # where all its files are (--release-pages)
                live[key] = (t, path)
            # Rotate by a third (for 3 repetitions) of the list, not by one: each
            # target then runs early, midway and late once.  Position seems to
            # matter for the 512 MiB jobs: in bench-20261127-110005 (rotated by
            # one) the three targets that ran last in every repetition spent
            # 2-3x the system time per MiB of the others on the 1 MiB direct
            # job, while alone the view, one of them, matched the floor.
            step = max(1, len(targets) // cfg.reps)
            order = [targets[(i + rep * step) % len(targets)] for i in range(len(targets))]
            for io in ("direct", "buffered"):
                for wl in cfg.fio_workloads:
                    log(f"fio rep {rep + 1}/{cfg.reps}: {DESCRIPTION[wl]}, {io}")
                    for key in order:
                        if key in live and _runs_on(key, live[key][0], wl):
                            _fio_job(cfg, out["targets"].setdefault(key, {}), key, *live[key], io, wl,
                                     everyone=[t for t, _ in live.values()])


def _is_view(key: str) -> bool:
    """A target whose fio file is a pair's secondary view."""
    return key.startswith("rd-sec") or key == "qemu-sec"


def _runs_on(key: str, t, wl: str) -> bool:
    """Whether workload `wl` is a job for target `key`: a checkpointed one
    only on a pair (the primary's guest, or the secondary's on the view;
    each checkpoint drops what the secondary's guest wrote)."""
    if wl in CHECKPOINT_PERIOD:
        return hasattr(t, "checkpoint")
    return wl in getattr(t, "workloads", WORKLOADS)


def _fio_job(cfg: Config, tres: dict, key: str, t, path: str, io: str, wl: str, everyone: list) -> None:
    """One fio job on one target, recorded (or its error) in tres[io][wl].
    `everyone`: all targets running now, quiesced first."""
    cell = tres.setdefault(io, {}).setdefault(wl, {"runs": [], "errors": []})
    try:
        for p in getattr(t, "procs", {}).values():
            p.check_alive()
        _quiesce(everyone)
        # A read job starts from one page-cache state (--read-cache), the same for every target.
        prepared = cfg.read_cache if not IS_WRITE[wl] and cfg.read_cache != "left" and hasattr(t, "bench_dir") else None
        restore = _prepare_read_cache(t.bench_dir, prepared) if prepared else None
        cached = _cache_census(t.bench_dir) if hasattr(t, "bench_dir") else {}
        recording = None
        if cfg.perf_dir:
            rep = len(cell["runs"]) + len(cell["errors"]) + 1
            recording = profile.Recording(os.path.join(cfg.perf_dir, f"rep{rep}-{wl}-{io}-{key}.data"))
        cpu0 = _cpu_of(t)
        options = job_options(wl, cfg.fio_size, cfg.runtime)
        if prepared == "warm":
            options["invalidate"] = 0  # fio's default drops a plain file's pages first
        try:
            if isinstance(t, PlainPairTarget):  # buffered in both rows, as a pair writes its images
                r = run_fio(None, t.fio_options(options), direct=False)
                r["mibs"] /= t.files  # per file: what each node wrote, as a pair's figures are
                r["iops"] /= t.files
            elif wl in CHECKPOINT_PERIOD:
                t.checkpoint()  # the job starts from empty overlays, as after any checkpoint
                r = run_fio(path, options, direct=(io == "direct"), checkpoint=t.checkpoint,
                            period=CHECKPOINT_PERIOD[wl])
            else:
                r = run_fio(path, options, direct=(io == "direct"))
            r["daemon_cpu_s"] = _cpu_delta(cpu0, _cpu_of(t))
            r["cached_mib_at_start"] = cached
            if prepared is not None:
                r["read_cache"] = prepared
        finally:
            if recording is not None:
                recording.stop()
            if restore is not None:
                _restore_read_cache(restore)
        cell["runs"].append(r)
        log(f"  {TARGET_LABEL[key]:24} {r['mibs']:8.1f} MiB/s {r['iops']:9.0f} IOPS "
            f"p50 {r['p50_us']:7.1f} us p99 {r['p99_us']:8.1f} us")
        if "checkpoints" in r:
            log(f"  {'':24} {report.checkpoint_note([r])}")
        if cached and not IS_WRITE[wl]:
            log(f"  {'':24} cached at start: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in sorted(cached.items())))
        if cfg.release_pages and wl == "seqwrite":
            _quiesce([t])  # async mode: what it still sends lands before the release
            r["released_mib"] = _release_pages(t.bench_dir)
        if recording is not None:
            try:
                r["perf"] = profile.summarize(recording.path)
                log(f"  {'':24} perf: {profile.one_line(r['perf'])}")
            except BenchError as e:  # the measurement stands without its profile
                log(f"  {'':24} perf: no summary: {e}")
    except BenchError as e:
        cell["errors"].append(str(e))
        log(f"  {TARGET_LABEL[key]:24} n/a: {e}")


def _quiesce(targets: list) -> None:
    """Start every fio job from a quiet machine: no target still replicating
    what an earlier job wrote (repdisk's async mode may hold up to
    --async-queue unsent when a time-based job ends, and the target measured
    next is another one), no dirty page cache left for writeback to flush
    during the job.  Each job is then charged for its own work only, in time
    and in CPU."""
    for t in targets:
        if hasattr(t, "quiesce"):
            t0 = time.monotonic()
            t.quiesce()
            if time.monotonic() - t0 > 0.05:
                log(f"  waited {time.monotonic() - t0:.2f} s for {t} to finish replicating")
    _settle_writeback()


def _release_pages(directory: str) -> int:
    """Drop the clean page cache of every file under `directory` (after a
    sync); returns by how many MiB the machine's page cache shrank.  --release-pages
    does it after each 1 MiB job: this machine gives some 3.5 GiB of new
    page cache cheaply and then charges ~10x per page while it is held
    (tools/first_touch.py --budget), so without it the targets that run
    after the first few in a repetition pay that price for their
    first-touch writes, and with it each job starts from the same state.
    The later rows then find these images uncached, on every target alike."""
    _settle_writeback()  # dirty pages would stay
    before = _page_cache_mib()
    for _, fd in _image_files(directory):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return before - _page_cache_mib()


def _prepare_read_cache(directory: str, how: str):
    """Put the page cache of a target's files into one state before a read
    job, the same for every target: "cold" (none cached) or "warm" (the data
    of every file cached).  Left as the write job before it left it
    (--read-cache left), a read job measured that job's footprint: its
    rate is its hit rate, and a faster writer read faster
    (bench-20261207-031758: 108-146 MiB of 512 cached under a sync pair,
    117-133 under QEMU, 243-280 under the passthrough).  Cold, every read is
    a disk read, and the disk's latency moved a target's p50 between
    repetitions more than any difference between systems
    (bench-20261207-032955: 91-169 us for the sync unix primary, direct;
    175-399 for sync TCP, buffered).  Warm (the default) measures what each
    system adds to a read.  Returns what _restore_read_cache needs to give
    the jobs after it the page cache they would have found without the
    warming: for warm, the 64 KiB chunks of each file that held no page."""
    if how == "cold":
        _release_pages(directory)
        return None
    uncached = {}
    buf = bytearray(MiB)
    for path, fd in _image_files(directory):
        uncached[path] = _uncached_chunks(fd, os.fstat(fd).st_size)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for start, end in _data_extents(fd):
            pos = start
            while pos < end and (n := os.preadv(fd, [memoryview(buf)[: min(MiB, end - pos)]], pos)):
                pos += n
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)
    return uncached


_CHUNK = 64 << 10  # the grain at which _restore_read_cache puts the page cache back
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _uncached_chunks(fd: int, size: int) -> list:
    """[start, end) runs of _CHUNK-sized pieces of the file that hold no page.
    A file cached in full or not at all (the usual cases: released after
    its 1 MiB job, or read in) takes one cachestat, not one per chunk."""
    got = cachestat(fd, 0, 0)
    if got is None or got[0] >= (size + _PAGE - 1) // _PAGE:
        return []
    if got[0] == 0:
        return [[0, size]] if size else []
    empty = []
    for pos in range(0, size, _CHUNK):
        if cachestat(fd, pos, _CHUNK)[0] == 0:
            if empty and empty[-1][1] == pos:
                empty[-1][1] = pos + _CHUNK
            else:
                empty.append([pos, pos + _CHUNK])
    return empty


def _restore_read_cache(uncached: dict) -> None:
    """Drop again the chunks that held no page before the warming, so the
    next jobs start from about the page cache they would have found (the
    read job's own hits added nothing; what its chunks had in part stays)."""
    for path, empty in uncached.items():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            for start, end in empty:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _data_extents(fd: int):
    """(start, end) of each data extent of a file: its holes are not read
    (no system reads an overlay's holes, and reading them would cache as
    many zero pages: 1 GiB more per repdisk pair, whose two empty overlays
    are the disk's size)."""
    end = os.fstat(fd).st_size
    pos = 0
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        pos = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, pos


def _cache_census(directory: str) -> dict:
    """name (relative to `directory`) -> MiB of it in the page cache, for
    every regular file of at least 1 MiB under `directory`.  Recorded at the
    start of each fio job: a 4 KiB read job's rate depends on how much of
    the image is cached (a hit takes ~30 us, a miss ~100 on this disk), and
    that comes from the jobs before it."""
    out = {}
    for path, fd in _image_files(directory):
        st = os.fstat(fd)
        if st.st_size < MiB:
            continue
        try:
            got = cachestat(fd, 0, 0)
        except OSError:
            got = None
        if got is not None:
            out[os.path.relpath(path, directory)] = round(got[0] * _PAGE / MiB, 1)
    return out


def _image_files(directory: str):
    """Yield (path, open read-only descriptor) of each regular file under
    `directory`, past FUSE mounts; the descriptor is closed on the next step."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = [x for x in dirs if not os.path.ismount(os.path.join(root, x))]  # FUSE mounts: not files
        for name in files:
            path = os.path.join(root, name)
            if os.path.ismount(path):  # QEMU's FUSE export mounts on a file
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # sockets, vanished files
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    yield path, fd
            finally:
                os.close(fd)


def _page_cache_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) >> 10
    return 0


def _cpu_of(target) -> dict:
    """role -> (user, system) CPU seconds so far of each process of a target."""
    return {role: cpu_seconds(p.pid) for role, p in getattr(target, "procs", {}).items()}


def _cpu_delta(before: dict, after: dict) -> dict:
    """role -> [user, system] CPU seconds spent between two _cpu_of snapshots."""
    return {role: [after[role][0] - b[0], after[role][1] - b[1]]
            for role, b in before.items() if b is not None and after.get(role) is not None}


def _start_fio_target(key, d, size):
    holder = []
    try:
        if key == "plain":
            t = PlainTarget(d, size)
            return t, t.path
        if key == "plain-pair":
            return PlainPairTarget(d, size), None
        if key == "py-floor":
            t = PassthroughTarget(d, size)
        elif key.startswith("qemu"):
            t = QemuPair(d, size)
        elif key in ("rd-sec", "rd-sec-dw"):
            dw = ["--direct-writes", "on"] if key.endswith("-dw") else []
            t = RepdiskPair(d, size, mode="sync", transport="unix", extra_primary=dw, extra_secondary=dw)
        else:
            # rd-<mode>-<transport>[-norf|-dw|-nowb]; -norf: the activity log path, measured
            # next to replica first in the same run; -dw: --direct-writes on;
            # -nowb: --write-behind off on the primary
            _, mode, transport, *rest = key.split("-")
            extra = {"norf": ["--replica-first", "off"], "dw": ["--direct-writes", "on"],
                     "nowb": ["--write-behind", "off"]}.get("".join(rest), [])
            t = RepdiskPair(d, size, mode=mode, transport=transport, extra_primary=extra)
        holder.append(t)
        _LIVE.append(t)
        t.start()
        _LIVE.remove(t)
        if key == "py-floor":
            return t, t.path
        return t, (t.sec_view if _is_view(key) else t.pri_view)
    except BaseException:
        for t in holder:
            if t in _LIVE:
                _LIVE.remove(t)
            t.stop()
        raise


def _make_pair(system: str, d: str, size: int, disks: tuple[str, str]):
    if system == "qemu":
        return QemuPair(d, size, disks=disks)
    mode = system.split("-")[1]
    return RepdiskPair(d, size, mode=mode, transport="unix", disks=disks)


def section_checkpoint(cfg: Config, work: str, res: dict, have_repdisk: bool):
    out = res.setdefault("checkpoint", {"amounts": cfg.ckpt_amounts,
                                        "failover_amount": cfg.failover_amount,
                                        "disk_size": cfg.ckpt_size, "systems": {}})
    systems = [s for s in cfg.ckpt_systems if have_repdisk or s == "qemu"]
    # One pair of fully written images, used in place by every pair in turn: what the
    # primary overwrites on the replica is data that copy-before-write must keep.  The
    # images need not stay identical for these timings (each pair starts --assume-synced).
    disks = (os.path.join(work, "ckpt-pri.img"), os.path.join(work, "ckpt-sec.img"))
    log(f"checkpoint: writing two {cfg.ckpt_size // MiB} MiB images full of data")
    make_filled_image(disks[0], cfg.ckpt_size)
    copy_image(disks[0], disks[1])
    for rep in range(cfg.reps):
        for system in systems:
            sres = out["systems"].setdefault(system, {"rounds": {}, "failover": [], "errors": []})
            d = os.path.join(work, f"ckpt-{system}-{rep}")
            log(f"checkpoint rep {rep + 1}/{cfg.reps}: {system}")
            pair = _make_pair(system, d, cfg.ckpt_size, disks)
            try:
                with running(pair):
                    pair.start()
                    for i, amount in enumerate(cfg.ckpt_amounts):
                        w = _write_both(pair, amount, cfg.ckpt_size, seed=rep * 100 + i)
                        hidden = pair.hidden_bytes()
                        overlays = pair.overlay_bytes()
                        tp, ts = pair.checkpoint()
                        row = {"amount": amount, "total_s": tp + ts, "primary_s": tp,
                               "secondary_s": ts, "hidden_bytes": hidden,
                               "hidden_per_byte": hidden / amount, "overlays": overlays,
                               "write_iops": w}
                        sres["rounds"].setdefault(str(amount), []).append(row)
                        log(f"  {amount // MiB:4} MiB: checkpoint {1000 * (tp + ts):8.2f} ms "
                            f"(pri {1000 * tp:.2f} + sec {1000 * ts:.2f}), hidden "
                            f"{hidden / MiB:.1f} MiB = {hidden / amount:.2f}x, writes {w:.0f} IOPS")
                    amount = cfg.failover_amount
                    _write_both(pair, amount, cfg.ckpt_size, seed=rep * 100 + 50)
                    hidden = pair.hidden_bytes()
                    pair.stop_primary()
                    fo = pair.failover()
                    sres["failover"].append({"amount": amount, "seconds": fo,
                                             "command_s": pair.failover_command_s,
                                             "hidden_bytes": hidden})
                    log(f"  failover after {amount // MiB} MiB: {1000 * fo:.1f} ms until standalone, "
                        f"command returned after {1000 * (pair.failover_command_s or 0):.1f} ms "
                        f"(hidden {hidden / MiB:.1f} MiB)")
            except (BenchError, OSError) as e:
                sres["errors"].append(str(e))
                log(f"  {system}: error: {e}")
            remove_tree(d)


def _write_both(pair, amount: int, region: int, seed: int) -> float:
    """`amount` of distinct random 4 KiB primary writes + amount/16 on the secondary view."""
    r = write_random(pair.pri_view, amount, region, jobs=2, seed=seed)
    write_random(pair.sec_view, max(amount // 16, 2 * 4096), region, jobs=1, seed=seed + 7)
    return r["iops"]


def section_sync(cfg: Config, work: str, res: dict, have_repdisk: bool):
    out = res.setdefault("sync", {"size": cfg.sync_size, "runs": {}, "errors": []})
    img = os.path.join(work, "sync-base.img")
    data = make_random_image(img, cfg.sync_size, chunk=1 * MiB, data_every=2, seed=7)
    out["data_bytes"] = data
    log(f"sync: image {cfg.sync_size // MiB} MiB, {data // MiB} MiB data, the rest holes")
    for rep in range(cfg.reps):
        if have_repdisk:
            for transport in cfg.sync_transports:
                key = f"repdisk-{transport}"
                d = os.path.join(work, f"sync-{key}-{rep}")
                pair = RepdiskPair(d, cfg.sync_size, mode="sync", transport=transport,
                                   image=img, sec_image="", assume_synced=False)
                try:
                    with running(pair):
                        pair.prepare()
                        pair.start_secondary()
                        _settle_writeback()
                        t0 = time.monotonic()
                        pair.start_primary(wait_replicating=False)
                        t1 = time.monotonic()
                        st = pair.wait_state("primary", "replicating", timeout=600)
                        t2 = time.monotonic()
                        # The figure is the sync itself as the node timed it (from
                        # connecting to the last byte acknowledged), not the
                        # process start-up, which the "nodes" section measures.
                        synced = (st.get("sync") or {}).get("seconds")
                        row = {"seconds": synced if synced else t2 - t0, "seconds_wall": t2 - t0,
                               "seconds_after_control": t2 - t1, "status_sync": st.get("sync")}
                        if rep == 0:
                            pair.stop()
                            row["identical"] = _same_file(pair.pri_disk, pair.sec_disk)
                    out["runs"].setdefault(key, []).append(row)
                    log(f"  {key}: {row['seconds']:.2f} s "
                        f"({cfg.sync_size / MiB / row['seconds']:.0f} MiB/s)"
                        + (f", images identical: {row['identical']}" if "identical" in row else ""))
                except (BenchError, OSError) as e:
                    out["errors"].append(f"{key}: {e}")
                    log(f"  {key}: error: {e}")
                remove_tree(d)
                key = f"nbdcopy-repdisk-{transport}"
                d = os.path.join(work, f"sync-{key}-{rep}")
                _nbdcopy_run(cfg, out, key, d, img, RepdiskPair(d, cfg.sync_size, transport=transport),
                             lambda pair: pair.uri)
        key = "nbdcopy-qemu"
        d = os.path.join(work, f"sync-{key}-{rep}")
        _nbdcopy_run(cfg, out, key, d, img, QemuPair(d, cfg.sync_size), lambda q: q.nbd_uri())


def _nbdcopy_run(cfg: Config, out: dict, key: str, d: str, img: str, pair, uri_of) -> None:
    """One `nbdcopy` of the sync row's image into a started secondary
    (repdisk's or QEMU's): the transport's limit, recorded under `key`."""
    try:
        with running(pair):
            pair.prepare()
            pair.start_secondary()
            _settle_writeback()
            secs = _nbdcopy(img, uri_of(pair))
        out["runs"].setdefault(key, []).append({"seconds": secs})
        log(f"  {key}: {secs:.2f} s ({cfg.sync_size / MiB / secs:.0f} MiB/s)")
    except (BenchError, OSError) as e:
        out["errors"].append(f"{key}: {e}")
        log(f"  {key}: error: {e}")
    remove_tree(d)


def _settle_writeback() -> None:
    """Each sync run writes a whole image through the page cache: flush what
    earlier runs and sections left dirty, so that no run pays for another's
    writeback (a full run once saw one repetition drop to a third of the
    others' rate)."""
    os.sync()


def _nbdcopy(src: str, uri: str) -> float:
    t0 = time.monotonic()
    r = subprocess.run(["nbdcopy", "--flush", src, uri], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        raise BenchError(f"nbdcopy failed: {r.stderr.strip()[-300:]}")
    return time.monotonic() - t0


def _same_file(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


# 1 GiB of random 4 KiB writes over a 1 TiB disk: every write may touch a new
# activity-log extent, so this is the slowest write the bench asks for
NODES_WRITE_TIMEOUT = 1800


def section_nodes(cfg: Config, work: str, res: dict, have_repdisk: bool):
    out = res.setdefault("nodes", {"disk_size": cfg.rss_disk, "write": cfg.rss_write,
                                   "systems": {}})
    systems = (["repdisk"] if have_repdisk else []) + ["qemu"]
    for rep in range(cfg.reps):
        for system in systems:
            sres = out["systems"].setdefault(system, {"runs": [], "errors": []})
            d = os.path.join(work, f"nodes-{system}-{rep}")
            log(f"nodes rep {rep + 1}/{cfg.reps}: {system} with a 1 TiB sparse disk")
            pair = (RepdiskPair(d, cfg.rss_disk, mode="sync", transport="unix")
                    if system == "repdisk" else QemuPair(d, cfg.rss_disk))
            try:
                with running(pair):
                    pair.prepare()
                    pair.start(prepare=False)
                    time.sleep(1.0)
                    pids = pair.pids
                    idle = {role: rss_bytes(pid) for role, pid in pids.items()}
                    # start-up and idle RSS stand even if the write phase fails
                    row = {"startup": dict(pair.startup), "rss_idle": idle}
                    sres["runs"].append(row)
                    log(f"  startup {_fmt_d(pair.startup, 's')}; RSS idle {_fmt_d(idle, 'MiB')}")
                    w = write_random(pair.pri_view, cfg.rss_write, cfg.rss_disk, jobs=2,
                                     timeout=NODES_WRITE_TIMEOUT)
                    time.sleep(0.5)
                    after = {role: rss_bytes(pid) for role, pid in pids.items()}
                    row.update(rss_after_writes=after, write_iops=w["iops"])
                    log(f"  after {cfg.rss_write // MiB} MiB random writes {_fmt_d(after, 'MiB')} "
                        f"({w['iops']:.0f} IOPS)")
                    if system == "repdisk":
                        # what the flush protocol did meanwhile: a failed local
                        # fsync (repaired or not) changes what this row measures
                        ps = pair.status("primary")
                        rf = ps["replica_first"]
                        row["flushes"] = {k: rf.get(k) for k in ("flushes", "repairs", "flush_broken", "repair")}
                        # and whether the link held: a write only marked for a
                        # resync makes a repair impossible until the next flush
                        row["flushes"].update(state=ps["state"], writes_marked_dirty=ps["writes_marked_dirty"],
                                              reconnect=ps.get("reconnect"))
                        if ps["writes_marked_dirty"]:  # why, before the work dir goes
                            with open(pair.procs["primary"].logpath, errors="replace") as f:
                                row["flushes"]["link_lost"] = report.link_losses(f.read())
                        log(f"  primary: {report.flush_note([row])}")
                        if rf.get("flush_broken"):  # what led there, before the work dir goes
                            row["flushes"]["primary_log"] = pair.procs["primary"].tail(30)
                            log(f"  primary log: {row['flushes']['primary_log']}")
            except (BenchError, OSError) as e:
                sres["errors"].append(str(e))
                log(f"  {system}: error: {e}")
                for name, proc in pair.procs.items():
                    log(f"  {name} log: {proc.tail(12)}")  # before the work dir goes
            remove_tree(d)


def _fmt_d(d: dict, unit: str) -> str:
    if unit == "MiB":
        return ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in d.items())
    return ", ".join(f"{k} {v:.3f} s" for k, v in d.items())


def repdisk_available() -> tuple[bool, str]:
    try:
        r = subprocess.run([sys.executable, "-m", "repdisk", "primary", "--help"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    if r.returncode != 0:
        return False, (r.stderr.strip().splitlines() or ["?"])[-1]
    try:
        import repdisk.node.primary  # noqa: F401
        import repdisk.node.secondary  # noqa: F401
    except Exception as e:
        return False, f"repdisk nodes not importable: {e}"
    return True, ""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller sizes, shorter fio runs, fewer targets (about 5-10 minutes)")
    ap.add_argument("--only", action="append", default=[], metavar="SECTION",
                    help=f"run only these sections: {', '.join(SECTIONS)} (repeat or comma-separate)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 3)")
    ap.add_argument("--targets", default=None,
                    help="fio targets, comma separated (default per mode): "
                         + ",".join(TARGET_LABEL))
    ap.add_argument("--workloads", default=None,
                    help="fio workloads, comma separated (default all): " + ",".join(WORKLOADS))
    ap.add_argument("--no-repdisk", action="store_true", help="measure only the plain file and QEMU")
    ap.add_argument("--out", default=os.path.join(REPO, "bench-results"), help="results directory")
    ap.add_argument("--keep-work", action="store_true", help="keep the work directory (debugging)")
    ap.add_argument("--perf", metavar="DIR", default=None,
                    help="record a system-wide perf profile (cpu-clock, call graphs) of every fio job "
                         "into DIR and summarize it in the log and the JSON (idle share, top symbols); "
                         "sampling costs a little, so keep such runs out of the table of record")
    ap.add_argument("--release-pages", action=argparse.BooleanOptionalAction, default=True,
                    help="after each 1 MiB job, drop the target's images from the page cache, so that "
                         "every target's first-touch job starts from the same memory (see _release_pages). "
                         "On by default; --no-release-pages measures the old way, where a target's 1 MiB "
                         "figure depends on its place in the order")
    ap.add_argument("--read-cache", choices=("warm", "cold", "left"), default="warm",
                    help="the page cache of a target's files when a 4 KiB read job starts: warm (their "
                         "data read in first, holes skipped, and afterwards the page cache put back as "
                         "the job before left it; the default: the figure is what each system adds to a read), "
                         "cold (dropped: every read goes to the disk) or left (as the write job before "
                         "it left it: the figure then follows that job's rate); see _prepare_read_cache")
    return ap


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)

    sections = []
    for item in args.only:
        for s in item.split(","):
            s = ALIASES.get(s.strip(), s.strip())
            if s not in SECTIONS:
                ap.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
            if s not in sections:
                sections.append(s)
    sections = [s for s in SECTIONS if s in sections] or list(SECTIONS)
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be >= 1")
    cfg = Config(args.quick, args.reps)
    if args.perf:
        why = profile.available()
        if why:
            ap.error(f"--perf: {why}")
        os.makedirs(args.perf, exist_ok=True)
        cfg.perf_dir = os.path.abspath(args.perf)
    cfg.release_pages = args.release_pages
    cfg.read_cache = args.read_cache

    def pick(text, allowed, what):
        picked = [x.strip() for x in text.split(",")]
        bad = [x for x in picked if x not in allowed]
        if bad:
            ap.error(f"unknown {what}(s) {bad}; choose from {', '.join(allowed)}")
        return picked

    if args.targets:
        cfg.fio_targets = pick(args.targets, list(TARGET_LABEL), "target")
    if args.workloads:
        picked = pick(args.workloads, WORKLOADS, "workload")
        cfg.fio_workloads = [w for w in WORKLOADS if w in picked]

    have_repdisk, why = (False, "--no-repdisk") if args.no_repdisk else repdisk_available()
    if not have_repdisk:
        log(f"repdisk nodes not available ({why}): measuring the plain file and QEMU only")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(args.out, f"bench-{stamp}{'-quick' if args.quick else ''}.json")
    res = {"meta": {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick, "sections": sections, "config": cfg.as_dict(),
        "repdisk": have_repdisk, "repdisk_unavailable_reason": why or None,
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "git": subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                              capture_output=True, text=True).stdout.strip(),
        "qemu": cmd_version(["qemu-system-x86_64", "--version"]),
        "fio": cmd_version(["fio", "--version"]),
        "nbdcopy": cmd_version(["nbdcopy", "--version"]),
    }}
    work = tempfile.mkdtemp(prefix="work-", dir=args.out)  # same filesystem as the repo
    # The first-touch rows (1 MiB writes into fresh images) are bounded by what
    # this machine charges for new page-cache pages; record it with the run.
    # Informational: a probe that cannot run (a full disk) costs the run nothing.
    log("measuring the page cache's first-touch cost (tools/first_touch.py)")
    try:
        res["meta"]["first_touch"] = first_touch.measure(work)
        log(report.first_touch_line(res["meta"]["first_touch"]))
    except OSError as e:
        log(f"  first-touch probe skipped: {e}")
    reported0 = first_touch.reported_kib()
    log(f"work dir {work}; sections {', '.join(sections)}; {'quick' if args.quick else 'full'} mode, "
        f"{cfg.reps} reps")

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    funcs = {"fio": section_fio, "checkpoint": section_checkpoint, "sync": section_sync,
             "nodes": section_nodes}
    t0 = time.monotonic()
    interrupted = False
    try:
        for s in sections:
            ts = time.monotonic()
            funcs[s](cfg, work, res, have_repdisk)
            res["meta"].setdefault("section_seconds", {})[s] = round(time.monotonic() - ts, 1)
            dump_json(json_path, res)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything, reporting what was measured")
    finally:
        stop_all()
        if not args.keep_work:
            remove_tree(work)
    res["meta"]["seconds"] = round(time.monotonic() - t0, 1)
    reported1 = first_touch.reported_kib()
    if reported0 is not None and reported1 is not None:
        res["meta"]["reported_mib"] = (reported1 - reported0) // 1024
    res["meta"]["interrupted"] = interrupted
    summary = report.summarize_all(res)
    res["summary"] = summary
    dump_json(json_path, res)
    print(report.table(res, summary))
    png = json_path[:-5] + ".png"
    try:
        report.chart(res, summary, png)
        print(f"\nresults: {json_path}\nchart:   {png}")
    except Exception as e:  # the chart is a convenience; the JSON is the record
        print(f"\nresults: {json_path}\nchart not written: {e}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
