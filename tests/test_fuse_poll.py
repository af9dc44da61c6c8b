"""The FUSE loop's poll for the next request (edge/fuseloop.py, "Polling for
the next request"): the namespace pyfuse3 waits through, driven by trio tasks
on a real pipe, then a real pair with and without it."""

import os
import sys
import threading
import time

import pyfuse3
import pytest
import trio

from nodes import needs_fuse, read_file, wait_until, write_file
from test_pair_e2e import start_pair

from repdisk.edge import fuseloop, spin
from repdisk.edge.spin import SpinPolicy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))

from benchlib.util import cpu_seconds  # noqa: E402


def run(poll_s, fn):
    """fn(wait_readable, lowlevel, rfd, wfd) inside installed(poll_s), with
    pyfuse3's view of trio.lowlevel, as its reader calls it."""
    rfd, wfd = os.pipe()

    async def main():
        with fuseloop.installed(poll_s):
            low = pyfuse3.trio.lowlevel
            await fn(low.wait_readable, low, rfd, wfd)

    try:
        trio.run(main)
    finally:
        os.close(rfd)
        os.close(wfd)


def write_later(fd, delay):
    threading.Timer(delay, os.write, (fd, b"x")).start()


async def ticker(counter):
    while True:
        counter[0] += 1
        await trio.sleep(0)


def test_a_request_arriving_during_the_spin_is_caught_and_the_loop_keeps_running():
    async def body(wait, low, rfd, wfd):
        ticks = [0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker, ticks)
            write_later(wfd, 0.02)
            t0 = time.monotonic()
            await wait(rfd)
            assert time.monotonic() - t0 >= 0.015
            nursery.cancel_scope.cancel()
        s = fuseloop.statistics()
        assert (s["polls"], s["polled_requests"], s["poll_us"], s["poll_share"]) == (1, 1, 1_000_000, 1.0), s
        # the other task ran all along the 20 ms spin, not only after it
        assert ticks[0] > 100, ticks

    run(1.0, body)


def test_no_request_within_the_window_means_sleeping_until_one_comes():
    async def body(wait, low, rfd, wfd):
        write_later(wfd, 0.1)
        t0 = time.monotonic()
        with trio.fail_after(5):
            await wait(rfd)
        assert time.monotonic() - t0 >= 0.09
        s = fuseloop.statistics()
        assert (s["polls"], s["polled_requests"]) == (1, 0) and s["poll_share"] < 1.0, s
        assert low.policy.share == pytest.approx(1 - 1 / 16)

    run(0.001, body)


def test_terminate_ends_a_spin_at_once():
    async def body(wait, low, rfd, wfd):
        async def terminate_soon():
            await trio.sleep(0.02)
            low.notify_closing(rfd)  # what pyfuse3.terminate() calls

        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminate_soon)
            with pytest.raises(trio.ClosedResourceError):
                await wait(rfd)  # a 10 s window
        assert time.monotonic() - t0 < 2

    run(10.0, body)


def test_a_device_always_readable_still_lets_other_tasks_run_and_be_cancelled():
    async def body(wait, low, rfd, wfd):
        os.write(wfd, b"x")  # never read: every wait finds a request at once
        ticks = [0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker, ticks)
            for _ in range(200):
                await wait(rfd)
            nursery.cancel_scope.cancel()
        assert ticks[0] >= 150, ticks  # a checkpoint per wait, as trio's own wait_readable
        assert low.policy.caught == 200
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await wait(rfd)

    run(1.0, body)


def test_a_thread_holds_its_spin_while_another_spinning_thread_has_input():
    policy = SpinPolicy(1e-3)
    other = threading.Thread(target=SpinPolicy.arrived)
    other.start()
    other.join()
    assert policy.window() == 0.0 and policy.deferred == 1 and policy.spins == 0
    SpinPolicy.arrived()  # this thread's own input holds nothing
    wait_until(lambda: not spin._others_busy(), timeout=1, interval=spin.QUIET_S / 4,
               what="the other thread's input to age")
    assert policy.window() == 1e-3 and policy.spins == 1 and policy.deferred == 1


def test_off_means_no_spin():
    async def body(wait, low, rfd, wfd):
        write_later(wfd, 0.01)
        await wait(rfd)
        s = fuseloop.statistics()
        assert (s["polls"], s["polled_requests"], s["poll_us"], s["poll_share"]) == (0, 0, 0, None), s

    run(0.0, body)


@needs_fuse
@pytest.mark.parametrize("mode,poll_us,request_poll_us", [("sync", "50", "200"), ("async", "50", "200"),
                                                          ("sync", "0", "0")])
def test_a_pair_polls_for_requests_only_while_they_come(nodes, tmp_path, mode, poll_us, request_poll_us):
    pri, sec = start_pair(nodes, tmp_path, mode=mode, both=("--fuse-poll-us", poll_us),
                          secondary=("--request-poll-us", request_poll_us))
    fd = os.open(pri.disk, os.O_RDWR)
    try:
        for i in range(500):  # back to back, as a guest at queue depth 1
            os.pwrite(fd, i.to_bytes(4, "little") * 1024, i * 4096)
        for i in range(500):
            assert os.pread(fd, 4096, i * 4096)[:4] == i.to_bytes(4, "little")
    finally:
        os.close(fd)
    write_file(sec.disk, b"view", 0)
    assert read_file(sec.disk, 0, 4) == b"view"
    for node in (pri, sec):
        f = node.status()["fuse"]
        if poll_us == "0":
            assert (f["polls"], f["polled_requests"], f["poll_us"]) == (0, 0, 0), f
        else:
            assert f["polled_requests"] > 0 and f["polls"] >= f["polled_requests"], f
    s, nbd = pri.status()["fuse"], sec.status()["nbd"]
    if poll_us != "0":
        # most of the 1,000 requests came while the reader was still polling
        assert s["polled_requests"] > 500 and s["poll_us"] == 50, s
    if request_poll_us == "0":
        assert (nbd["request_polls"], nbd["polled_requests"], nbd["request_poll_us"]) == (0, 0, 0), nbd
    elif mode == "sync":
        # each write's successor comes a round trip later: most were caught
        assert nbd["polled_requests"] > 250 and nbd["request_poll_us"] == 200, {k: v for k, v in nbd.items() if "poll" in k}
    # Idle, neither node spins: each spin starts with a wait for a request.
    before = [sum(cpu_seconds(n.proc.pid)) for n in (pri, sec)]
    time.sleep(1.0)  # the span measured: nothing to wait for
    used = [sum(cpu_seconds(n.proc.pid)) - b for n, b in zip((pri, sec), before)]
    assert max(used) < 0.1, used


@needs_fuse
@pytest.mark.parametrize("request_poll_us", ["200", "0"])
def test_a_secondary_busy_on_both_sides_does_not_spin_against_itself(nodes, tmp_path, request_poll_us):
    """The view's reader and the NBD request thread share the secondary's
    GIL: while both have requests, neither spins (edge/spin.py), also when
    only the view's reader would."""
    pri, sec = start_pair(nodes, tmp_path, both=("--fuse-poll-us", "50"),
                          secondary=("--request-poll-us", request_poll_us))
    stop = threading.Event()
    reads = [0]

    def view_reader():
        fd = os.open(sec.disk, os.O_RDONLY)
        try:
            while not stop.is_set():
                os.pread(fd, 4096, (reads[0] % 512) * 4096)
                reads[0] += 1
        finally:
            os.close(fd)

    reader = threading.Thread(target=view_reader)
    reader.start()
    try:
        fd = os.open(pri.disk, os.O_WRONLY)
        try:
            for i in range(1000):
                os.pwrite(fd, b"w" * 4096, i * 4096)
        finally:
            os.close(fd)
    finally:
        stop.set()
        reader.join()
    f, nbd = sec.status()["fuse"], sec.status()["nbd"]
    assert reads[0] > 100
    assert f["polls_deferred"] > 0, f
    assert (nbd["request_polls_deferred"] > 0) == (request_poll_us != "0"), nbd
    pri.command("checkpoint")
    sec.command("checkpoint")
    assert read_file(sec.disk, 0, 1000 * 4096) == b"w" * 4096 * 1000
