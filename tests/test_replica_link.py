"""The replica link against real NBD servers (nbdkit, qemu-nbd) started per test.

Servers get their listening socket from us by socket activation (bound and
listening before the server starts), so a test can connect at once: no waiting
for a socket file or port to appear.  Every test runs under trio.fail_after.
"""

import errno
import os
import random
import shutil
import socket
import subprocess
import tempfile

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repdisk.edge.replica import CHUNK, UNIX_SEND_BUFFER, ZERO_CHUNK, ReplicaError, ReplicaLink
from repdisk.edge.spin import SpinPolicy

pytestmark = pytest.mark.skipif(
    not (shutil.which("nbdkit") and shutil.which("qemu-nbd")), reason="needs nbdkit and qemu-nbd"
)

MiB = 1 << 20
TIMEOUT = 30


class Server:
    """An NBD server process on a socket we bound ("unix" or "tcp")."""

    def __init__(self, argv, *, tcp=False, export=""):
        self.dir = tempfile.mkdtemp(prefix="rl")  # short: unix socket paths are limited
        if tcp:
            lsock = socket.socket(socket.AF_INET)
            lsock.bind(("127.0.0.1", 0))
            self.uri = f"nbd://127.0.0.1:{lsock.getsockname()[1]}/{export}"
        else:
            path = os.path.join(self.dir, "nbd.sock")
            lsock = socket.socket(socket.AF_UNIX)
            lsock.bind(path)
            self.uri = f"nbd+unix:///{export}?socket={path}"
        with lsock:
            lsock.listen()
            fd = lsock.fileno()
            move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
            self.proc = subprocess.Popen(
                ["bash", "-c", move + 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "bash", *argv],
                pass_fds=(fd,),
            )

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self):
        # SIGTERM first: nbdkit's eval plugin removes its /tmp/nbdkitXXXXXX
        # directory on a clean exit and leaves it behind on SIGKILL
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        if hasattr(self, "image_dir"):
            shutil.rmtree(self.image_dir, ignore_errors=True)


@pytest.fixture
def servers():
    started = []

    def start(argv, **kw):
        server = Server(argv, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def nbdkit(size, *extra, filters=(), options=()):
    filter_args = [f"--filter={f}" for f in filters]
    return ["nbdkit", "--exit-with-parent", "-f", *options, *filter_args, "memory", str(size), *extra]


def qemu_nbd(image, *options):
    return ["qemu-nbd", "-t", "-f", "raw", *options, image]


def run(fn, *args):
    async def main():
        with trio.fail_after(TIMEOUT):
            return await fn(*args)

    return trio.run(main)


class Failures:
    """on_failure recorder."""

    def __init__(self):
        self.ranges = []
        self.errors = []

    def __call__(self, offset, length, error):
        assert isinstance(error, ReplicaError)
        self.ranges.append((offset, length))
        self.errors.append(error)


async def open_link(nursery, uri, **kw):
    link = ReplicaLink(uri, **kw)
    await link.connect()
    await nursery.start(link.run)
    return link


def make_peer(servers, kind, size):
    if kind == "nbdkit-unix":
        return servers(nbdkit(size))
    if kind == "nbdkit-tcp":
        return servers(nbdkit(size), tcp=True)
    if kind == "nbdkit-simple-replies":
        return servers(nbdkit(size, options=["--no-sr"]))
    if kind == "qemu-nbd":
        d = tempfile.mkdtemp(prefix="rli")
        image = os.path.join(d, "disk.img")
        with open(image, "wb") as f:
            f.truncate(size)
        server = servers(qemu_nbd(image, "--discard=unmap"))  # qemu-nbd ignores trim by default
        server.image_dir = d
        return server
    raise AssertionError(kind)


PEERS = ["nbdkit-unix", "nbdkit-tcp", "nbdkit-simple-replies", "qemu-nbd"]


# -- connecting ---------------------------------------------------------------


def test_connect_size_and_no_description(servers):
    server = servers(nbdkit(8 * MiB))

    async def main():
        link = ReplicaLink(server.uri)
        await link.connect()
        assert link.size == 8 * MiB
        assert link.uri == server.uri
        assert link.description is None
        await link.close()

    run(main)


def test_connect_description_nbdkit_tcp(servers):
    server = servers(nbdkit(4 * MiB, "exportdesc=fixed:secondary disk", filters=["exportname"]), tcp=True)

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            assert (link.size, link.description) == (4 * MiB, "secondary disk")
            await link.close()

    run(main)


def test_connect_description_qemu_nbd(servers, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * MiB)
    server = servers(qemu_nbd(str(image), "-D", "qemu replica"))

    async def main():
        link = ReplicaLink(server.uri)
        await link.connect()
        assert (link.size, link.description) == (MiB, "qemu replica")
        await link.close()

    run(main)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_unix_socket_gets_room_for_large_writes(servers, tcp):
    """A unix socket's send buffer is widened (a 1 MiB write leaves in one
    call); a TCP socket keeps the kernel's autotuned one."""
    server = servers(nbdkit(8 * MiB), tcp=tcp)

    async def main():
        link = ReplicaLink(server.uri)
        await link.connect()
        with socket.socket(fileno=os.dup(link._fd)) as sk:
            have = sk.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        if tcp:
            assert link.send_buffer is None  # left to autotuning (often past 2 MiB on loopback)
        else:
            assert link.send_buffer == have
            if os.geteuid() == 0:  # past net.core.wmem_max
                assert have == UNIX_SEND_BUFFER
            else:
                with open("/proc/sys/net/core/wmem_max") as f:
                    assert have == min(UNIX_SEND_BUFFER, 2 * int(f.read()))
        assert link.statistics()["send_buffer"] == link.send_buffer
        await link.close()

    run(main)


def test_connect_unix_socket_missing():
    uri = "nbd+unix:///?socket=/nonexistent/repdisk-test.sock"

    async def main():
        link = ReplicaLink(uri)
        with pytest.raises(ReplicaError) as info:
            await link.connect()
        assert info.value.errno == errno.ENOENT
        assert uri in str(info.value) and "No such file or directory" in str(info.value)

    run(main)


def test_connect_tcp_refused():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"nbd://127.0.0.1:{port}/"

    async def main():
        with pytest.raises(ReplicaError) as info:
            await ReplicaLink(uri).connect()
        assert info.value.errno == errno.ECONNREFUSED
        assert uri in str(info.value) and "refused" in str(info.value)

    run(main)


def test_connect_handshake_refusal_text(servers, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * MiB)
    server = servers(qemu_nbd(str(image), "-x", "good"))
    bad_uri = server.uri.replace("nbd+unix:///", "nbd+unix:///bad")

    async def main():
        with pytest.raises(ReplicaError) as info:
            await ReplicaLink(bad_uri).connect()
        assert "bad" in str(info.value) and "export" in str(info.value)
        link = ReplicaLink(server.uri.replace("nbd+unix:///", "nbd+unix:///good"))
        await link.connect()
        assert link.size == MiB
        await link.close()

    run(main)


def test_connect_timeout():
    # Listening but never answering: the kernel accepts, nobody speaks NBD.
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        uri = f"nbd://127.0.0.1:{lsock.getsockname()[1]}/"

        async def main():
            with pytest.raises(ReplicaError) as info:
                await ReplicaLink(uri).connect(timeout=0.3)
            assert info.value.errno == errno.ETIMEDOUT
            assert "no answer" in str(info.value)

        run(main)


def test_calls_before_connect_raise():
    async def main():
        link = ReplicaLink("nbd+unix:///?socket=/nonexistent")
        with pytest.raises(ReplicaError, match="not connected"):
            await link.write(b"x", 0)
        with pytest.raises(ReplicaError, match="before connect"):
            await link.run()

    run(main)


# -- data path ----------------------------------------------------------------


@pytest.mark.parametrize("peer", PEERS)
def test_concurrent_writes_match_model(servers, peer):
    size = 24 * MiB
    server = make_peer(servers, peer, size)
    rnd = random.Random(peer)

    async def main():
        model = bytearray(size)
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            hot = rnd.randrange(size - 64 * 1024)  # a small region written over and over
            for i in range(600):
                r = rnd.random()
                if r < 0.4:
                    offset = hot + rnd.randrange(32 * 1024)
                    length = rnd.randrange(1, 32 * 1024)
                else:
                    length = rnd.choice([1, 511, 4096, 65536, rnd.randrange(1, 300_000)])
                    offset = rnd.randrange(size - length)
                if r < 0.9:
                    data = rnd.randbytes(length)
                    model[offset : offset + length] = data
                    await link.write(memoryview(data) if i % 2 else data, offset, wait=False, fua=i % 7 == 0)
                elif r < 0.95:
                    model[offset : offset + length] = bytes(length)
                    await link.zero(offset, length, wait=False)
                else:
                    # nbdkit memory and qemu-nbd on a raw file both read zeros after a trim
                    model[offset : offset + length] = bytes(length)
                    await link.trim(offset, length, wait=False)
            # one write larger than a chunk, unaligned, split into several requests
            big = rnd.randbytes(2 * CHUNK + 12345)
            model[777 : 777 + len(big)] = big
            await link.write(bytearray(big), 777, wait=False)
            await link.flush()
            await link.drain()
            assert (link.inflight_requests, link.inflight_bytes) == (0, 0)
            assert await link.read(0, size) == model
            assert await link.read(hot + 5, 70_000) == model[hot + 5 : hot + 5 + 70_000]
            stats = link.statistics()
            assert link.failed is None
            await link.close()
        assert stats["write"]["submitted"] >= 500 and stats["write"]["completed"] == stats["write"]["submitted"]
        assert stats["flush"]["completed"] >= 1
        assert stats["held_back"] > 0  # overlapping requests were really ordered
        assert stats["max_depth"] > 1

    run(main)


def test_last_write_wins_on_one_block(servers):
    # nbdkit runs requests on 16 threads: without ordering, these could land in any order.
    server = servers(nbdkit(MiB))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            for i in range(300):
                await link.write(bytes([i % 251]) * 4096, 8192, wait=False)
            await link.write(b"tail", 8192 + 100, wait=False)
            expected = bytearray(bytes([299 % 251]) * 4096)
            expected[100:104] = b"tail"
            assert await link.read(8192, 4096) == expected
            await link.close()

    run(main)


def test_ordering_against_a_server_that_reorders(servers):
    # nbdkit holds writes for 50 ms and answers zero/trim/read at once: an
    # overlapping zero or read sent right after a write would overtake it.
    server = servers(nbdkit(4 * MiB, "delay-write=50ms", filters=["delay"]))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            data = bytes(range(256)) * 32
            await link.write(data, 0, wait=False)
            await link.zero(4096, 4096, wait=False)
            await link.write(b"Y" * 100, 100, wait=False)
            assert await link.read(0, 8192) == data[:100] + b"Y" * 100 + data[200:4096] + bytes(4096)
            assert link.statistics()["held_back"] == 3  # the zero, the second write, the read
            await link.write(data, MiB, wait=False)
            await link.trim(MiB + 10, 10, wait=False)
            assert await link.read(MiB, 30) == data[:10] + bytes(10) + data[20:30]
            # non-overlapping requests are not held back
            held = link.statistics()["held_back"]
            await link.write(data, 2 * MiB, wait=False)
            await link.zero(3 * MiB, 4096, wait=False)
            await link.read(3 * MiB + 4096, 10)
            assert link.statistics()["held_back"] == held
            await link.close()

    run(main)


def test_wait_true_from_many_tasks(servers):
    server = servers(nbdkit(8 * MiB))

    async def main():
        model = bytearray(8 * MiB)
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri, max_requests=8)

            async def worker(k):
                rnd = random.Random(k)
                for _ in range(50):
                    block = rnd.randrange(k, 2048, 16)  # each worker owns its blocks
                    data = rnd.randbytes(4096)
                    model[block * 4096 : block * 4096 + 4096] = data
                    await link.write(data, block * 4096)

            async with trio.open_nursery() as workers:
                for k in range(16):
                    workers.start_soon(worker, k)
            assert link.inflight_requests == 0  # wait=True: everything acknowledged
            assert await link.read(0, 8 * MiB) == model
            assert link.statistics()["max_outstanding"] <= 8
            await link.close()

    run(main)


@pytest.mark.parametrize("max_requests,max_bytes", [(2, 64 << 20), (64, 40_000), (1, 1)])
def test_backpressure_still_correct(servers, max_requests, max_bytes):
    size = 4 * MiB
    server = servers(nbdkit(size))
    rnd = random.Random(max_requests)

    async def main():
        model = bytearray(size)
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri, max_requests=max_requests, max_bytes=max_bytes)
            seen = 0
            for _ in range(300):
                length = rnd.randrange(1, 20_000)
                offset = rnd.randrange(size - length)
                data = rnd.randbytes(length)
                model[offset : offset + length] = data
                await link.write(data, offset, wait=False)
                assert link.inflight_requests <= max_requests
                assert link.inflight_bytes <= max(max_bytes, length)
                seen = max(seen, link.inflight_requests)
            await link.flush()
            stats = link.statistics()
            assert stats["max_outstanding"] <= max_requests and stats["max_depth"] <= max_requests
            assert stats["max_inflight_bytes"] <= max(max_bytes, 20_000)
            assert await link.read(0, size) == model
            assert seen >= 1
            await link.close()

    run(main)


def test_zero_trim_and_large_ranges(servers):
    size = 3 * ZERO_CHUNK  # sparse in nbdkit memory
    server = servers(nbdkit(size))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            pattern = bytes(range(256)) * 64
            for off in (0, ZERO_CHUNK - 100, size - len(pattern)):
                await link.write(pattern, off)
            await link.zero(1, size - 2)  # three NBD requests
            assert await link.read(0, 1) == pattern[:1]
            assert await link.read(size - 1, 1) == pattern[-1:]
            assert await link.read(ZERO_CHUNK - 100, 200) == bytes(200)
            await link.write(pattern, 4096)
            await link.trim(4096 + 10, 100)
            assert await link.read(4096, 200) == pattern[:10] + bytes(100) + pattern[110:200]
            stats = link.statistics()
            assert stats["zero"]["submitted"] == 3 and stats["trim"]["submitted"] == 1
            assert stats["zero"]["submitted_bytes"] == size - 2
            await link.close()

    run(main)


def test_writers_admitted_together_are_sent_in_arrival_order(servers):
    """Writers that queued for capacity and are admitted in one go must go on
    the wire in the order they came, whatever order trio then runs their tasks
    in (it shuffles): the last overlapping write wins, every round, and their
    `then` callables (the primary's local writes) run in that order too."""
    server = servers(nbdkit(MiB, "delay-write=20ms", filters=["delay"]))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri, max_requests=2)
            for rnd in range(24):
                # Two writes elsewhere fill the capacity; their replies come together.
                await link.write(b"x" * 4096, 65536, wait=False)
                await link.write(b"y" * 4096, 131072, wait=False)
                order, thens = [], []

                async def writer(value):
                    order.append(value)
                    await link.write(bytes([value]) * 4096, 0, then=lambda: thens.append(value))

                async with trio.open_nursery() as writers:
                    for value in (1, 2):
                        writers.start_soon(writer, value)
                        await trio.testing.wait_all_tasks_blocked()
                assert order == [1, 2] and thens == [1, 2], (order, thens)
                assert await link.read(0, 4096) == bytes([2]) * 4096, f"round {rnd}"
            await link.close()

    run(main)


def test_then_runs_once_everything_is_sent_and_before_the_reply(servers):
    """`then` (the primary's local write) runs after every request of the
    call went to libnbd and before any reply (the server holds writes 50 ms);
    its exception propagates; a refused call does not run it."""
    server = servers(nbdkit(3 * CHUNK, "delay-write=50ms", filters=["delay"]))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            seen = []

            def then():
                st = link.statistics()
                seen.append((st["write"]["submitted"], st["write"]["completed"], st["zero"]["submitted"]))

            await link.write(b"a" * 4096, 0, then=then)
            await link.write(b"b" * (CHUNK + 4096), 4096, then=then)  # two requests
            await link.zero(0, 4096, then=then)
            assert seen == [(1, 0, 0), (3, 1, 0), (3, 3, 1)]

            def boom():
                raise RuntimeError("local write failed")

            with pytest.raises(RuntimeError):
                await link.write(b"c" * 4096, 8192, then=boom)
            await link.settle()
            assert await link.read(8192, 4096) == b"c" * 4096  # the request itself went through
            with pytest.raises(ReplicaError):
                await link.write(b"x", 3 * CHUNK, then=boom)  # out of range: refused before sending
            await link.close()

    run(main)


def test_started_runs_for_each_piece_when_it_is_admitted(servers):
    """`started(offset, length)` runs for every request of a call as it
    starts (the primary marks there what the next flush covers): a piece
    that waits for room on the link reports when it gets it, not before.
    A refused call reports nothing."""
    server = servers(nbdkit(3 * CHUNK, "delay-write=50ms", filters=["delay"]))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri, max_requests=1)
            seen = []

            def started(offset, length):
                seen.append((offset, length, link.statistics()["write"]["completed"]))

            await link.write(b"b" * (CHUNK + 4096), 4096, wait=False, started=started)  # two requests
            await link.zero(0, 4096, started=started)
            assert seen == [(4096, CHUNK, 0), (4096 + CHUNK, 4096, 1), (0, 4096, 2)]
            with pytest.raises(ReplicaError):
                await link.write(b"x", 3 * CHUNK, started=started)  # out of range: refused before sending
            assert len(seen) == 3
            await link.close()

    run(main)


def test_a_started_hook_that_raises_fails_the_link_and_reports_the_range(servers):
    """`started` must not raise; if it does (a bug of ours), the request is
    not sent, the link fails and the range goes to on_failure for a resync,
    instead of a request nobody sends that settle() would wait for."""
    server = servers(nbdkit(CHUNK))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            failures = link.on_failure = Failures()

            def bad(offset, length):
                raise RuntimeError("bug")

            with pytest.raises(ReplicaError, match="started"):
                await link.write(b"a" * 4096, 8192, started=bad)
            assert link.failed is not None and failures.ranges == [(8192, 4096)]
            with pytest.raises(ReplicaError):
                await link.settle()

    run(main)


def test_out_of_range_is_refused_without_failing_the_link(servers):
    server = servers(nbdkit(MiB))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            failures = link.on_failure = Failures()
            with pytest.raises(ReplicaError, match="outside") as info:
                await link.write(b"x" * 10, MiB - 5)
            assert info.value.errno == errno.EINVAL
            with pytest.raises(ReplicaError, match="outside"):
                await link.read(-1, 2)
            assert link.failed is None and failures.ranges == []
            await link.write(b"ok", 0)
            await link.close()

    run(main)


def test_statistics_and_close(servers):
    server = servers(nbdkit(MiB))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            failures = link.on_failure = Failures()
            await link.write(b"a" * 1000, 0)
            await link.write(b"b" * 1000, 4096, fua=True)
            await link.flush()
            await link.read(0, 10)
            stats = link.statistics()
            assert stats["write"] == {
                "submitted": 2, "submitted_bytes": 2000, "completed": 2, "completed_bytes": 2000, "failed": 0,
            }
            assert stats["flush"]["completed"] == 1 and stats["read"]["completed_bytes"] == 10
            assert stats["failed"] is None and stats["failures"] == 0
            await link.close()
            await link.close()  # idempotent
        # run() returned on its own after close(); calls now raise and report
        with pytest.raises(ReplicaError, match="closed"):
            await link.write(b"late", 100, wait=False)
        assert failures.ranges == [(100, 4)]
        assert link.failed is None

    run(main)


def test_cancelling_run_fails_the_link(servers):
    server = servers(nbdkit(MiB))

    async def main():
        link = ReplicaLink(server.uri)
        await link.connect()
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await link.write(b"x", 0)
            nursery.cancel_scope.cancel()
        assert link.failed is not None and "stopped" in str(link.failed)
        with pytest.raises(ReplicaError):
            await link.flush()

    run(main)


MODEL_SIZE = 256 * 1024


@pytest.fixture(scope="module")
def model_server():
    # Writes take 1 ms, zero/trim/read none: without ordering, later requests overtake.
    server = Server(nbdkit(MODEL_SIZE, "delay-write=1ms", filters=["delay"]))
    yield server
    server.stop()


def _op():
    offset = st.integers(0, MODEL_SIZE - 1)
    return st.tuples(
        st.sampled_from(["write", "write", "write", "zero", "trim", "flush", "read"]),
        offset,
        st.integers(1, 70_000),
        st.booleans(),  # wait
        st.integers(0, 255),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op(), max_size=60), max_requests=st.sampled_from([1, 3, 64]), batch=st.sampled_from([0, 2, 5]))
def test_ops_match_model(model_server, ops, max_requests, batch):
    """Any sequence of unaligned writes/zeros/trims/flushes/reads issued
    back to back (wait=False mostly) reads back like a bytearray, with or
    without batching."""

    async def main():
        model = bytearray(MODEL_SIZE)
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, model_server.uri, max_requests=max_requests)
            link.set_batching(batch, 0.002)
            await link.zero(0, MODEL_SIZE)
            for kind, offset, length, wait, fill in ops:
                length = min(length, MODEL_SIZE - offset)
                if kind == "write":
                    model[offset : offset + length] = bytes([fill]) * length
                    await link.write(bytes([fill]) * length, offset, wait=wait)
                elif kind in ("zero", "trim"):  # nbdkit memory reads zeros after both
                    model[offset : offset + length] = bytes(length)
                    await getattr(link, kind)(offset, length, wait=wait)
                elif kind == "flush":
                    await link.flush()
                else:  # a read sees every write issued before it
                    assert await link.read(offset, length) == model[offset : offset + length]
            assert await link.read(0, MODEL_SIZE) == model
            assert link.failed is None
            await link.close()

    run(main)


def test_batching_holds_writes_until_full_late_or_waited_for(servers):
    """set_batching(4, ...): writes nobody waits for are held (admitted,
    counted as outstanding, not sent) until four are held, the delay passed,
    or something waits for the link; the data comes out right."""
    server = servers(nbdkit(4 * MiB))

    async def main():
        model = bytearray(4 * MiB)

        async def write(data, offset, **kw):
            model[offset : offset + len(data)] = data
            await link.write(data, offset, **kw)

        def sent():
            return link.statistics()["write"]["submitted"]

        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            link.set_batching(4, 3600.0)  # only "full" and "waited for" send
            for i in range(3):
                await write(bytes([i + 1]) * 4096, i * 8192, wait=False)
            assert (sent(), link.inflight_requests) == (0, 3)
            await write(b"\x04" * 4096, 100, wait=False)  # overlaps the first: held back, not batched
            assert (sent(), link.inflight_requests) == (0, 4)
            await write(b"\x05" * 4096, 3 * 8192, wait=False)  # the fourth in the batch: all go
            assert sent() == 4 and link.statistics()["batches"] == 1
            await write(b"\x06" * 10, MiB, wait=False)
            await write(b"\x07" * 10, MiB + 1, wait=False)  # overlaps the held one: waits for it
            assert sent() < 7
            await link.settle()  # a waiter sends the batch at once
            assert sent() == 7 and link.inflight_requests == 0
            await write(b"\x08" * 10, 2 * MiB, wait=False)
            await write(b"\x09" * 10, 2 * MiB + 20, wait=True)  # a write that waits goes after the held one
            assert sent() == 9
            await write(b"\x0c" * 10, 2 * MiB + 40, wait=False)
            # Overlaps the held write, so it waits behind it instead of
            # sending the batch: waiting must send the batch (no 3600 s wait).
            await write(b"\x0d" * 10, 2 * MiB + 45, wait=True)
            assert sent() == 11
            stats = link.statistics()
            assert (stats["batches"], stats["batched_requests"]) == (4, 7)
            link.set_batching(4, 0.01)  # now the delay sends a lone write
            await write(b"\x0a" * 10, 3 * MiB, wait=False)
            while link.inflight_requests:  # liveness only: fail_after bounds it
                await trio.sleep(0.005)
            assert sent() == 12 and link.statistics()["batches"] == 5
            await write(b"\x0b" * 10, 3 * MiB + 5, wait=False)
            link.set_batching(0, 0)  # turning it off sends what is held
            assert sent() == 13
            assert await link.read(0, 4 * MiB) == model
            await link.close()

    run(main)


def test_batched_writes_are_reported_when_the_link_fails(servers):
    """Held writes count like writes in flight: when the first request sent
    fails (the server died), every held range goes to on_failure."""
    server = servers(nbdkit(MiB))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            failures = link.on_failure = Failures()
            link.set_batching(8, 3600.0)
            for i in range(5):
                await link.write(b"h" * 512, i * 4096, wait=False)
            server.kill()
            with pytest.raises(ReplicaError):
                await link.drain()
        assert sorted(failures.ranges) == [(i * 4096, 512) for i in range(5)]
        assert link.inflight_requests == 0

    run(main)


def test_close_sends_held_writes_first(servers):
    server = servers(nbdkit(MiB))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            link.set_batching(8, 3600.0)
            await link.write(b"c" * 100, 300, wait=False)
            await link.close()
            assert link.statistics()["write"]["completed"] == 1
            check = await open_link(nursery, server.uri)
            assert await check.read(300, 100) == b"c" * 100
            await check.close()

    run(main)


# -- failures -----------------------------------------------------------------


@pytest.mark.parametrize("inline,spin", [(False, False), (True, False), (True, True)], ids=["reader", "inline", "spin"])
def test_error_reply_fails_the_link(servers, tmp_path, wake_pipe, inline, spin):
    """The same whether the reply comes through the reader task, to a write
    waiting inline (sync mode), or to one polling for it."""
    trigger = tmp_path / "fail-writes"
    server = servers(
        nbdkit(MiB, "error=EIO", "error-pwrite-rate=100%", f"error-pwrite-file={trigger}", filters=["error"])
    )

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            if inline:
                link.set_inline_wait(1000, wake_pipe[0])
            if spin:
                link.set_reply_poll(1.0)
            failures = link.on_failure = Failures()
            await link.write(b"good", 0)
            trigger.write_bytes(b"")
            with pytest.raises(ReplicaError) as info:
                await link.write(b"bad" * 100, 4096)
            assert info.value.errno == errno.EIO
            assert failures.ranges == [(4096, 300)]
            assert link.failed is not None and link.failed.errno == errno.EIO
            assert "write of 300 bytes at offset 4096" in str(link.failed) and "EIO" in str(link.failed)
            # dead from now on: calls raise at once, writes still report their range
            with pytest.raises(ReplicaError, match="down"):
                await link.write(b"more", 8192, wait=False)
            with pytest.raises(ReplicaError, match="down"):
                await link.zero(0, 512)
            with pytest.raises(ReplicaError, match="down"):
                await link.read(0, 4)
            with pytest.raises(ReplicaError, match="down"):
                await link.flush()
            assert failures.ranges == [(4096, 300), (8192, 4), (0, 512)]
            assert link.statistics()["inline_replies"] == (1 if inline else 0)  # the good write
            assert link.statistics()["polled_replies"] == (1 if spin else 0)
            await link.close()  # fine on a failed link
        # run() returned normally (the nursery did not raise)

    run(main)


def test_error_replies_with_many_in_flight_report_every_range(servers):
    server = servers(nbdkit(4 * MiB, "error=EIO", "error-pwrite-rate=100%", filters=["error"]))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri, max_requests=8)
            failures = link.on_failure = Failures()
            issued = []
            raised = 0
            for i in range(100):
                offset, length = i * 8192 + 3, 5000
                issued.append((offset, length))
                try:
                    await link.write(b"z" * length, offset, wait=False)
                except ReplicaError:
                    raised += 1
            assert link.failed is not None
            assert sorted(failures.ranges) == issued  # each range reported exactly once
            assert raised >= 1
            assert link.statistics()["failures"] == 100

    run(main)


def test_server_killed_midstream(servers):
    # Writes are held by the server for 30 s: all of them are in flight (or
    # waiting for admission) when it dies.
    server = servers(nbdkit(4 * MiB, "delay-write=30", filters=["delay"]))

    async def main():
        outcome = {}
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri, max_requests=8)
            failures = link.on_failure = Failures()

            issued = set()

            async def submitter():
                try:
                    for i in range(20):
                        issued.add((i * 4096, 4096))
                        await link.write(b"w" * 4096, i * 4096, wait=False)
                except ReplicaError as e:
                    outcome["submitter"] = e

            async def waiter():
                try:
                    await link.write(b"v" * 100, MiB, wait=True)
                except ReplicaError as e:
                    outcome["waiter"] = e

            async def flusher():
                try:
                    await link.flush()
                except ReplicaError as e:
                    outcome["flusher"] = e

            nursery.start_soon(submitter)
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(flusher)
            await trio.testing.wait_all_tasks_blocked()
            # 8 in flight, the rest waits for admission
            assert link.inflight_requests == 8 and link.statistics()["waiting_for_admission"] >= 1
            server.kill()
        # everything woke up, run() returned, nothing hangs
        assert set(outcome) == {"submitter", "waiter", "flusher"}
        assert link.failed is not None and "lost" in str(link.failed)
        expected = issued | {(MiB, 100)}
        assert set(failures.ranges) == expected and len(failures.ranges) == len(expected)
        with pytest.raises(ReplicaError, match="down"):
            await link.write(b"x", 0)

    run(main)


def test_close_reports_requests_still_outstanding(servers):
    server = servers(nbdkit(MiB, "delay-write=30", filters=["delay"]))

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, server.uri)
            failures = link.on_failure = Failures()
            await link.write(b"s" * 10, 0, wait=False)
            await link.close(timeout=0.2)
        assert failures.ranges == [(0, 10)]
        assert "closed" in str(failures.errors[0])

    run(main)


# -- waiting inline (sync mode) -------------------------------------------------


async def random_writes(link, model: bytearray, *, seed: int, count: int) -> None:
    """`count` writes of 1 to 8999 random bytes at random offsets, each
    waited for, applied to `model` too."""
    rnd = random.Random(seed)
    for _ in range(count):
        data = rnd.randbytes(rnd.randrange(1, 9000))
        off = rnd.randrange(0, len(model) - len(data))
        await link.write(data, off)
        model[off : off + len(data)] = data


@pytest.fixture
def wake_pipe():
    """(read end, write end): the read end stands for the FUSE device."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def test_inline_wait_answers_lone_writes_and_yields_to_the_wake_fd(servers, wake_pipe):
    """With set_inline_wait, a lone write(wait=True) gets its reply without
    the reader task; with the wake descriptor readable (another FUSE request
    waiting) or a server slower than the limit, it waits the normal way.  The
    data is right either way."""
    fast = servers(nbdkit(4 * MiB))
    slow = servers(nbdkit(4 * MiB, "delay-write=20ms", filters=["delay"]))
    r, w = wake_pipe

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, fast.uri)
            link.set_inline_wait(1000, r)
            model = bytearray(4 * MiB)
            await random_writes(link, model, seed=3, count=50)
            assert link.statistics()["inline_replies"] == 50
            os.write(w, b"x")  # someone else needs the loop: no inline wait
            await link.write(b"y" * 4096, 0)
            model[0:4096] = b"y" * 4096
            assert link.statistics()["inline_replies"] == 50
            os.read(r, 1)
            await link.write(b"z" * 4096, 4096, wait=False)  # two outstanding: no inline wait
            await link.write(b"w" * 4096, 8192)
            model[4096:12288] = b"z" * 4096 + b"w" * 4096
            assert link.statistics()["inline_replies"] == 50
            link.set_inline_wait(0, r)  # off
            await link.write(b"v" * 4096, 12288)
            model[12288:16384] = b"v" * 4096
            assert link.statistics()["inline_replies"] == 50
            assert await link.read(0, 4 * MiB) == model
            await link.close()

            link = await open_link(nursery, slow.uri)
            link.set_inline_wait(2, r)  # 2 ms < the server's 20 ms
            await link.write(b"s" * 4096, 0)
            assert link.statistics()["inline_replies"] == 0
            assert await link.read(0, 4096) == b"s" * 4096
            await link.close()

    run(main)


# -- polling for the reply (sync mode) --------------------------------------------


def test_reply_poll_stops_when_spins_miss_and_comes_back_through_probes():
    rp = SpinPolicy(50e-6)
    assert rp.spinning and rp.window() == 50e-6  # starts hopeful
    misses = 0
    while rp.spinning:
        rp.record(False)
        misses += 1
    assert misses == 22  # 0.9375**22 < 0.25 <= 0.9375**21
    # Not spinning: one wait in 16 still does, to notice when replies get fast.
    windows = [rp.window() for _ in range(48)]
    assert [i for i, win in enumerate(windows) if win] == [15, 31, 47]
    assert all(win == 50e-6 for win in windows[15::16])
    assert rp.spins == 1 + 3
    rp.record(True)  # the probe caught its reply: worth spinning again
    assert rp.spinning and rp.window() == 50e-6 and rp.caught == 1
    # a long slow spell takes a few caught probes to come back from
    for _ in range(200):
        rp.record(False)
    caught = 0
    while not rp.spinning:
        rp.record(True)
        caught += 1
    assert caught == 5


def test_reply_poll_catches_fast_replies_and_stops_for_slow_ones(servers, wake_pipe):
    """Against a fast server every inline wait catches its reply while
    spinning; against one that answers in 5 ms the spins miss and the link
    stops spinning.  Data is right either way."""
    fast = servers(nbdkit(4 * MiB))
    slow = servers(nbdkit(4 * MiB, "delay-write=5ms", filters=["delay"]))
    r, w = wake_pipe

    async def main():
        async with trio.open_nursery() as nursery:
            link = await open_link(nursery, fast.uri)
            link.set_inline_wait(1000, r)
            link.set_reply_poll(1.0)  # a second: every reply comes within it
            model = bytearray(4 * MiB)
            await random_writes(link, model, seed=4, count=50)
            s = link.statistics()
            assert (s["inline_replies"], s["reply_polls"], s["polled_replies"]) == (50, 50, 50), s
            assert (s["reply_poll_us"], s["reply_poll_share"]) == (1_000_000, 1.0)
            os.write(w, b"x")  # another FUSE request waits: the spin gives way at once
            await link.write(b"y" * 4096, 0)
            model[0:4096] = b"y" * 4096
            s = link.statistics()
            assert (s["inline_replies"], s["reply_polls"], s["polled_replies"], s["reply_poll_share"]) == (50, 51, 50, 1.0)
            os.read(r, 1)
            link.set_reply_poll(0)  # off
            await link.write(b"z" * 4096, 4096)
            model[4096:8192] = b"z" * 4096
            s = link.statistics()
            assert (s["inline_replies"], s["reply_poll_us"], s["reply_polls"]) == (51, 0, 0)
            assert await link.read(0, 4 * MiB) == model
            await link.close()

            link = await open_link(nursery, slow.uri)
            link.set_inline_wait(1000, r)
            link.set_reply_poll(100e-6)  # replies take 5 ms
            for i in range(40):
                await link.write(bytes([i]) * 512, i * 512)
            s = link.statistics()
            assert (s["inline_replies"], s["polled_replies"], s["reply_poll_us"]) == (40, 0, 0), s
            assert s["reply_polls"] == 22 + 1  # until it stopped, then one probe in 16
            assert await link.read(0, 40 * 512) == b"".join(bytes([i]) * 512 for i in range(40))
            await link.close()

    run(main)
