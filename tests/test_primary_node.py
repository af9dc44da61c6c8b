"""The primary node in-process against a fake secondary (a bytearray behind
the link interface): the activity log's bound after a crash, eviction while
degraded, identity verdicts on reconnect, the resync rate limit.  Timers run
on trio's autojump clock.  The fsync test runs against a real NBD server."""

import trio
import trio.testing

from repdisk.core import meta as md
from repdisk.core.image import RawImage
from repdisk.node import state as st
from repdisk.node.primary import AL_SHIFT, PrimaryNode

EXTENT = 1 << AL_SHIFT
SIZE = 128 << 20


class FakeSecondary:
    """The data and identity a repdisk secondary would keep across connections."""

    def __init__(self, size):
        self.data = bytearray(size)
        self.node, self.disk, self.gen = "fake", None, 0
        self.links = []

    def link(self, uri):
        link = FakeLink(self, uri)
        self.links.append(link)
        return link


class FakeLink:
    def __init__(self, sec, uri):
        self.sec, self.uri, self.size = sec, uri, len(sec.data)
        self.description = None
        self.failed = None
        self.on_failure = None
        self.inflight_requests = self.inflight_bytes = 0
        self._closed = trio.Event()

    async def connect(self):
        from repdisk.edge.replica import uri_export

        s = self.sec
        self.description = md.format_identity(s.node, s.disk, s.gen, 0)  # before adopting, as the real one
        asked = md.parse_export_name(uri_export(self.uri))
        if md.secondary_verdict(s.disk, s.gen, asked) in (md.SPLIT_BRAIN, md.FOREIGN):
            raise md_refused()
        s.disk, s.gen = asked["disk"], asked["gen"]

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await self._closed.wait()

    async def write(self, buf, offset, wait=True, then=None):
        self.sec.data[offset : offset + len(buf)] = buf
        if then is not None:  # as the real link: once the request is started, before the reply
            then()
        await trio.lowlevel.checkpoint()

    async def zero(self, offset, length, wait=True, then=None):
        self.sec.data[offset : offset + length] = bytes(length)
        if then is not None:
            then()
        await trio.lowlevel.checkpoint()

    async def read(self, offset, length):
        return bytes(self.sec.data[offset : offset + length])

    async def flush(self):
        await trio.lowlevel.checkpoint()

    drain = settle = flush

    def completions(self):
        return 0

    def statistics(self):
        return {}

    def cut(self):
        from repdisk.edge.replica import ReplicaError

        self.failed = ReplicaError("cut", 104)
        self._closed.set()

    async def close(self):
        self._closed.set()


def md_refused():
    from repdisk.edge.replica import ReplicaError

    return ReplicaError("handshake: server policy prevents NBD_OPT_GO", 1)


def make_node(tmp_path, sec, **kw):
    image = RawImage.open(str(tmp_path / "pri.img"), SIZE)
    return PrimaryNode(image, uri="nbd+unix:///?socket=/nowhere", link_factory=sec.link, io_timeout=0,
                       meta_path=str(tmp_path / "pri.img.meta"), al_path=str(tmp_path / "pri.img.al"), **kw)


async def wait_state(node, state):
    while node.state != state:
        await trio.sleep(0.01)


async def run_node(node, body):
    async with trio.open_nursery() as nursery:
        await nursery.start(node.supervise)
        await body(node)
        nursery.cancel_scope.cancel()


def dirty_extents(node):
    shift = AL_SHIFT - node.geometry.shift
    return sorted({a >> shift for a, b in node.dirty.runs() for a in range(a, b, 1 << shift)})


def test_crash_costs_at_most_the_activity_log(tmp_path):
    sec = FakeSecondary(SIZE)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        for e in range(30):  # 30 extents, more than the log holds
            await node.disk_write(e * EXTENT + 100, b"x" * 5000)
        assert len(node._al) == 8 and node.al_writes == 30

    node = make_node(tmp_path, sec, al_extents=8)
    trio.run(run_node, node, body, clock=trio.testing.MockClock(autojump_threshold=0))
    assert bytes(sec.data) == node.image.pread(0, SIZE)
    # "kill -9": no shutdown.  The next start knows which extents may differ: the last 8.
    node2 = make_node(tmp_path, sec, al_extents=8)
    assert dirty_extents(node2) == list(range(22, 30))
    assert node2.dirty.count() << node2.geometry.shift == 8 * EXTENT

    async def body2(node):
        await wait_state(node, st.P_REPLICATING)
        assert node.resync_kind == md.INCREMENTAL and node.sync.done == 8 * EXTENT

    trio.run(run_node, node2, body2, clock=trio.testing.MockClock(autojump_threshold=0))


def test_writes_while_degraded_survive_a_crash_past_the_log(tmp_path):
    sec = FakeSecondary(SIZE)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        sec.links[-1].cut()
        node._link_failed("cut")
        await wait_state(node, st.P_DEGRADED)
        for e in range(20):  # evictions must put these dirty bits into the persisted bitmap
            await node.disk_write(e * EXTENT, b"y" * 4096)

    node = make_node(tmp_path, sec, al_extents=4)
    node._link_factory = _first_only(sec, sec.link)
    trio.run(run_node, node, body, clock=trio.testing.MockClock(autojump_threshold=0))
    node2 = make_node(tmp_path, sec, al_extents=4)
    assert dirty_extents(node2) == list(range(20))
    assert node2.dirty.count() << node2.geometry.shift <= 20 * EXTENT


def test_write_refused_by_the_link_is_still_written_locally(tmp_path):
    """The primary sends first and writes its own disk in the link's `then`;
    a link that fails before sending never runs it: the write must still land
    locally, its range marked dirty, and replication degrade."""
    from repdisk.edge.replica import ReplicaError

    sec = FakeSecondary(SIZE)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        link = sec.links[-1]

        async def refuse(*args, **kw):
            raise ReplicaError("connection lost before the send", 104)

        link.write = refuse
        await node.disk_write(3 * 4096 + 10, b"z" * 5000)
        assert node.image.pread(3 * 4096 + 10, 5000) == b"z" * 5000
        assert node.dirty.any(*node.geometry.blocks(3 * 4096 + 10, 5000))
        await wait_state(node, st.P_DEGRADED)

    node = make_node(tmp_path, sec)
    node._link_factory = _first_only(sec, sec.link)
    trio.run(run_node, node, body, clock=trio.testing.MockClock(autojump_threshold=0))


def _first_only(sec, real):
    """A secondary that answers once, then never again (connection refused)."""
    from repdisk.edge.replica import ReplicaError

    def factory(uri):
        if sec.links:
            raise ReplicaError("connection refused", 111)
        return real(uri)

    return factory


def test_clean_stop_keeps_the_bitmap_and_resync_rate_is_kept(tmp_path):
    sec = FakeSecondary(SIZE)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        t0 = trio.current_time()
        assert node.sync.done == SIZE
        # 128 MiB at 64 MiB/s: at least 2 s on the (mock) clock.  (No upper bound:
        # the autojump clock also jumps while the sync waits for its reader thread.)
        assert t0 - start[0] >= 1.99
        await node.shutdown()

    start = [0.0]

    async def main(node):
        start[0] = trio.current_time()
        await run_node(node, body)

    node = make_node(tmp_path, sec, resync_rate=64 << 20)
    trio.run(main, node, clock=trio.testing.MockClock(autojump_threshold=0))
    m = md.load_meta(str(tmp_path / "pri.img.meta"))
    assert m.clean and m.disk == sec.disk and m.gen == m.peer_gen == sec.gen
    node2 = make_node(tmp_path, sec)
    assert not node2.dirty.any()


def test_metadata_written_during_a_sync_keeps_what_is_not_yet_sent(tmp_path):
    """The sync clears dirty bits before it sends the blocks: a metadata write
    (state change, eviction) in between must still list them."""
    sec = FakeSecondary(SIZE)
    gate = trio.Event()

    class SlowLink(FakeLink):
        async def write(self, buf, offset, wait=True):
            await gate.wait()
            await super().write(buf, offset, wait)

        zero = FakeLink.zero

    (tmp_path / "pri.img").write_bytes(b"\x01" * SIZE)  # data, so the sync sends writes
    node = make_node(tmp_path, sec)
    node._link_factory = lambda uri: SlowLink(sec, uri)
    persisted = []

    async def main(node):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.supervise)
            while node._sync_window is None:
                await trio.sleep(0.01)
            node._persist()
            persisted.append(md.load_meta(str(tmp_path / "pri.img.meta")))
            gate.set()
            await wait_state(node, st.P_REPLICATING)
            nursery.cancel_scope.cancel()

    trio.run(main, node, clock=trio.testing.MockClock(autojump_threshold=0))
    bits = persisted[0].bitmap
    assert bits.count() == len(bits) == persisted[0].nbits  # everything is still owed to the secondary
    assert bytes(sec.data) == b"\x01" * SIZE


def test_the_checkpoint_epoch_survives_a_restart(tmp_path):
    """The epoch is persisted with the metadata and read back, not reset."""
    sec = FakeSecondary(SIZE)
    node = make_node(tmp_path, sec)
    node.epoch = 7
    node._persist()
    node.image.close()
    again = make_node(tmp_path, sec)
    assert again.epoch == 7 and again.status()["epoch"] == 7
    again.image.close()


def test_fsync_runs_the_local_fsync_while_the_secondary_flushes(tmp_path):
    """disk.img's fsync sends NBD FLUSH and fsyncs the local image while the
    flush is in flight (the server holds it 1 s), not one after the other; a
    failed local fsync still fails the call, after the flush, and leaves
    replication running."""
    import errno
    import time

    import pytest
    from test_replica_link import Server

    from repdisk.core.errors import IOFailure

    # nbdkit's delay filter cannot hold flushes: a shell plugin sleeps in its flush
    server = Server(["nbdkit", "--exit-with-parent", "-f", "eval", f"get_size=echo {SIZE}",
                     "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                     "pwrite=cat >/dev/null", "can_flush=exit 0", "flush=sleep 1"])
    try:
        image = RawImage.open(str(tmp_path / "pri.img"), SIZE)
        node = PrimaryNode(image, uri=server.uri, io_timeout=0, assume_synced=True,
                           meta_path=str(tmp_path / "pri.img.meta"), al_path=str(tmp_path / "pri.img.al"))
        real_fsync = image.fsync
        seen = []

        def flushes():
            f = node.link.statistics()["flush"]
            return f["submitted"], f["completed"]

        def watching_fsync():  # runs in a worker thread
            deadline = time.monotonic() + 10
            while flushes()[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.002)
            seen.append(flushes())
            real_fsync()

        def failing_fsync():
            seen.append(flushes())
            raise IOFailure(f"fsync {image.path}", OSError(errno.EIO, "Input/output error"))

        async def body(node):
            await wait_state(node, st.P_REPLICATING)
            await node.disk_write(4096, b"x" * 8192)
            image.fsync = watching_fsync
            await node.disk_fsync()
            assert seen == [(1, 0)]  # the local fsync ran with the flush sent, not yet answered
            assert flushes() == (1, 1)
            image.fsync = failing_fsync
            with pytest.raises(IOFailure) as raised:
                await node.disk_fsync()
            assert raised.value.errno == errno.EIO
            assert flushes() == (2, 2) and node.state == st.P_REPLICATING

        trio.run(run_node, node, body)
    finally:
        server.stop()


def test_misses_at_once_share_one_log_write(tmp_path):
    """Group commit: writes to new extents that arrive while the log is being
    stored wait for the next store together, not one store each."""
    sec = FakeSecondary(SIZE)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        before = node.al_writes
        async with trio.open_nursery() as n:
            for e in range(12):
                n.start_soon(node.disk_write, e * EXTENT + 7, b"g" * 4096)
        assert 1 <= node.al_writes - before <= 2
        with open(node.al_path, "rb") as f:
            assert set(md.decode_al(f.read())[1]) == set(range(12))
        for e in range(12):
            assert node.image.pread(e * EXTENT + 7, 4096) == b"g" * 4096

    node = make_node(tmp_path, sec, al_extents=64)
    trio.run(run_node, node, body, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_extent_leaves_the_log_only_once_its_data_is_on_disk(tmp_path):
    """A host crash loses what the page cache held.  An extent dropped from the
    log is not resynced after a crash, so the primary's image must hold its
    writes on disk (datasync) before the log is stored without it; a full log
    evicts a batch at a time so that flush is rare."""
    sec = FakeSecondary(SIZE)
    events = []  # ("write", extent) | ("sync",) | ("store", extents)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        real_sync, real_store = node.image.datasync, node._al_store
        node.image.datasync = lambda: (events.append(("sync",)), real_sync())
        node._al_store = lambda data: (events.append(("store", set(md.decode_al(data)[1]))), real_store(data))
        rng = __import__("random").Random(5)
        for i in range(400):
            e = rng.randrange(SIZE // EXTENT)
            await node.disk_write(e * EXTENT + rng.randrange(EXTENT - 4096), b"d" * 4096)
            events.append(("write", e))
        assert node.al_evictions > 0

    node = make_node(tmp_path, sec, al_extents=16)  # batches of 1
    node._al_batch = 4
    trio.run(run_node, node, body, clock=trio.testing.MockClock(autojump_threshold=0))
    unsynced, stored, syncs = set(), set(), 0
    for ev in events:
        if ev[0] == "write":
            assert ev[1] in stored  # the log held the extent before the write
            unsynced.add(ev[1])
        elif ev[0] == "sync":
            unsynced.clear()
            syncs += 1
        else:
            assert not (stored - ev[1]) & unsynced, "an extent left the log with its writes only in the page cache"
            stored = ev[1]
            assert len(stored) <= 16 + 1
    assert 0 < syncs < 400 // 4


def test_a_log_kept_in_the_page_cache_is_never_flushed(tmp_path, monkeypatch):
    """--al-durability process: the log is written but not fdatasynced, and
    evictions do not flush the image; a restart on the same boot still
    resyncs only the log's extents (the page cache survived)."""
    import os as _os

    sec = FakeSecondary(SIZE)
    syncs = []
    real = _os.fdatasync
    monkeypatch.setattr(_os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        node.image.datasync = lambda: syncs.append("image")
        for e in range(30):
            await node.disk_write(e * EXTENT + 100, b"p" * 5000)
        assert node.al_writes >= 30 and node.al_evictions > 0
        assert node.status()["activity_log"]["durability"] == "process"

    node = make_node(tmp_path, sec, al_extents=8, al_durability="process")
    trio.run(run_node, node, body, clock=trio.testing.MockClock(autojump_threshold=0))
    assert syncs == []
    assert not md.load_meta(str(tmp_path / "pri.img.meta")).al_host
    node2 = make_node(tmp_path, sec, al_extents=8, al_durability="process")  # "kill -9", same boot
    assert dirty_extents(node2) == list(range(22, 30))


def test_a_log_store_that_fails_leaves_the_extent_out_of_the_log(tmp_path):
    """When the activity log cannot be written, the write that needed it fails
    and touches neither disk, and the extent is not taken as logged: the next
    write there stores the log again instead of going ahead unlogged."""
    import os as _os

    import pytest

    from repdisk.core.errors import IOFailure

    sec = FakeSecondary(SIZE)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        good = node._al_fd
        node._al_fd = _os.open(node.al_path, _os.O_RDONLY)  # a real failure: pwrite gets EBADF
        try:
            with pytest.raises(IOFailure, match="activity log"):
                await node.disk_write(3 * EXTENT + 512, b"x" * 4096)
            with pytest.raises(IOFailure):  # still not logged: it tries (and fails) again
                await node.disk_write(3 * EXTENT + 512, b"y" * 4096)
        finally:
            _os.close(node._al_fd)
            node._al_fd = good
        assert node.image.pread(3 * EXTENT + 512, 4096) == bytes(4096)
        assert sec.data[3 * EXTENT + 512 : 3 * EXTENT + 512 + 4096] == bytes(4096)
        await node.disk_write(3 * EXTENT + 512, b"z" * 4096)
        with open(node.al_path, "rb") as f:
            assert 3 in md.decode_al(f.read())[1]
        assert node.image.pread(3 * EXTENT + 512, 4096) == b"z" * 4096

    node = make_node(tmp_path, sec, al_extents=64)
    trio.run(run_node, node, body, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_eviction_whose_image_flush_fails_keeps_its_extents_in_the_log(tmp_path):
    """An extent leaves the log only once its data is on disk: when the image
    flush of an eviction fails, the evicted extents stay in the stored log
    (and in the node's view of it), and the write that needed room fails."""
    import errno

    import pytest

    from repdisk.core.errors import IOFailure

    sec = FakeSecondary(SIZE)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        for e in range(4):
            await node.disk_write(e * EXTENT, b"a" * 4096)
        real = node.image.datasync

        def failing():
            raise IOFailure("datasync", OSError(errno.EIO, "Input/output error"))

        node.image.datasync = failing
        with pytest.raises(IOFailure):
            await node.disk_write(9 * EXTENT, b"b" * 4096)
        with open(node.al_path, "rb") as f:
            assert set(md.decode_al(f.read())[1]) >= {0, 1, 2, 3}
        assert set(node._al) == {0, 1, 2, 3}
        node.image.datasync = real
        await node.disk_write(9 * EXTENT, b"b" * 4096)
        with open(node.al_path, "rb") as f:
            held = set(md.decode_al(f.read())[1])
        assert 9 in held and len(held) <= 4 and node.al_evictions == 1

    node = make_node(tmp_path, sec, al_extents=4)
    node._al_batch = 1
    trio.run(run_node, node, body, clock=trio.testing.MockClock(autojump_threshold=0))
