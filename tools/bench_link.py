#!/usr/bin/env python3
"""Microbenchmark of the replica link into `nbdkit memory` over a unix socket.

For each case it prints the link's rate and, measured right before it against
the same server, the rate of a bare trio loop around libnbd's aio calls (no
link: submit up to `depth` writes, wait readable, notify while readable).  The
bare loop is the ceiling on this machine at that moment; the ratio is what to
compare between runs (the machine's load moves both).

Cases: 4 KiB random writes at depth 1 and 16 (16 tasks with wait=True, and one
task with wait=False and max_requests=16) and 1 MiB sequential writes at depth
16.  Usage: .venv/bin/python tools/bench_link.py [seconds per case]
"""

import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import time

import nbd
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from repdisk.edge.replica import ReplicaLink  # noqa: E402
from repdisk.edge.replica import _wait_either as wait_either  # noqa: E402

DISK = 1 << 30


def start_nbdkit(path: str) -> subprocess.Popen:
    """nbdkit memory on a unix socket bound here and passed by socket
    activation: connectable as soon as this returns."""
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen()
    fd = lsock.fileno()
    move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
    proc = subprocess.Popen(
        ["bash", "-c", f"{move}LISTEN_PID=$$ LISTEN_FDS=1 exec nbdkit --exit-with-parent -f memory {DISK}"],
        pass_fds=(fd,),
    )
    lsock.close()
    return proc


def offsets(size, seq, seed):
    """Block offsets: random, or sequential (wrapping) from a random start."""
    rnd = random.Random(seed)
    blocks = DISK // size
    b = rnd.randrange(blocks)
    while True:
        b = (b + 1) % blocks if seq else rnd.randrange(blocks)
        yield b * size


async def bare(uri, seconds, depth, size, seq):
    """The ceiling: one trio task driving libnbd directly."""
    h = nbd.NBD()
    h.connect_uri(uri)
    fd = h.aio_get_fd()
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    both = select.poll()
    both.register(fd, select.POLLIN | select.POLLOUT)
    buf = os.urandom(size)
    done = 0

    def completed(err):
        nonlocal done
        done += 1
        return 1

    offs = offsets(size, seq, 0)
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while sent > done or time.perf_counter() < deadline:
        while sent - done < depth and time.perf_counter() < deadline:
            h.aio_pwrite(buf, next(offs), completed)
            sent += 1
        if h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
            # Sending is blocked: wait for either direction (the server may be
            # waiting for us to read its replies before it reads more).
            events = both.poll(0)
            ready = events[0][1] if events else 0
            if ready & select.POLLOUT:
                h.aio_notify_write()
            elif ready or await wait_either(fd):
                h.aio_notify_read()
            else:
                h.aio_notify_write()
            continue
        await trio.lowlevel.wait_readable(fd)
        h.aio_notify_read()
        while poll.poll(0) and h.aio_get_direction() & nbd.AIO_DIRECTION_READ:
            h.aio_notify_read()
    rate = done / (time.perf_counter() - t0)
    h.shutdown()
    return rate


async def link_rate(uri, seconds, depth, size, seq, tasks):
    """tasks > 0: that many tasks writing with wait=True; 0: one task with
    wait=False and max_requests=depth."""
    buf = os.urandom(size)
    link = ReplicaLink(uri, max_requests=depth if not tasks else 64)
    await link.connect()
    count = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def worker(i, wait):
            nonlocal count
            offs = offsets(size, seq, i)
            while time.perf_counter() < deadline:
                for _ in range(16):
                    await link.write(buf, next(offs), wait=wait)
                count += 16

        async with trio.open_nursery() as workers:
            if tasks:
                for i in range(tasks):
                    workers.start_soon(worker, i, True)
            else:
                workers.start_soon(worker, 0, False)
        await link.drain()
        rate = count / (time.perf_counter() - t0)
        stats = link.statistics()
        await link.close()
    assert stats["max_depth"] <= depth or tasks, stats
    return rate


CASES = [
    # name, depth, size, sequential, tasks (0: one task, wait=False)
    ("4 KiB random, depth 1, wait=True", 1, 4096, False, 1),
    ("4 KiB random, depth 16, 16 tasks wait=True", 16, 4096, False, 16),
    ("4 KiB random, depth 16, 1 task wait=False", 16, 4096, False, 0),
    ("1 MiB sequential, depth 16, 16 tasks wait=True", 16, 1 << 20, True, 16),
    ("1 MiB sequential, depth 16, 1 task wait=False", 16, 1 << 20, True, 0),
]


def fmt(rate, size):
    if size == 4096:
        return f"{rate:8.0f} writes/s"
    return f"{rate * size / 1e6:8.0f} MB/s    "


async def bench(uri, seconds):
    print(f"{'case':50s} {'link':>18s} {'bare libnbd+trio':>18s}  ratio")
    for name, depth, size, seq, tasks in CASES:
        ceiling = await bare(uri, seconds, depth, size, seq)
        rate = await link_rate(uri, seconds, depth, size, seq, tasks)
        print(f"{name:50s} {fmt(rate, size)} {fmt(ceiling, size)}  {rate / ceiling:5.2f}", flush=True)


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "nbd.sock")
        proc = start_nbdkit(path)
        try:
            trio.run(bench, f"nbd+unix:///?socket={path}", seconds)
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
