"""The secondary node in process (no FUSE, no NBD server): its failover
commit against a real stack on real files."""

import threading

import pytest
import trio

from repdisk.core.errors import IOFailure
from repdisk.core.image import RawImage
from repdisk.core.stack import SecondaryStack
from repdisk.node.secondary import SecondaryNode

BS = 4096
SIZE = 64 << 20


def make_node(tmp_path):
    image = RawImage.open(str(tmp_path / "sec.img"), SIZE)
    stack = SecondaryStack(image, str(tmp_path / "sec.hidden"), str(tmp_path / "sec.active"), BS)
    return SecondaryNode(stack, listen="")


def test_failover_makes_the_committed_view_durable_before_it_returns(tmp_path):
    """The view lives in the replica once the overlays are gone: the
    replica is fsynced after the last chunk is copied and before the node
    serves from it alone, so what the VM flushed survives a host crash."""
    node = make_node(tmp_path)
    stack = node.stack
    stack.view_write(b"v" * (3 * BS), 10 * BS)
    events = []
    real_copy, real_fsync = stack.commit_copy, stack.replica.fsync

    def copy(*args):
        events.append("copy")
        return real_copy(*args)

    def fsync():
        events.append("fsync, standalone" if stack.standalone else "fsync")
        real_fsync()

    stack.commit_copy, stack.replica.fsync = copy, fsync
    trio.run(node.failover)
    assert stack.standalone and events[-1] == "fsync", events
    assert stack.view_read(10 * BS, 3 * BS) == b"v" * (3 * BS)


def test_a_failover_retried_after_a_failed_commit_makes_a_waiting_write_wait(tmp_path):
    """A VM write into a block being copied waits for the copy.  After a
    failed commit, the retry's writes must wait on an event that is not set
    already (they would spin, taking a CPU from the copy)."""
    node = make_node(tmp_path)
    stack = node.stack
    stack.view_write(b"a" * (8 << 20), 0)
    real_copy = stack.commit_copy
    copies, release = [], threading.Event()

    def copy(*args):
        copies.append(threading.get_ident())
        if len(copies) == 1:
            raise IOFailure("copy", OSError(5, "Input/output error"))
        release.wait(10)  # in its thread, until the write below is waiting
        return real_copy(*args)

    stack.commit_copy = copy
    checks = []
    real_touches = node._touches_commit
    node._touches_commit = lambda *a: (checks.append(1), real_touches(*a))[1]

    async def main():
        with pytest.raises(IOFailure):
            await node.failover()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.failover)
            while node._commit_window is None:
                await trio.sleep(0.01)
            nursery.start_soon(node.disk_write, 4096, b"w" * 4096)  # a block being copied
            while not checks:
                await trio.sleep(0.01)
            release.set()
        assert node.stack.standalone

    trio.run(main)
    assert len(checks) <= 4, f"the write checked the commit {len(checks)} times while it waited"
    assert stack.view_read(0, 8192) == b"a" * 4096 + b"w" * 4096


def test_a_write_to_a_block_the_commit_is_not_copying_does_not_wait(tmp_path):
    """Only writes that touch a block being copied wait: one beside it, in
    the window's span but held by no overlay, goes straight to the replica
    while the window is copied."""
    node = make_node(tmp_path)
    stack = node.stack
    stack.view_write(b"a" * BS, 0)
    stack.view_write(b"c" * BS, 100 * BS)  # one window: blocks 0 and 100
    real_copy = stack.commit_copy
    release = threading.Event()

    def copy(w):
        release.wait(10)
        return real_copy(w)

    stack.commit_copy = copy

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.failover)
            while node._commit_window is None:
                await trio.sleep(0.01)
            w = node._commit_window
            assert w.first == 0 and w.end > 100
            with trio.fail_after(5):
                await node.disk_write(50 * BS, b"m" * BS)  # would wait for the copy if it did
            assert not release.is_set() and node._commit_window is w
            release.set()
        assert node.stack.standalone

    trio.run(main)
    assert stack.view_read(0, BS) == b"a" * BS
    assert stack.view_read(50 * BS, BS) == b"m" * BS
    assert stack.view_read(100 * BS, BS) == b"c" * BS


def test_the_failover_commit_writes_each_window_back_while_it_copies_the_next(tmp_path):
    """The fsync at the end of a failover would write everything the commit
    copied: each copied window is handed to write-back at once instead, and
    the disk writes it while the next window is copied."""
    node = make_node(tmp_path)
    stack = node.stack
    stack.view_write(b"a" * (12 << 20), 0)  # two windows of 8 MiB of blocks at most
    written_back, copies = threading.Event(), []
    real_copy, real_write_back = stack.commit_copy, stack.replica.write_back_soon

    def copy(w):
        if copies:  # the second window: the first is being written back meanwhile
            copies.append(written_back.wait(10))
        else:
            copies.append(None)
        return real_copy(w)

    def write_back_soon(offset, length):
        real_write_back(offset, length)
        written_back.set()

    stack.commit_copy, stack.replica.write_back_soon = copy, write_back_soon
    trio.run(node.failover)
    assert copies == [None, True]
    assert stack.standalone and stack.view_read(0, 12 << 20) == b"a" * (12 << 20)
