"""The primary node in-process against a real repdisk secondary (its node,
copy-before-write stack and NBD server, served from a thread with a trio
loop of its own; no FUSE view: the tests read its replica image) over a
unix socket and the real replica link: the activity log's bound after a
crash, eviction while degraded, identity verdicts on reconnect, the resync
rate limit.  The fsync test runs against nbdkit, whose shell plugin can hold
a flush."""

import os
import re
import shutil
import sys
import tempfile
import threading

import pytest
import trio
import trio.testing
from nbd_helpers import ServerThread

from repdisk.core import meta as md
from repdisk.core.image import RawImage
from repdisk.core.stack import SecondaryStack
from repdisk.node import state as st
from repdisk.node.primary import AL_SHIFT, PrimaryNode
from repdisk.node.secondary import SecondaryNode
from repdisk.run import secondary_server

EXTENT = 1 << AL_SHIFT
SIZE = 128 << 20


class RealSecondary:
    """A repdisk secondary: what `repdisk secondary` assembles (run.py), minus
    the FUSE view.  `stop()` closes the connection and the listening socket
    (the primary sees its link fail, then connection refused; it blocks:
    from trio, call it in a thread)."""

    def __init__(self, tmp_path, size):
        d = tmp_path / "sec"
        d.mkdir()
        self.image = RawImage.open(str(d / "sec.img"), size)
        self.stack = SecondaryStack(self.image, str(d / "sec.hidden"), str(d / "sec.active"), 4096)
        self.node = SecondaryNode(self.stack, listen="", meta_path=str(d / "sec.meta"))
        self._dir = tempfile.mkdtemp(prefix="pn")  # unix socket paths are short
        self.uri = f"nbd+unix:///?socket={self._dir}/nbd.sock"
        self.thread = None
        self.start()

    def start(self):
        node = self.node
        server = secondary_server(node)
        self.thread = ServerThread(server, f"unix:{self._dir}/nbd.sock").start()

    def stop(self):
        if self.thread is not None:
            self.thread.stop()
            self.thread = None

    def close(self):
        self.stop()
        self.stack.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def data(self) -> bytes:
        """The replica: what the primary has replicated."""
        return self.image.pread(0, self.image.size)


@pytest.fixture
def sec(tmp_path):
    secondary = RealSecondary(tmp_path, SIZE)
    yield secondary
    secondary.close()


def make_node(tmp_path, sec, **kw):
    """A primary with a durable activity log; replica first off unless asked
    (most tests here are about the log's own path, which async mode, a
    degraded primary and --replica-first off take)."""
    image = RawImage.open(str(tmp_path / "pri.img"), SIZE)
    kw.setdefault("replica_first", False)
    return PrimaryNode(image, uri=sec.uri, io_timeout=0,
                       meta_path=str(tmp_path / "pri.img.meta"), al_path=str(tmp_path / "pri.img.al"), **kw)


async def until(cond, timeout=20):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


async def wait_state(node, state, timeout=20):
    await until(lambda: node.state == state, timeout)


async def run_node(node, body):
    async with trio.open_nursery() as nursery:
        await nursery.start(node.supervise)
        await body(node)
        nursery.cancel_scope.cancel()


def dirty_extents(node):
    shift = AL_SHIFT - node.geometry.shift
    return sorted({a >> shift for a, b in node.dirty.runs() for a in range(a, b, 1 << shift)})


def test_crash_costs_at_most_the_activity_log(tmp_path, sec):

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        for e in range(30):  # 30 extents, more than the log holds
            await node.disk_write(e * EXTENT + 100, b"x" * 5000)
        assert len(node._al) == 8 and node.al_writes == 30

    node = make_node(tmp_path, sec, al_extents=8)
    trio.run(run_node, node, body)
    assert sec.data == node.image.pread(0, SIZE)
    # "kill -9": no shutdown.  The next start knows which extents may differ: the last 8.
    node2 = make_node(tmp_path, sec, al_extents=8)
    assert dirty_extents(node2) == list(range(22, 30))
    assert node2.dirty.count() << node2.geometry.shift == 8 * EXTENT

    async def body2(node):
        await wait_state(node, st.P_REPLICATING)
        assert node.resync_kind == md.INCREMENTAL and node.sync.done == 8 * EXTENT

    trio.run(run_node, node2, body2)


def test_writes_while_degraded_survive_a_crash_past_the_log(tmp_path, sec):

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await trio.to_thread.run_sync(sec.stop)  # the connection ends; reconnecting is refused from now on
        await wait_state(node, st.P_DEGRADED)
        for e in range(20):  # evictions must put these dirty bits into the persisted bitmap
            await node.disk_write(e * EXTENT, b"y" * 4096)

    node = make_node(tmp_path, sec, al_extents=4)
    trio.run(run_node, node, body)
    node2 = make_node(tmp_path, sec, al_extents=4)
    assert dirty_extents(node2) == list(range(20))
    assert node2.dirty.count() << node2.geometry.shift <= 20 * EXTENT


@pytest.mark.parametrize("replica_first", [False, True], ids=["parallel", "replica-first"])
def test_write_refused_by_the_link_is_still_written_locally(tmp_path, sec, replica_first):
    """The primary sends first and writes its own disk in the link's `then`;
    a link that fails before sending never runs it: the write must still land
    locally, its range marked dirty, replication degrade, and the range reach
    the secondary with the resync once the primary has reconnected."""
    from repdisk.edge.replica import ReplicaError

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        link = node.link

        async def refuse(*args, **kw):  # the failure a send hits when the connection just went
            raise ReplicaError("connection lost before the send", 104)

        link.write = refuse
        await node.disk_write(3 * 4096 + 10, b"z" * 5000)
        assert node.writes_replica_first == int(replica_first)
        assert node.image.pread(3 * 4096 + 10, 5000) == b"z" * 5000
        assert node.state == st.P_DEGRADED
        with trio.fail_after(20):
            while node.link in (None, link) or node.state != st.P_REPLICATING:
                await trio.sleep(0.01)
        assert node.resync_kind == md.INCREMENTAL and 0 < node.sync.done <= 3 * 4096
        assert sec.data[3 * 4096 + 10 : 3 * 4096 + 5010] == b"z" * 5000

    node = make_node(tmp_path, sec, replica_first=replica_first)
    trio.run(run_node, node, body)


def test_clean_stop_keeps_the_bitmap_and_resync_rate_is_kept(tmp_path, sec):

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        t0 = trio.current_time()
        assert node.sync.done == SIZE
        # 128 MiB at 64 MiB/s: at least 2 s (the first step is not waited for).
        assert t0 - start[0] >= 1.8
        await node.shutdown()

    start = [0.0]

    async def main(node):
        start[0] = trio.current_time()
        await run_node(node, body)

    node = make_node(tmp_path, sec, resync_rate=64 << 20)
    trio.run(main, node)
    m = md.load_meta(str(tmp_path / "pri.img.meta"))
    assert m.clean and m.disk == sec.node.meta.disk and m.gen == m.peer_gen == sec.node.meta.gen
    node2 = make_node(tmp_path, sec)
    assert not node2.dirty.any()


def test_metadata_written_during_a_sync_keeps_what_is_not_yet_sent(tmp_path, sec):
    """The sync clears dirty bits before it sends the blocks: a metadata write
    (state change, eviction) in between must still list them."""
    (tmp_path / "pri.img").write_bytes(b"\x01" * SIZE)  # data, so the sync sends writes
    node = make_node(tmp_path, sec, resync_rate=64 << 20)  # ~2 s: time to catch it mid-window
    persisted = []

    async def main(node):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.supervise)
            with trio.fail_after(20):
                while node._sync_window is None:
                    assert node.state != st.P_REPLICATING, "the sync ended before a window was caught"
                    await trio.sleep(0.001)
            node._persist()  # no await since the check: the window is in flight
            persisted.append(md.load_meta(str(tmp_path / "pri.img.meta")))
            await wait_state(node, st.P_REPLICATING)
            nursery.cancel_scope.cancel()

    trio.run(main, node)
    bits = persisted[0].bitmap
    assert bits.count() == len(bits) == persisted[0].nbits  # everything is still owed to the secondary
    assert sec.data == b"\x01" * SIZE


def test_the_checkpoint_epoch_survives_a_restart(tmp_path, sec):
    """The epoch is persisted with the metadata and read back, not reset."""
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


def test_an_fsync_while_the_link_fails_still_fsyncs_locally_and_succeeds(tmp_path):
    """The flush protocol first waits for the writes sent before; if the link
    fails during that wait, the VM's fsync still fsyncs the local image and
    succeeds (replication degrades, not the VM)."""
    from test_replica_link import Server

    hold = tmp_path / "hold"
    server = Server(["nbdkit", "--exit-with-parent", "-f", "eval", f"get_size=echo {SIZE}",
                     "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                     f"pwrite=cat >/dev/null; while [ -e {hold} ]; do sleep 0.01; done; echo EIO >&2; exit 1",
                     "can_flush=exit 0", "flush=exit 0"])
    try:
        image = RawImage.open(str(tmp_path / "pri.img"), SIZE)
        node = PrimaryNode(image, uri=server.uri, io_timeout=0, assume_synced=True,
                           meta_path=str(tmp_path / "pri.img.meta"), al_path=str(tmp_path / "pri.img.al"))
        fsyncs = []
        real_fsync = image.fsync
        image.fsync = lambda: (fsyncs.append(1), real_fsync())

        async def body(node):
            await wait_state(node, st.P_REPLICATING)
            hold.touch()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.disk_write, 4096, b"x" * 4096)
                with trio.fail_after(10):
                    while not node.link.inflight_requests:
                        await trio.sleep(0.005)
                done = []

                async def fsync():
                    await node.disk_fsync()
                    done.append(1)

                nursery.start_soon(fsync)
                with trio.fail_after(10):
                    while not node._flush_lock.locked():  # the flush has begun
                        await trio.sleep(0.005)
                assert not done  # waiting for the write sent before it
                hold.unlink()  # the write fails: the link with it
            assert done and fsyncs and node.state == st.P_DEGRADED
            assert image.pread(4096, 4096) == b"x" * 4096 and node.dirty.any(1, 2)

        trio.run(run_node, node, body)
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["async", "sync-replica-first"])
def test_the_local_fsync_waits_for_the_link_only_behind_a_replica_first_write(tmp_path, sec, mode):
    """The VM's fsync starts our own fsync at once when every request on the
    link already wrote our page cache (async mode: the write is on our disk
    before it is sent), so our disk writes back while the queue drains.  A
    replica-first write writes our disk only once the secondary answered:
    behind one, our fsync waits until the link settled, and then covers it."""
    at = 5 * EXTENT + 4096
    data = b"q" * 8192
    real, release = sec.stack.primary_write, threading.Event()

    def held_write(buf, offset):
        if offset == at:
            release.wait(10)
        real(buf, offset)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()
        image, real_fsync, seen = node.image, node.image.fsync, []

        def writes_on_the_link():
            w = node.link.statistics()["write"]
            return w["submitted"] - w["completed"]

        def watching_fsync():  # in a worker thread
            seen.append((writes_on_the_link(), bytes(image.pread(at, len(data)))))
            real_fsync()

        image.fsync = watching_fsync
        sec.stack.primary_write = held_write
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.disk_write, at, data)  # async: returns once sent
            await until(lambda: writes_on_the_link() == 1)
            assert bool(node._rf_busy) == (mode != "async")
            nursery.start_soon(node.disk_fsync)
            await until(node._flush_lock.locked)
            if mode == "async":
                await until(lambda: seen)
                assert seen == [(1, data)]  # started with the write still on the link
            else:
                # every task of ours blocked: the flush waits (for the link, or, wrongly, for our fsync's thread)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert not seen, "our fsync started before the replica-first write reached our disk"
            release.set()
        assert seen == [(1 if mode == "async" else 0, data)], seen
        assert sec.data[at:at + len(data)] == data and node.state == st.P_REPLICATING

    node = make_node(tmp_path, sec, mode=mode.split("-")[0], replica_first=mode != "async", flush_interval=30)
    trio.run(run_node, node, body)


def test_misses_at_once_share_one_log_write(tmp_path, sec):
    """Group commit: writes to new extents that arrive while the log is being
    stored wait for the next store together, not one store each."""

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
    trio.run(run_node, node, body)


def test_an_extent_leaves_the_log_only_once_its_data_is_on_disk(tmp_path, sec):
    """A host crash loses what the page cache held.  An extent dropped from the
    log is not resynced after a crash, so the primary's image must hold its
    writes on disk (datasync) before the log is stored without it; a full log
    evicts a batch at a time so that flush is rare."""
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
    trio.run(run_node, node, body)
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


def test_a_log_kept_in_the_page_cache_is_never_flushed(tmp_path, sec, monkeypatch):
    """--al-durability process: the log is written but not fdatasynced, and
    evictions do not flush the image; a restart on the same boot still
    resyncs only the log's extents (the page cache survived)."""
    import os as _os

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
    trio.run(run_node, node, body)
    assert syncs == []
    assert not md.load_meta(str(tmp_path / "pri.img.meta")).al_host
    node2 = make_node(tmp_path, sec, al_extents=8, al_durability="process")  # "kill -9", same boot
    assert dirty_extents(node2) == list(range(22, 30))


def test_a_log_store_that_fails_leaves_the_extent_out_of_the_log(tmp_path, sec):
    """When the activity log cannot be written, the write that needed it fails
    and touches neither disk, and the extent is not taken as logged: the next
    write there stores the log again instead of going ahead unlogged."""
    import os as _os

    import pytest

    from repdisk.core.errors import IOFailure


    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        good = node._al_fd
        node._al_fd = _os.open(node.al_path, _os.O_RDONLY)  # a real failure: pwrite gets EBADF
        try:
            with pytest.raises(IOFailure, match="activity log"):
                await node.disk_write(3 * EXTENT + 512, b"x" * 4096)
            with pytest.raises(IOFailure):  # still not logged: it tries (and fails) again
                await node.disk_write(3 * EXTENT + 512, b"y" * 4096)
            failed = []

            async def write(data):
                try:
                    await node.disk_write(3 * EXTENT + 512, data)
                except IOFailure:
                    failed.append(data)

            async with trio.open_nursery() as n:  # the second waits for the first's store, then tries its own
                n.start_soon(write, b"1" * 4096)
                n.start_soon(write, b"2" * 4096)
            assert sorted(failed) == [b"1" * 4096, b"2" * 4096]
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
    trio.run(run_node, node, body)


def test_an_eviction_whose_image_flush_fails_keeps_its_extents_in_the_log(tmp_path, sec):
    """An extent leaves the log only once its data is on disk: when the image
    flush of an eviction fails, the evicted extents stay in the stored log
    (and in the node's view of it), and the write that needed room fails."""
    import errno

    import pytest

    from repdisk.core.errors import IOFailure


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
    trio.run(run_node, node, body)


def test_an_eviction_that_cannot_write_the_bitmap_keeps_its_extents_in_the_log(tmp_path, sec):
    """While degraded, an extent's dirty bits must be in the persisted bitmap
    before it leaves the log.  When the metadata cannot be written (here its
    directory is gone: ENOENT), the eviction fails, the write that needed room
    fails, and nothing leaves the log; once the metadata can be written again,
    a crash still resyncs every degraded write."""
    from repdisk.core.errors import IOFailure

    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await trio.to_thread.run_sync(sec.stop)
        await wait_state(node, st.P_DEGRADED)
        for e in range(4):
            await node.disk_write(e * EXTENT, b"d" * 4096)
        shutil.rmtree(meta_dir)
        with pytest.raises(IOFailure, match="cannot write metadata"):
            await node.disk_write(7 * EXTENT, b"e" * 4096)
        assert set(node._al) == {0, 1, 2, 3}
        with open(node.al_path, "rb") as f:
            assert set(md.decode_al(f.read())[1]) == {0, 1, 2, 3}
        meta_dir.mkdir()
        await node.disk_write(7 * EXTENT, b"e" * 4096)
        assert 7 in node._al and node.al_evictions == 1

    image = RawImage.open(str(tmp_path / "pri.img"), SIZE)
    kw = dict(meta_path=str(meta_dir / "pri.img.meta"), al_path=str(tmp_path / "pri.img.al"), al_extents=4)
    node = PrimaryNode(image, uri=sec.uri, io_timeout=0, **kw)
    node._al_batch = 1
    trio.run(run_node, node, body)
    again = PrimaryNode(RawImage.open(str(tmp_path / "pri.img"), SIZE), uri=sec.uri, io_timeout=0, **kw)  # "kill -9"
    assert {0, 1, 2, 3, 7} <= set(dirty_extents(again))


# ---- replica first (sync mode): the log's flush off the write path ---------------------------


def snapshot_files(tmp_path) -> dict:
    """What a host crash would leave of the primary's files right now, if the
    last flush of each was now: their bytes."""
    out = {}
    for name in ("pri.img", "pri.img.meta", "pri.img.al"):
        with open(tmp_path / name, "rb") as f:
            out[name] = f.read()
    return out


def restore_files(tmp_path, files: dict) -> None:
    for name, data in files.items():
        with open(tmp_path / name, "r+b") as f:
            f.truncate(0)
            f.write(data)


def test_replica_first_writes_do_not_wait_for_the_log_and_keep_both_disks_equal(tmp_path, sec):
    """Writes into extents the log does not hold go to the secondary first
    (no log flush on their path); the log gets the extents in the background,
    and later writes there take the parallel path.  Concurrent, overlapping
    writes of random data end equal on both sides."""
    import random

    rnd = random.Random(4)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        assert node.status()["replica_first"]["active"]
        for e in range(12):
            await node.disk_write(e * EXTENT + 512, b"a" * 4096)
        assert node.writes_replica_first == 12 and not node._al and not node._al_bg  # written once: not logged
        for e in range(12):
            await node.disk_write(e * EXTENT + 4096, b"a" * 4096)
        assert node.writes_replica_first == 24
        with trio.fail_after(10):
            while len(node._al) < 12 or node._al_bg:  # written again: stored in the background
                await trio.sleep(0.01)
        assert node.al_writes < 12 + 1  # group commit: misses shared stores
        # Not at 8192, where the write before it ended: that continues a
        # stream, and log-ahead would put extents 12-15 into the log too.
        await node.disk_write(3 * EXTENT + 16384, b"b" * 4096)
        assert node.writes_replica_first == 24  # a logged extent: the parallel path

        async def writer(seed):
            r = random.Random(seed)
            for _ in range(150):
                e = r.randrange(16)  # 12 logged, 4 not: both paths, overlapping
                off = e * EXTENT + r.randrange(0, 64 << 10)
                await node.disk_write(off, r.randbytes(r.choice((1, 512, 4096, 70000))))

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(writer, rnd.random())
        await node.checkpoint()
        assert node.writes_replica_first > 24

    node = make_node(tmp_path, sec, replica_first=True)
    trio.run(run_node, node, body)
    assert sec.data == node.image.pread(0, SIZE)


def test_the_secondary_forgets_a_write_after_three_flushes(tmp_path, sec):
    """The received map keeps a range until the primary's third flush after
    it (recvmap: the current generation and the two before)."""

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_write(5 * EXTENT, b"c" * 4096)
        received = sec.node.received
        for left in (1, 1, 1, 0):
            assert (received.count() > 0) == bool(left)
            await node.disk_fsync()
        assert node.flushes >= 3

    # assume_synced: nothing to sync, so the map holds only the write above
    node = make_node(tmp_path, sec, replica_first=True, flush_interval=0, assume_synced=True)
    trio.run(run_node, node, body)


def test_the_timer_flushes_until_the_received_map_is_empty(tmp_path, sec):

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_write(5 * EXTENT, b"c" * 4096)
        with trio.fail_after(10):
            while sec.node.received.count() or node._flush_lock.locked():  # the last flush finished too
                await trio.sleep(0.02)
        flushes = node.flushes
        await trio.sleep(0.3)
        assert node.flushes == flushes  # and then it stops

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=0.05)
    trio.run(run_node, node, body)


def test_a_hot_working_set_is_not_flushed_again_and_again(tmp_path, sec):
    """Replica-first writes that stay under the byte budget wait for the
    interval; past the budget (FLUSH_BYTES of map grains) the flush comes at
    once."""
    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        with trio.fail_after(10):
            while node._flush_lock.locked():
                await trio.sleep(0.01)
        flushes = node.flushes
        await node.disk_write(5 * EXTENT, b"c" * 4096)
        await trio.sleep(0.6)
        assert node.flushes == flushes  # 64 KiB of map, under the budget, a 30 s interval: no flush yet
        for e in range(6, 10):  # 4 more grains: past the budget
            await node.disk_write(e * EXTENT, b"d" * 4096)
        with trio.fail_after(5):
            while node.flushes == flushes:
                await trio.sleep(0.02)

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30, flush_bytes=4 << 16)
    trio.run(run_node, node, body)


@pytest.mark.parametrize("secondary_restarts", [False, True], ids=["same-secondary-run", "secondary-restarted"])
def test_a_host_crash_resyncs_what_the_secondary_received(tmp_path, sec, secondary_restarts):
    """A crash of the primary's host, simulated: its image, log and metadata
    go back to their state at the last flush, while the secondary keeps the
    writes sent since (replica first: into extents the log did not hold).
    The next start reads the secondary's received map and resyncs those
    ranges, so both disks are equal again; if the secondary restarted in
    between (its map is gone), it does a full sync."""
    import random

    r = random.Random(7)

    async def before(node):
        await wait_state(node, st.P_REPLICATING)
        for e in range(4):
            await node.disk_write(e * EXTENT, r.randbytes(8192))
        with trio.fail_after(10):
            while node._al_bg:
                await trio.sleep(0.01)
        for _ in range(3):  # the map forgets the initial sync and the writes above
            await node.disk_fsync()
        assert sec.node.received.count() == 0
        node.crash_files = snapshot_files(tmp_path)
        for e in range(2, 20):  # new extents (replica first) and logged ones
            await node.disk_write(e * EXTENT + 4096, r.randbytes(3 * 4096 + 100))
        await node.checkpoint()  # the secondary has them all

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=0)
    trio.run(run_node, node, before)
    restore_files(tmp_path, node.crash_files)  # the host crashed: the page cache is gone
    lost = node.image.pread(0, SIZE)
    assert lost != sec.data  # the crash lost writes the secondary has
    _, logged = md.decode_al(node.crash_files["pri.img.al"])
    assert not set(range(4, 20)) & set(logged)  # ... in extents the log never held
    if secondary_restarts:
        sec.stop()
        sec.node = SecondaryNode(sec.stack, listen="", meta_path=sec.node.meta_path)  # a new run
        sec.start()

    async def after(node):
        await wait_state(node, st.P_REPLICATING)
        await node.checkpoint()
        merge = node.status()["replica_first"]["after_unclean_stop"]
        if secondary_restarts:
            assert merge.startswith("full sync") and node.sync.done == SIZE
        else:
            assert "resynced" in merge and 16 * (64 << 10) <= node.sync.done < 24 * EXTENT

    node2 = make_node(tmp_path, sec, replica_first=True, flush_interval=0)
    trio.run(run_node, node2, after)
    assert node2.image.pread(0, SIZE) == lost
    assert sec.data == lost


def test_the_secondary_serves_its_received_map_read_only(tmp_path, sec):
    """The map is a side export: nbdinfo shows it read-only with the run in
    its description; writing to it is refused; its bits are the ranges the
    secondary received."""
    import subprocess

    from repdisk.edge.replica import fetch_export, with_export

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_write(3 * EXTENT + 70000, b"d" * 100)
        await node.disk_write(SIZE - 10, b"e" * 10)

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=0, assume_synced=True)
    trio.run(run_node, node, body)
    uri = with_export(sec.uri, md.RECEIVED_EXPORT)
    info = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, check=True)
    assert '"is_read_only": true' in info.stdout and f"run={sec.node.run}" in info.stdout
    # nbdsh runs "python3 -m nbd": ours (the venv sees Debian's python3-libnbd)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"}
    w = subprocess.run(["nbdsh", "-u", uri, "-c", "h.pwrite(b'x', 0)"], capture_output=True, text=True, env=env)
    assert w.returncode != 0 and "Operation not permitted" in w.stderr
    desc, data = fetch_export(uri)
    got = md.parse_received(desc)
    assert got["run"] == sec.node.run and len(data) * 8 >= got["bits"] == SIZE >> 16
    from bitarray import bitarray

    bits = bitarray(endian="little")
    bits.frombytes(data)
    assert list(bits.search(1)) == [(3 * EXTENT + 65536) >> 16, (SIZE >> 16) - 1]


def test_a_sequential_stream_logs_the_next_extent_ahead_and_keeps_the_parallel_path(tmp_path, sec):
    """Replica first writes the local image only after the round trip; a
    stream of 1 MiB writes puts the extents after its own into the log in
    the background, so past its first extent it finds each one logged."""

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        chunk = 1 << 20
        for i in range(8 * EXTENT // chunk):
            await node.disk_write(16 * EXTENT + i * chunk, bytes([i + 1]) * chunk)
            with trio.fail_after(10):  # a stream whose pace leaves room for the background log store
                while node._al_bg:
                    await trio.sleep(0.002)
        assert node.writes_replica_first <= 4  # the first extent's writes at most
        assert set(range(17, 25)) <= set(node._al)
        await node.checkpoint()

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=0)
    trio.run(run_node, node, body)
    assert sec.data == node.image.pread(0, SIZE)


@pytest.mark.parametrize("mode,al_extents", [("async", 1024), ("sync-replica-first-off", 1024), ("async", 8)])
def test_a_stream_waits_for_the_log_only_in_its_first_extent(tmp_path, sec, mode, al_extents):
    """Without replica first (async mode, --replica-first off) a write into
    an extent the log does not hold waits for the log's store (an
    fdatasync).  A sequential stream puts the LOG_AHEAD extents after its
    own into the log in the background, so only its first extent waits;
    status counts the writes that waited.  A log of 8 extents takes 2
    ahead: the extents the stream writes stay in it."""
    from repdisk.node.primary import LOG_AHEAD

    ahead = min(LOG_AHEAD, al_extents // 4)

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        chunk, base = 1 << 20, 16 * EXTENT
        waits = node.status()["activity_log"]["waits"]
        for i in range(12 * EXTENT // chunk):
            await node.disk_write(base + i * chunk, bytes([i + 1]) * chunk)
            if i == 1:  # the first write that continues one: the window is asked for at once
                assert set(node._al) | node._al_bg == set(range(16, min(17 + ahead, SIZE // EXTENT)))  # the disk's end caps it
            await until(lambda: not node._al_bg)  # a pace that leaves room for the background store
            assert max(node._al) <= 16 + (i >> 2) + ahead
        assert node.status()["activity_log"]["waits"] - waits == 1  # the first extent's first write
        assert node.writes_replica_first == 0
        await node.checkpoint()

    node = make_node(tmp_path, sec, mode=mode.split("-")[0], replica_first=False, flush_interval=0,
                     al_extents=al_extents)
    trio.run(run_node, node, body)
    assert sec.data == node.image.pread(0, SIZE)


def _failing(image, method: str, failures: int, syscall: str = ""):
    """`image.method` (an image's fsync or datasync) fails with ENOSPC
    `failures` times, then works: what this machine's ext4 does now and then
    to a heavily fragmented sparse image (issue 4's notes).  Returns the
    list of calls made (True: failed)."""
    import errno

    from repdisk.core.errors import IOFailure

    real, calls = getattr(image, method), []

    def call():
        calls.append(len(calls) < failures)
        if calls[-1]:
            raise IOFailure(f"{syscall or method} {image.path}", OSError(errno.ENOSPC, "No space left on device"))
        real()

    setattr(image, method, call)
    return calls


def _failing_fsync(node, failures: int):
    return _failing(node.image, "fsync", failures)


def _losing_fsync(sec, lost: int, length: int):
    """The secondary's fsync fails once, and its "kernel" drops
    [lost, lost+length) of the replica first (the data is kept in the
    returned list, to check it had arrived).  Returns (fsync calls, kept)."""
    calls = _failing(sec.stack.replica, "fsync", 1)
    failing, kept = sec.stack.replica.fsync, []

    def lossy_fsync():
        if not kept:
            kept.append(sec.image.pread(lost, length))
            sec.image.pwrite(bytes(length), lost)
        failing()

    sec.stack.replica.fsync = lossy_fsync
    return calls, kept


async def _resent_after_reconnect(node, sec, lost_at: list, at: int, data: bytes) -> None:
    """After a failed flush on the secondary that dropped `data` at `at`
    (`_losing_fsync`): once reconnected, the replica has it back and equals
    our disk."""
    await wait_state(node, st.P_REPLICATING)
    await node.disk_fsync()
    assert lost_at == [data], "the secondary had not received the write"
    assert sec.data[at : at + len(data)] == data
    assert sec.data == node.image.pread(0, SIZE)


def test_a_repair_reads_at_most_64_pieces_or_32_mib_at_once():
    from repdisk.node.primary import REPAIR_BATCH, REPAIR_BATCH_BYTES, batches

    MiB = 1 << 20
    big = [(i * 4 * MiB, 4 * MiB) for i in range(20)]
    assert [len(b) for b in batches(big, REPAIR_BATCH, REPAIR_BATCH_BYTES)] == [8, 8, 4]
    small = [(i << 20, 64 << 10) for i in range(100)]
    assert [len(b) for b in batches(small, REPAIR_BATCH, REPAIR_BATCH_BYTES)] == [64, 36]
    mixed = [(0, 30 * MiB), (30 * MiB, 4 * MiB), (40 * MiB, 64 * MiB), (200 * MiB, 4096)]
    assert list(batches(mixed, 64, 32 * MiB)) == [[mixed[0]], [mixed[1]], [mixed[2]], [mixed[3]]]
    assert list(batches([], 64, 32 * MiB)) == []


REPAIR_RESULT = re.compile(r"(\d+) bytes written since the last good flush compared, (\d+) compared again with "
                           r"writes held for ([\d.]+) s, (\d+) rewritten, fsync succeeded")


@pytest.mark.parametrize("config", [dict(replica_first=True), dict(replica_first=False), dict(mode="async")],
                         ids=["replica-first", "replica-first-off", "async"])
def test_a_failed_local_fsync_is_repaired_from_the_secondary(tmp_path, sec, config):
    """Our fsync fails, the secondary's flush does not: the primary compares
    what was written since the last good flush with the secondary, writes
    back what differs (here one write the "kernel" lost), fsyncs again and
    carries on.  The VM's fsync succeeds, replica first stays on where it
    was on, writes that come meanwhile land on both disks."""
    lost = 2 * EXTENT + 8192

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()  # a good flush on this link: the repair starts from here
        for i in range(6):
            await node.disk_write(i * EXTENT + 4096 * i, bytes([i + 1]) * 8192)
        fd = os.open(str(tmp_path / "pri.img"), os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(8192), lost)  # the write to extent 2, lost
        finally:
            os.close(fd)
        calls = _failing_fsync(node, 1)

        async def writer():
            for i in range(20):
                await node.disk_write(20 * EXTENT + i * 2048, bytes([0x40 + i]) * 2048)  # one grain
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.disk_fsync)
            nursery.start_soon(writer)
        assert calls == [True, False]
        rf = node.status()["replica_first"]
        assert rf["repairs"] == 1 and rf["flush_broken"] is None and rf["active"] == node.replica_first, rf
        # six writes (and the writer's first, if it came before the fsync), one
        # 64 KiB grain each, compared; the lost one's grain (and the writer's,
        # if it was being written) compared again; the lost one's rewritten
        compared, again, held, rewritten = REPAIR_RESULT.search(rf["repair"]["result"]).groups()
        compared, again, rewritten = int(compared), int(again), int(rewritten)
        assert compared in (6 << 16, 7 << 16) and again in (1 << 16, 2 << 16) and rewritten == 1 << 16, rf
        assert not rf["repair"]["running"] and rf["repair"]["done"] == compared + again
        assert rf["repair"]["writes_held_s"] == pytest.approx(float(held), abs=0.001)
        assert node.image.pread(lost, 8192) == bytes([3]) * 8192
        await node.disk_fsync()
        assert node.image.pread(0, SIZE) == sec.data

    node = make_node(tmp_path, sec, flush_interval=30, **config)
    trio.run(run_node, node, body)


def test_writes_go_on_while_the_repair_compares_and_wait_only_for_what_differed(tmp_path, sec):
    """The repair's first pass compares 48 MiB written since the last good
    flush while the VM's writes go on; writes wait only while the one piece
    that differed (the lost write's) is compared again and written back."""
    from repdisk.node.primary import REPAIR_PIECE

    lost = 5 * EXTENT + 12345

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()
        for i in range(12):
            await node.disk_write(i * EXTENT, bytes([i + 1]) * EXTENT)
        fd = os.open(str(tmp_path / "pri.img"), os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(8192), lost)
        finally:
            os.close(fd)
        calls = _failing_fsync(node, 1)
        seen = []  # (repair running, its bytes done) as each of the writer's writes completed
        stop = trio.Event()

        async def writer():
            i = 0
            while not stop.is_set():
                await node.disk_write(24 * EXTENT + (i % 256) * 4096, bytes([0x80 | i % 64]) * 4096)
                seen.append((node.repair.started is not None and node.repair.finished is None, node.repair.done))
                i += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await node.disk_fsync()
            stop.set()
        assert calls == [True, False]
        rf = node.status()["replica_first"]
        compared, again, held, rewritten = REPAIR_RESULT.search(rf["repair"]["result"]).groups()
        compared, again, rewritten = int(compared), int(again), int(rewritten)
        assert 12 * EXTENT <= compared <= 12 * EXTENT + (1 << 20), rf  # and the writer's grains before the fsync
        assert rewritten == REPAIR_PIECE and REPAIR_PIECE <= again <= 2 * REPAIR_PIECE, rf
        assert any(running and done < compared for running, done in seen), seen  # writes during the first pass
        assert node.image.pread(lost, 8192) == bytes([6]) * 8192
        await node.disk_fsync()
        assert node.image.pread(0, SIZE) == sec.data

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30)
    trio.run(run_node, node, body)


def test_a_repair_reads_the_next_batch_while_it_compares_and_reads_each_batch_at_once(tmp_path, sec):
    """The first pass over 48 MiB (two batches of at most 32 MiB): when it
    starts reading the first batch's pieces from our disk, it has asked the
    secondary for the second batch too; and it asks the kernel for all of a
    batch's local pieces (readahead) before it reads the first of them."""
    from repdisk.node.primary import REPAIR_BATCH_BYTES, REPAIR_PIECE

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()
        for i in range(12):
            await node.disk_write(i * EXTENT, bytes([i + 1]) * EXTENT)
        _failing_fsync(node, 1)
        image, events = node.image, []
        real_pread, real_soon = image.pread, image.read_soon

        def pread(offset, length):  # runs in the repair's worker thread
            events.append(("pread", offset, node.link.statistics()["read"]["submitted"]))
            return real_pread(offset, length)

        def read_soon(offset, length):
            events.append(("soon", offset, None))
            real_soon(offset, length)

        image.pread, image.read_soon = pread, read_soon
        await node.disk_fsync()
        image.pread, image.read_soon = real_pread, real_soon
        assert node.status()["replica_first"]["repairs"] == 1
        per_batch = REPAIR_BATCH_BYTES // REPAIR_PIECE
        first = [e for e in events if e[0] == "pread"][0]
        assert first[2] > per_batch, events[:20]  # the second batch was asked for already
        kinds = [k for k, _, _ in events]
        assert kinds[:per_batch] == ["soon"] * per_batch and kinds[per_batch] == "pread", kinds

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30)
    trio.run(run_node, node, body)


def test_a_failed_fsync_while_degraded_fails_every_later_fsync(tmp_path, sec):
    """Degraded, no secondary holds what was written since the last good
    flush: a failed local fsync cannot be repaired.  The kernel reports a
    write-back error once; the primary must not let the next fsync succeed
    over what may be lost.  Writes go on; the status says why."""
    from repdisk.core.errors import IOFailure

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await trio.to_thread.run_sync(sec.stop)
        await wait_state(node, st.P_DEGRADED)
        await node.disk_write(5 * EXTENT, b"y" * 4096)
        calls = _failing_fsync(node, 1)
        with pytest.raises(IOFailure, match="No space left"):
            await node.disk_fsync()
        with pytest.raises(IOFailure, match="cannot flush: .* failed while degraded"):
            await node.disk_fsync()
        assert calls == [True]  # the second call did not reach the kernel
        rf = node.status()["replica_first"]
        assert "no secondary holds them" in rf["flush_broken"] and not rf["active"], rf
        await node.disk_write(6 * EXTENT, b"z" * 4096)  # the VM's writes still work
        assert node.image.pread(6 * EXTENT, 4096) == b"z" * 4096

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30)
    trio.run(run_node, node, body)


def test_a_failed_eviction_fdatasync_while_degraded_fails_the_next_fsync(tmp_path, sec):
    """Degraded, an eviction's fdatasync fails and takes the kernel's
    write-back error: the VM's next fsync, which the kernel would let
    succeed, fails, and so does every one after it."""
    from repdisk.core.errors import IOFailure

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await trio.to_thread.run_sync(sec.stop)
        await wait_state(node, st.P_DEGRADED)
        calls = _failing(node.image, "datasync", 1, "fdatasync")
        for e in range(8):
            try:
                await node.disk_write(e * EXTENT, b"d" * 4096)
            except IOFailure:
                pass
        assert calls[:1] == [True], "no eviction fdatasync'd the image"
        with pytest.raises(IOFailure, match="fdatasync .*No space left"):
            await node.disk_fsync()
        with pytest.raises(IOFailure, match="cannot flush"):
            await node.disk_fsync()

    node = make_node(tmp_path, sec, al_extents=4, flush_interval=30)
    trio.run(run_node, node, body)


def test_a_failed_fsync_during_the_first_sync_is_not_repaired_and_says_why(tmp_path, sec):
    """During the initial sync no flush on the link has succeeded yet, so
    the secondary does not hold every write in doubt: no repair, flushing
    breaks, and the repair's result says why."""
    from repdisk.core.errors import IOFailure

    (tmp_path / "pri.img").write_bytes(b"\x01" * SIZE)  # data, so the sync takes ~2 s

    async def body(node):
        await wait_state(node, st.P_SYNCING)
        await node.disk_write(5 * EXTENT, b"y" * 4096)
        calls = _failing_fsync(node, 1)
        with pytest.raises(IOFailure, match="No space left"):
            await node.disk_fsync()
        assert calls == [True]
        rf = node.status()["replica_first"]
        assert rf["repairs"] == 0 and "No space left" in rf["flush_broken"], rf
        result = rf["repair"]["result"]
        assert result.startswith("not possible after") and result.endswith(
            "is on this secondary: no flush on this link has succeeded yet"), result
        assert rf["repair"]["refused"] == "no flush on this link has succeeded yet", rf

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30, resync_rate=64 << 20)
    trio.run(run_node, node, body)


def test_a_failed_fdatasync_of_an_eviction_is_repaired_by_the_next_flush(tmp_path, sec):
    """An activity-log eviction's fdatasync of the image fails (ENOSPC, as
    on this machine's 1 TiB row) and consumes the kernel's write-back error,
    so the next fsync succeeds.  That flush must still treat our disk as in
    doubt: it repairs it from the secondary (here one write the "kernel"
    lost), and the VM's fsync succeeds only then."""
    from repdisk.core.errors import IOFailure

    lost = 1 * EXTENT + 4096

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()  # the last good flush
        calls = _failing(node.image, "datasync", 1, "fdatasync")
        failed = 0
        for e in range(8):  # more extents than the log holds: evictions fdatasync the image
            try:
                await node.disk_write(e * EXTENT + 4096, bytes([e + 1]) * 8192)
            except IOFailure:
                failed += 1
        assert calls, "no eviction fdatasync'd the image"
        rf = node.status()["replica_first"]
        assert "No space left" in rf["sync_failure"], rf
        fd = os.open(str(tmp_path / "pri.img"), os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(8192), lost)  # a write the failed write-back lost
        finally:
            os.close(fd)
        await node.disk_fsync()  # the real fsync succeeds; the repair runs all the same
        rf = node.status()["replica_first"]
        assert rf["repairs"] == 1 and rf["flush_broken"] is None and rf["sync_failure"] is None, rf
        assert rf["repair"]["refused"] is None, rf
        assert "fdatasync" in rf["repair"]["result"] and int(REPAIR_RESULT.search(rf["repair"]["result"]).group(4)) > 0
        assert node.image.pread(lost, 8192) == bytes([2]) * 8192
        assert node.image.pread(0, SIZE) == sec.data
        assert failed <= 1  # at most the write whose eviction failed

    node = make_node(tmp_path, sec, al_extents=4, flush_interval=30)
    trio.run(run_node, node, body)


@pytest.mark.parametrize("replica_first", [True, False], ids=["replica-first", "replica-first-off"])
def test_a_failed_flush_on_the_secondary_resends_what_it_received_since_the_last_good_one(tmp_path, sec,
                                                                                        replica_first):
    """The secondary's fsync fails (ENOSPC, as on this machine's 1 TiB row):
    its kernel may have dropped what it received since its last good flush,
    and would let the next fsync succeed.  The primary degrades, reconnects
    and resends all of that, not only what was written while degraded: the
    replica ends equal to our disk (here one write its "kernel" lost)."""

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()  # the last good flush
        for i in range(6):
            await node.disk_write(i * EXTENT + 4096 * i, bytes([i + 1]) * 8192)
        fd = os.open(str(tmp_path / "sec" / "sec.img"), os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(8192), 3 * EXTENT + 3 * 4096)  # the secondary's lost write
        finally:
            os.close(fd)
        calls = _failing(sec.stack.replica, "fsync", 1)
        await node.disk_fsync()  # the secondary's failure degrades replication, not the VM
        assert calls[:1] == [True], "the secondary's fsync was not called"
        assert node.state == st.P_DEGRADED
        await wait_state(node, st.P_REPLICATING)  # reconnected and resynced
        await node.disk_fsync()
        assert sec.data == node.image.pread(0, SIZE)
        assert sec.data[3 * EXTENT + 3 * 4096 : 3 * EXTENT + 5 * 4096] == bytes([4]) * 8192

    node = make_node(tmp_path, sec, replica_first=replica_first, flush_interval=30)
    trio.run(run_node, node, body)


@pytest.mark.parametrize("replica_first", [True, False], ids=["replica-first", "replica-first-off"])
def test_a_failed_flush_on_the_secondary_after_a_sync_resends_what_the_sync_sent(tmp_path, sec, replica_first):
    """The first flush after the initial sync fails on the secondary, whose
    "kernel" dropped a block the sync sent.  No VM write touched it, so only
    the record of what the sync sent since the last good flush can bring it
    back: after the reconnect the replica equals our disk.  (With replica
    first the primary flushes right after the sync; without, the VM's first
    fsync is that flush.)"""
    lost = 5 * EXTENT + 3 * 4096
    image = bytearray(SIZE)
    for e in range(2, 9):
        image[e * EXTENT : e * EXTENT + 64 * 1024] = bytes([e]) * (64 * 1024)
    (tmp_path / "pri.img").write_bytes(image)
    fails, lost_at = _losing_fsync(sec, lost, 8192)  # at the first flush

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        # With replica first the flush after the sync failed: this is after the reconnect.
        if not replica_first:
            await node.disk_fsync()  # the flush that fails on the secondary
            assert node.state == st.P_DEGRADED
            await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()
        assert fails[:2] == [True, False], fails
        assert lost_at == [bytes([5]) * 8192], "the sync had not sent the block the secondary lost"
        assert sec.data[lost : lost + 8192] == bytes([5]) * 8192
        assert sec.data == node.image.pread(0, SIZE)

    node = make_node(tmp_path, sec, replica_first=replica_first, flush_interval=30)
    trio.run(run_node, node, body)


def test_a_good_flush_during_a_sync_keeps_tracking_what_the_sync_sends_after_it(tmp_path, sec):
    """A VM fsync succeeds while the initial sync runs; the sync goes on
    sending, and the flush right after it fails on the secondary, whose
    "kernel" dropped a block the sync sent after that good flush.  The
    good flush must not end the record of what the running sync sends:
    after the reconnect the replica equals our disk."""
    lost = SIZE - 3 * 4096  # the sync goes from the start: this is sent last
    (tmp_path / "pri.img").write_bytes(b"\x07" * SIZE)

    async def body(node):
        await wait_state(node, st.P_SYNCING)
        await node.disk_fsync()  # a good flush on this link, early in the sync
        assert node.state == st.P_SYNCING and node.flushes == 1, "the sync ended before the good flush"
        fails, lost_at = _losing_fsync(sec, lost, 8192)
        # The flush after the sync fails; this waits for the reconnect.
        with trio.fail_after(20):
            while not fails or node.state != st.P_REPLICATING:
                await trio.sleep(0.01)
        await node.disk_fsync()
        assert fails[:2] == [True, False], fails
        assert lost_at == [b"\x07" * 8192], "the sync had not sent the block the secondary lost"
        assert sec.data[lost : lost + 8192] == b"\x07" * 8192
        assert sec.data == node.image.pread(0, SIZE)

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30, resync_rate=64 << 20)
    trio.run(run_node, node, body)


def test_after_a_good_flush_during_a_sync_only_what_the_sync_sent_since_is_sent_again(tmp_path, sec):
    """The same, measured: a good flush halfway through the sync covers what
    the sync sent before it began.  When the flush after the sync fails, the
    resync after the reconnect sends what the sync sent after that good
    flush began (by 64 KiB map grain), not the whole disk again."""
    (tmp_path / "pri.img").write_bytes(b"\x09" * SIZE)

    async def body(node):
        await wait_state(node, st.P_SYNCING)
        with trio.fail_after(20):
            while node.sync.done < SIZE // 2:
                await trio.sleep(0.005)
        covered = node.sync.done  # sent, so covered by the flush that starts now
        await node.disk_fsync()
        assert node.state == st.P_SYNCING and node.flushes == 1, "the sync ended before the good flush"
        fails, lost_at = _losing_fsync(sec, SIZE - 4096, 4096)
        with trio.fail_after(20):
            while not fails or node.state != st.P_REPLICATING:
                await trio.sleep(0.01)
        resent = node.sync.total  # the resync after the reconnect
        await node.disk_fsync()
        assert fails[:2] == [True, False], fails
        assert lost_at == [b"\x09" * 4096]
        assert sec.data == node.image.pread(0, SIZE)
        assert 0 < resent <= SIZE - covered + (64 << 10), (resent, covered)

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30, resync_rate=64 << 20)
    trio.run(run_node, node, body)


@pytest.mark.parametrize("replica_first", [True, False], ids=["replica-first", "replica-first-off"])
def test_a_write_that_waits_for_the_link_while_a_flush_begins_is_sent_again_if_the_next_flush_fails(
        tmp_path, sec, replica_first):
    """A write waits for room on the link (here: one request at a time, the
    one before it slow) while a flush begins, so that flush does not cover
    it.  The flush succeeds, the next one fails on the secondary, whose
    "kernel" dropped the waiting write: it must be sent again, so the
    record of what is in doubt is made when a request starts, not before
    it waits."""
    slow_at, late_at = 2 * EXTENT, 6 * EXTENT + 4096
    real, release = sec.stack.primary_write, threading.Event()

    def held_write(buf, offset):
        if offset == slow_at:
            release.wait(10)  # until the flush has begun
        real(buf, offset)

    sec.stack.primary_write = held_write

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()
        node.link.max_requests = 1
        forwarded = node.writes_forwarded
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.disk_write, slow_at, b"s" * 4096)
            await until(lambda: node.link.inflight_requests == 1)
            nursery.start_soon(node.disk_write, late_at, b"L" * 8192)
            await until(lambda: node.writes_forwarded == forwarded + 2)
            assert node.link.inflight_requests == 1, "the second write did not wait for the link"
            nursery.start_soon(node.disk_fsync)  # begins while the second write waits
            await until(node._flush_lock.locked)
            release.set()
        node.link.max_requests = 64
        fails, lost_at = _losing_fsync(sec, late_at, 8192)
        await node.disk_fsync()  # fails on the secondary
        assert fails[:1] == [True] and node.state == st.P_DEGRADED
        await _resent_after_reconnect(node, sec, lost_at, late_at, b"L" * 8192)
        assert fails[:2] == [True, False], fails

    node = make_node(tmp_path, sec, replica_first=replica_first, flush_interval=30)
    trio.run(run_node, node, body)


def _held_fsync(image, failures: int = 0):
    """`image.fsync`'s first call waits (in its thread, so the node's other
    tasks run meanwhile) until the test sets `release`; the first
    `failures` calls then fail with ENOSPC.  Returns (the calls made, True:
    failed; `entered`, set once the first call began; `release`)."""
    import errno

    from repdisk.core.errors import IOFailure

    real, calls = image.fsync, []
    entered, release = threading.Event(), threading.Event()

    def fsync():
        if not entered.is_set():
            entered.set()
            release.wait(10)
        calls.append(len(calls) < failures)
        if calls[-1]:
            raise IOFailure(f"fsync {image.path}", OSError(errno.ENOSPC, "No space left on device"))
        real()

    image.fsync = fsync
    return calls, entered, release


@pytest.mark.parametrize("replica_first", [True, False], ids=["replica-first", "replica-first-off"])
def test_a_write_during_a_repaired_flush_is_sent_again_if_the_next_flush_fails(tmp_path, sec, replica_first):
    """A flush's NBD FLUSH succeeds and its local fsync fails, slowly; a write
    starts meanwhile (that FLUSH need not cover it); the repair from the
    secondary succeeds.  The next flush fails on the secondary, whose
    "kernel" dropped that write: the repair must not have erased the record
    of it, so it is sent again and the replica equals our disk."""
    late_at = 6 * EXTENT + 4096

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()
        calls, entered, release = _held_fsync(node.image, failures=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.disk_fsync)  # its local fsync fails once released
            await until(entered.is_set)
            await node.disk_write(late_at, b"L" * 8192)
            assert not calls, "the flush ended before the write"
            release.set()
        assert calls[:2] == [True, False] and node.status()["replica_first"]["repairs"] == 1
        fails, lost_at = _losing_fsync(sec, late_at, 8192)
        await node.disk_fsync()  # fails on the secondary
        assert fails[:1] == [True] and node.state == st.P_DEGRADED
        await _resent_after_reconnect(node, sec, lost_at, late_at, b"L" * 8192)

    node = make_node(tmp_path, sec, replica_first=replica_first, flush_interval=30)
    trio.run(run_node, node, body)


def test_a_flush_cancelled_before_the_secondary_answers_leaves_what_it_covers_in_doubt(tmp_path, sec):
    """A flush is given up while the secondary is still at its fsync (a stop
    gives the final flush 10 s), and that fsync then fails, having dropped a
    write: the error reply ends the link.  With nobody left to handle the
    reply, the flush must have marked what it was to cover for the resync
    when it was cancelled; after the reconnect the replica equals our disk."""
    at = 3 * EXTENT + 4096

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()
        await node.disk_write(at, b"C" * 8192)
        fails, lost_at = _losing_fsync(sec, at, 8192)
        real, entered, release = sec.stack.flush_replica, threading.Event(), threading.Event()

        def held_flush():
            entered.set()
            release.wait(10)  # until the primary gave up on it
            real()

        sec.stack.flush_replica = held_flush
        scope = trio.CancelScope()

        async def fsync():
            with scope:
                await node.disk_fsync()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fsync)
            await until(entered.is_set)
            scope.cancel()  # as a stop does after 10 s
        release.set()
        assert scope.cancelled_caught, "the flush was not cancelled"
        await wait_state(node, st.P_DEGRADED)
        assert fails[:1] == [True], "the secondary's fsync was not called"
        await _resent_after_reconnect(node, sec, lost_at, at, b"C" * 8192)

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30)
    trio.run(run_node, node, body)


def test_an_fsync_that_waited_while_the_link_was_replaced_leaves_the_new_link_alone(tmp_path, sec):
    """A VM fsync waits for its turn behind a slow flush while the link is
    cut and a new one connects.  When its turn comes, the link it was for is
    gone: it flushes the new link, and does not take it down."""

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        old = node.link
        calls, entered, release = _held_fsync(node.image)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.disk_fsync)  # holds the flush lock until released
            await until(entered.is_set)
            nursery.start_soon(node.disk_fsync)  # waits for it, with `old`
            await until(lambda: node._flush_lock.statistics().tasks_waiting == 1)
            old.abort("test: the connection was cut")
            await until(lambda: node.link not in (None, old) and node.state == st.P_REPLICATING, 10)
            new = node.link
            release.set()
        assert len(calls) == 2, calls  # both fsyncs ran
        assert node.link is new and new.failed is None and node.state == st.P_REPLICATING, node.error
        assert node.flushes == 2  # the first on the old link, the second on the new one

    node = make_node(tmp_path, sec, flush_interval=30)
    trio.run(run_node, node, body)


def test_an_fsync_that_fails_again_after_the_repair_breaks_flushing_for_good(tmp_path, sec):
    """When the fsync after the repair fails too, our disk stays in doubt:
    every later fsync of disk.img fails, no NBD FLUSH is sent (the secondary
    keeps the map a restart resyncs), replica first is off."""
    from repdisk.core.errors import IOFailure

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_fsync()
        await node.disk_write(3 * EXTENT, b"x" * 4096)
        calls = _failing_fsync(node, 2)
        with pytest.raises(IOFailure, match="No space left"):
            await node.disk_fsync()
        assert calls == [True, True]
        rf = node.status()["replica_first"]
        assert rf["repairs"] == 0 and not rf["active"] and "No space left" in rf["flush_broken"]
        assert rf["repair"]["result"].startswith("failed after"), rf
        flushes = sec.node.received.flushes
        with pytest.raises(IOFailure, match="cannot flush"):
            await node.disk_fsync()
        assert calls == [True, True] and sec.node.received.flushes == flushes
        assert sec.node.received.count() > 0

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30)
    trio.run(run_node, node, body)


def test_the_received_map_can_be_read_while_the_primary_is_connected(tmp_path, sec):
    """While the primary's link holds the server's one slot, a second client
    (an operator's nbdinfo) may open the read-only side export, never the
    disk."""
    import subprocess

    from repdisk.edge.replica import fetch_export, with_export

    async def body(node):
        await wait_state(node, st.P_REPLICATING)
        await node.disk_write(3 * EXTENT, b"d" * 4096)
        desc, data = await trio.to_thread.run_sync(fetch_export, with_export(sec.uri, md.RECEIVED_EXPORT))
        assert md.parse_received(desc)["run"] == sec.node.run and any(data)
        disk = await trio.to_thread.run_sync(
            lambda: subprocess.run(["nbdinfo", sec.uri], capture_output=True, text=True))
        assert disk.returncode != 0 and "nbd_opt_go" in disk.stderr  # the disk: refused
        assert node.state == st.P_REPLICATING and node.link.failed is None

    node = make_node(tmp_path, sec, replica_first=True, flush_interval=30, assume_synced=True)
    trio.run(run_node, node, body)
