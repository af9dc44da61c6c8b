"""Small helpers: logging, processes, mounts, files, statistics."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says why (recorded as n/a)."""


def wait_for(cond, timeout: float, what: str, interval: float = 0.002):
    """Poll `cond()` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- processes

class Proc:
    """A child process with its output in a log file; stop() is idempotent."""

    def __init__(self, name: str, argv: list[str], logdir: str, env=None):
        self.name = name
        self.argv = argv
        self.logpath = os.path.join(logdir, f"{name}.log")
        self._logf = open(self.logpath, "ab")
        self._logf.write(("$ " + " ".join(argv) + "\n").encode())
        self._logf.flush()
        self.t_start = time.monotonic()
        self.popen = subprocess.Popen(argv, stdout=self._logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with status {self.popen.returncode}: {self.tail()}")

    def tail(self, n: int = 8) -> str:
        try:
            with open(self.logpath, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
            return " | ".join(lines[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0, sig=signal.SIGTERM) -> int | None:
        if self.alive():
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {timeout:.0f}s after {sig.name}: killing it")
                self.popen.kill()
                self.popen.wait(10)
        self._logf.close()
        return self.popen.returncode


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """User and system CPU seconds of process `pid` so far, all its threads
    together (/proc/PID/stat, clock-tick resolution); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` plus that of its descendants."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
                except OSError:
                    pass
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- mounts

def mounted(path: str) -> bool:
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == path:
                    return True
    except OSError:
        pass
    return False


def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


def lazy_unmount(path: str) -> None:
    """Detach a (FUSE) mount whatever state its daemon is in."""
    for _ in range(4):
        if not mounted(path):
            return
        r = subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)


# ---------------------------------------------------------------- files

def make_sparse(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def copy_image(src: str, dst: str) -> None:
    """Copy keeping holes (SEEK_DATA/SEEK_HOLE + copy_file_range)."""
    size = os.path.getsize(src)
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        fd.truncate(size)
        ifd, ofd = fs.fileno(), fd.fileno()
        pos = 0
        while pos < size:
            try:
                data = os.lseek(ifd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(ifd, data, os.SEEK_HOLE)
            off = data
            while off < hole:
                n = os.copy_file_range(ifd, ofd, hole - off, off, off)
                if n <= 0:
                    raise BenchError(f"copy_file_range {src} -> {dst} stopped at {off}")
                off += n
            pos = hole


def make_random_image(path: str, size: int, chunk: int = MiB, data_every: int = 1,
                      seed: int = 1) -> int:
    """A raw image of `size` bytes; one `chunk` in each `data_every` holds random
    bytes (chosen by a seeded generator), the rest are holes.  Returns data bytes."""
    import random
    rnd = random.Random(seed)
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        fd = f.fileno()
        for off in range(0, size, chunk):
            if data_every == 1 or rnd.randrange(data_every) == 0:
                buf = os.urandom(min(chunk, size - off))
                os.pwrite(fd, buf, off)
                written += len(buf)
        os.fsync(fd)
    return written


def make_filled_image(path: str, size: int, piece: int = 16 * MiB) -> None:
    """A fully allocated image of non-zero bytes (a random `piece` repeated): what
    copy-before-write has to copy, quicker to make than `size` random bytes."""
    buf = os.urandom(piece)
    with open(path, "wb") as f:
        f.truncate(size)
        fd = f.fileno()
        for off in range(0, size, piece):
            os.pwrite(fd, buf[:min(piece, size - off)], off)
        os.fsync(fd)


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- statistics

def summarize(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals), "values": vals}


def human_size(n: int) -> str:
    for unit, div in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def cmd_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        return out.strip().splitlines()[0] if out.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def dump_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
