"""The NBD server in process, spoken to over raw sockets: handshake corner
cases, malformed traffic, the single-client rule, error replies."""

import errno
import logging
import os
import random
import socket
import struct
import threading
import time

import pytest
import trio

from nbd_helpers import (
    EXPORT,
    SIZE,
    MemDevice,
    RawClient,
    nbd_server,  # noqa: F401  (fixture)
    serving,
    short_tmpdir,
    stats,
    wait_for,
)
from repdisk.core.errors import IOFailure, ReadOnly
from repdisk.edge import nbdwire as w
from repdisk.edge.nbdserver import NbdServer

FIXED = w.CLIENT_FLAGS.pack(w.FLAG_C_FIXED_NEWSTYLE)
EXPECTED_FLAGS = w.FLAG_HAS_FLAGS | w.FLAG_SEND_FLUSH | w.FLAG_SEND_FUA | w.FLAG_SEND_TRIM | w.FLAG_SEND_WRITE_ZEROES


def infos_by_type(replies):
    return {struct.unpack(">H", data[:2])[0]: data for rtype, data in replies if rtype == w.REP_INFO}


# ---- handshake ------------------------------------------------------------------


def test_go_reports_export_block_sizes_and_description(nbd_server):
    with RawClient(nbd_server.address) as c:
        assert c.greeting() == w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES
        c.send(w.CLIENT_FLAGS.pack(w.FLAG_C_FIXED_NEWSTYLE))
        replies = c.go(EXPORT, [w.INFO_BLOCK_SIZE, w.INFO_DESCRIPTION, w.INFO_NAME])
        infos = infos_by_type(replies)
        assert w.INFO_EXPORT_PAYLOAD.unpack(infos[w.INFO_EXPORT]) == (w.INFO_EXPORT, SIZE, EXPECTED_FLAGS)
        assert not EXPECTED_FLAGS & w.FLAG_CAN_MULTI_CONN
        assert w.INFO_BLOCK_SIZE_PAYLOAD.unpack(infos[w.INFO_BLOCK_SIZE]) == (w.INFO_BLOCK_SIZE, 1, 4096, 32 << 20)
        assert infos[w.INFO_DESCRIPTION][2:] == b"repdisk test disk"
        assert infos[w.INFO_NAME][2:] == EXPORT.encode()
        # In transmission now.
        assert c.read(0, 16) == (0, nbd_server.backing(0, 16))
        c.disc()
        assert c.wait_closed()
    assert nbd_server.events.wait_disconnects(1)[0][1] is None


def test_info_then_default_export_then_go(nbd_server):
    with RawClient(nbd_server.address) as c:
        c.start()
        replies = c.info_request(w.OPT_INFO, "")
        assert replies[-1][0] == w.REP_ACK
        assert w.INFO_EXPORT in infos_by_type(replies)
        # No description when not asked for.
        assert w.INFO_DESCRIPTION not in infos_by_type(replies)
        c.go("")
        assert c.simple(w.CMD_FLUSH) == 0


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(nbd_server, no_zeroes):
    with RawClient(nbd_server.address) as c:
        c.start(w.FLAG_C_FIXED_NEWSTYLE | (w.FLAG_C_NO_ZEROES if no_zeroes else 0))
        c.option(w.OPT_EXPORT_NAME, EXPORT.encode())
        size, flags = w.EXPORT_NAME_REPLY.unpack(c.recv_exact(w.EXPORT_NAME_REPLY.size))
        assert (size, flags) == (SIZE, EXPECTED_FLAGS)
        if not no_zeroes:
            assert c.recv_exact(124) == bytes(124)
        assert c.read(SIZE - 3, 3) == (0, nbd_server.backing(SIZE - 3, 3))


def test_unknown_export_is_an_error_reply_and_haggling_goes_on(nbd_server):
    with RawClient(nbd_server.address) as c:
        c.start()
        replies = c.info_request(w.OPT_GO, "nope")
        assert replies == [(w.REP_ERR_UNKNOWN, replies[0][1])]
        assert b"nope" in replies[0][1]
        c.go(EXPORT)
        assert c.read(0, 1)[0] == 0


def test_unknown_export_name_closes(nbd_server):
    with RawClient(nbd_server.address) as c:
        c.start()
        c.option(w.OPT_EXPORT_NAME, b"nope")
        assert c.wait_closed()


def test_list(nbd_server):
    with RawClient(nbd_server.address) as c:
        c.start()
        c.option(w.OPT_LIST)
        opt, rtype, data = c.option_reply()
        assert (opt, rtype) == (w.OPT_LIST, w.REP_SERVER)
        (n,) = struct.unpack(">I", data[:4])
        assert data[4 : 4 + n] == EXPORT.encode()
        assert data[4 + n :] == b"repdisk test disk"
        assert c.option_reply()[1] == w.REP_ACK
        c.option(w.OPT_LIST, b"junk")
        assert c.option_reply()[1] == w.REP_ERR_INVALID


@pytest.mark.parametrize("option", [w.OPT_STRUCTURED_REPLY, w.OPT_STARTTLS, w.OPT_SET_META_CONTEXT, 4711])
def test_unsupported_options_answered_unsup(nbd_server, option):
    with RawClient(nbd_server.address) as c:
        c.start()
        c.option(option, b"xyz")
        opt, rtype, message = c.option_reply()
        assert (opt, rtype) == (option, w.REP_ERR_UNSUP)
        assert b"not supported" in message
        c.go()
        assert c.read(0, 1)[0] == 0


def test_abort(nbd_server):
    with RawClient(nbd_server.address) as c:
        c.start()
        c.option(w.OPT_ABORT)
        assert c.option_reply()[:2] == (w.OPT_ABORT, w.REP_ACK)
        assert c.wait_closed()
    # Not in transmission: no on_connect / on_disconnect.
    assert nbd_server.events.connected == []


@pytest.mark.parametrize(
    "data",
    [b"", b"\0\0\0\x09disk\0\0", b"\0\0\0\x04disk\0\x01", b"\0\0\0\x04disk\0\x01\0\0\0", b"\0\0\0\x02\xff\xfe\0\0"],
    ids=["empty", "name-too-long", "missing-info", "extra-bytes", "bad-utf8"],
)
def test_malformed_go_is_invalid_not_fatal(nbd_server, data):
    with RawClient(nbd_server.address) as c:
        c.start()
        c.option(w.OPT_GO, data)
        assert c.option_reply()[1] == w.REP_ERR_INVALID
        c.go()


# ---- malformed traffic ---------------------------------------------------------


def _after_handshake(served, data: bytes) -> RawClient:
    c = RawClient(served.address)
    c.connect()
    c.send(data)
    return c


@pytest.mark.parametrize(
    "bytes_in",
    [
        pytest.param(b"\xff\xff\xff\xff", id="unknown-client-flags"),
        pytest.param(FIXED + b"NOTMAGIC" + bytes(8), id="bad-option-magic"),
        pytest.param(FIXED + w.OPTION_HEADER.pack(w.IHAVEOPT, w.OPT_GO, 1 << 20), id="huge-option"),
        pytest.param(FIXED + w.OPTION_HEADER.pack(w.IHAVEOPT, w.OPT_GO, 100) + b"x", id="truncated-option"),
        pytest.param(b"\0\0", id="truncated-flags"),
    ],
)
def test_handshake_garbage_closes_only_that_connection(nbd_server, bytes_in):
    with RawClient(nbd_server.address) as c:
        c.greeting()
        c.send(bytes_in)
        c.sock.shutdown(socket.SHUT_WR)  # a truncated frame must not wait forever
        assert c.wait_closed()
    with RawClient(nbd_server.address) as c:
        c.connect()
        assert c.read(0, 4) == (0, nbd_server.backing(0, 4))


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", id="http"),
        pytest.param(w.REQUEST.pack(0x12560953, 0, w.CMD_WRITE, 1, 0, 4) + b"evil", id="old-request-magic"),
        pytest.param(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_WRITE, 1, 0, (32 << 20) + 1), id="write-too-large"),
        pytest.param(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_WRITE, 1, 0, 0xFFFFFFFF), id="write-4g"),
    ],
)
def test_transmission_garbage_closes_and_touches_nothing(nbd_server, garbage):
    before = nbd_server.backing()
    with _after_handshake(nbd_server, garbage) as c:
        assert c.wait_closed()
    peer, error = nbd_server.events.wait_disconnects(1)[0]
    assert error.startswith("protocol error")
    assert stats(nbd_server)["protocol_errors"] == 1
    assert nbd_server.backing() == before
    # The server goes on: the next client is served.
    with RawClient(nbd_server.address) as c:
        c.connect()
        assert c.write(10, b"fine") == 0
    assert nbd_server.backing(10, 4) == b"fine"


def test_random_garbage(nbd_server):
    """Random bytes at random points of the conversation: each connection is
    closed, the server goes on, the data is untouched."""
    before = nbd_server.backing()
    rnd = random.Random(7)
    for i in range(40):
        garbage = rnd.randbytes(rnd.randrange(1, 300))
        with RawClient(nbd_server.address) as c:
            stage = i % 3
            if stage == 0:
                c.greeting()
            elif stage == 1:
                c.start()
            else:
                c.connect()
            c.send(garbage)
            c.sock.shutdown(socket.SHUT_WR)
            assert c.wait_closed()
    with RawClient(nbd_server.address) as c:
        c.connect()
        assert c.read(0, 100) == (0, before[:100])
    assert nbd_server.backing() == before


def test_replies_before_garbage_are_sent(nbd_server):
    with RawClient(nbd_server.address) as c:
        c.connect()
        # A write and garbage in one segment: the write is applied and answered.
        c.send(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_WRITE, 4711, 100, 3) + b"abc" + bytes(w.REQUEST.size))
        assert c.reply(4711) == (0, b"")
        assert c.wait_closed()
    assert nbd_server.backing(100, 3) == b"abc"


def test_truncated_write_is_not_applied(nbd_server):
    before = nbd_server.backing()
    c = RawClient(nbd_server.address)
    c.connect()
    header = w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_WRITE, 7, 4096, 1 << 20)
    c.send(header + b"\xaa" * 300_000)
    c.close()  # the client vanishes mid-request
    peer, error = nbd_server.events.wait_disconnects(1)[0]
    assert "mid-request" in error
    assert nbd_server.backing() == before
    assert stats(nbd_server)["protocol_errors"] == 0


@pytest.mark.parametrize("cut", [1, 27])
def test_truncated_request_header(nbd_server, cut):
    c = RawClient(nbd_server.address)
    c.connect()
    c.send(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_READ, 1, 0, 512)[:cut])
    c.close()
    assert "mid-request" in nbd_server.events.wait_disconnects(1)[0][1]


def test_hang_up_between_requests(nbd_server):
    c = RawClient(nbd_server.address)
    c.connect()
    assert c.write(0, b"x") == 0
    c.close()
    assert "without NBD_CMD_DISC" in nbd_server.events.wait_disconnects(1)[0][1]


def test_handshake_timeout(nbd_server):
    nbd_server.server.handshake_timeout = 0.2
    with RawClient(nbd_server.address) as c:
        assert c.wait_closed()  # the client says nothing
    wait_for(lambda: stats(nbd_server)["timeouts"] == 1, "the timeout counted")


# ---- transmission: requests and their errors -----------------------------------


def test_unaligned_io(nbd_server):
    with RawClient(nbd_server.address) as c:
        c.connect()
        assert c.write(4095, b"hello, world") == 0
        assert c.read(4090, 20) == (0, nbd_server.backing(4090, 20))
        assert nbd_server.backing(4095, 12) == b"hello, world"
        assert c.simple(w.CMD_WRITE_ZEROES, 4096, 5) == 0
        assert nbd_server.backing(4095, 12) == b"h" + bytes(5) + b" world"
        assert c.simple(w.CMD_WRITE_ZEROES, 1000, 3, flags=w.CMD_FLAG_NO_HOLE) == 0
        assert nbd_server.backing(1000, 3) == bytes(3)
        assert c.simple(w.CMD_TRIM, 4103, 4) == 0
        assert nbd_server.backing(4095, 12) == b"h" + bytes(5) + b" w" + bytes(4)
        assert c.write(SIZE - 1, b"Z", flags=w.CMD_FLAG_FUA) == 0
        assert c.simple(w.CMD_FLUSH) == 0
        assert c.read(0, 0) == (0, b"")
        c.disc()
        assert c.wait_closed()
    st = stats(nbd_server)
    assert st["requests"] == {"read": 2, "write": 2, "flush": 1, "trim": 1, "write_zeroes": 2, "disc": 1, "other": 0}
    assert st["bytes_written"] == 13 and st["bytes_read"] == 20


def test_out_of_range_gets_error_replies_and_connection_stays(nbd_server):
    before = nbd_server.backing()
    with RawClient(nbd_server.address) as c:
        c.connect()
        assert c.read(SIZE - 10, 11) == (w.NBD_EINVAL, b"")
        assert c.read(SIZE, 1) == (w.NBD_EINVAL, b"")
        assert c.read(2**64 - 1, 1) == (w.NBD_EINVAL, b"")
        # The payload of a refused write is consumed: the stream stays in step.
        assert c.write(SIZE - 2, b"abc") == w.NBD_ENOSPC
        assert c.simple(w.CMD_WRITE_ZEROES, SIZE - 2, 3) == w.NBD_ENOSPC
        assert c.simple(w.CMD_TRIM, SIZE, 1) == w.NBD_EINVAL
        assert c.read(0, 33 << 20) == (w.NBD_EINVAL, b"")
        assert c.read(1, 8) == (0, nbd_server.backing(1, 8))
    assert nbd_server.backing() == before
    st = stats(nbd_server)
    assert st["error_replies"] == 7 and st["protocol_errors"] == 0


def test_unknown_commands_and_flags_get_einval(nbd_server):
    with RawClient(nbd_server.address) as c:
        c.connect()
        assert c.simple(w.CMD_BLOCK_STATUS, 0, 512) == w.NBD_EINVAL
        assert c.simple(w.CMD_CACHE, 0, 512) == w.NBD_EINVAL
        assert c.simple(999, 0, 512) == w.NBD_EINVAL
        assert c.read(0, 8, flags=w.CMD_FLAG_DF) == (w.NBD_EINVAL, b"")
        assert c.write(0, b"no", flags=0x100) == w.NBD_EINVAL
        assert c.simple(w.CMD_WRITE_ZEROES, 0, 8, flags=w.CMD_FLAG_FAST_ZERO) == w.NBD_EINVAL
        # FUA is accepted on anything.
        assert c.read(0, 2, flags=w.CMD_FLAG_FUA) == (0, nbd_server.backing(0, 2))
    assert nbd_server.backing(0, 2) != b"no"
    assert stats(nbd_server)["requests"]["other"] == 3


def test_pipelined_requests(nbd_server):
    """Many requests sent before any reply is read (as libnbd and qemu do)."""
    with RawClient(nbd_server.address) as c:
        c.connect()
        handles = [c.request(w.CMD_WRITE, i * 4096, 4096, bytes([i]) * 4096) for i in range(64)]
        for h in handles:
            assert c.reply(h) == (0, b"")
        handles = [c.request(w.CMD_READ, i * 4096 + 1, 4096) for i in range(63)]
        for i, h in enumerate(handles):
            assert c.reply(h, 4096) == (0, bytes([i]) * 4095 + bytes([i + 1]))


def test_large_write(nbd_server):
    data = bytes(range(256)) * (SIZE // 256)
    with RawClient(nbd_server.address) as c:
        c.connect()
        assert c.write(5, data[5:]) == 0
    assert nbd_server.backing(5) == data[5:]


class SlowHalvesDevice(MemDevice):
    """Writes its first half, yields the CPU, then the second half: a watcher
    that does not hold the server's lock can see a write half applied."""

    def pwrite(self, buf, offset: int) -> None:
        self._check(offset, len(buf))
        half = len(buf) // 2
        self.data[offset : offset + half] = buf[:half]
        time.sleep(0.0005)
        self.data[offset + half : offset + len(buf)] = buf[half:]


@pytest.mark.parametrize("hold_lock", [True, False])
def test_requests_are_applied_atomically_under_the_lock(hold_lock):
    """Whoever holds the server's lock never sees half a request: a watcher in
    the event loop checks the disk at every chance it gets while 1 MiB writes
    of one byte value each arrive in many TCP segments.  Without the lock the
    same watcher does see torn writes (the check can fail)."""
    dev = SlowHalvesDevice(1 << 20)
    lock = threading.Lock()
    seen, torn = set(), []

    async def main():
        server = NbdServer(dev, export_name=EXPORT, lock=lock)
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1:0")

            def look():
                # Three bytes, not a 1 MiB compare, per look: a costly watcher
                # would starve the server on a loaded machine.
                data, mid = dev.data, len(dev.data) // 2
                first = data[0]
                if data[mid] != first or data[-1] != first:
                    torn.append(first)
                seen.add(first)

            async def watch():
                while True:
                    if hold_lock:
                        with lock:
                            look()
                    else:
                        look()
                    await trio.lowlevel.checkpoint()

            def client():
                with RawClient(address) as c:
                    c.connect()
                    for value in range(1, 21):
                        assert c.write(0, bytes([value]) * len(dev.data)) == 0
                    c.disc()
                    assert c.wait_closed()

            nursery.start_soon(watch)
            await trio.to_thread.run_sync(client)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(seen) > 2  # the watcher did run between requests
    if hold_lock:
        assert not torn
    else:
        assert torn


# ---- device errors ---------------------------------------------------------------


def test_device_errors_are_mapped_and_logged(caplog):
    dev = MemDevice(1 << 20)
    with serving(dev) as (thread, events):
        with RawClient(thread.address) as c:
            c.connect()
            dev.fail = IOFailure("write somewhere", OSError(errno.ENOSPC, "No space left on device"))
            assert c.write(0, b"abc") == w.NBD_ENOSPC
            dev.fail = ReadOnly("read-only now")
            assert c.simple(w.CMD_TRIM, 0, 10) == w.NBD_EPERM
            dev.fail = IOFailure("read", OSError(errno.EBADF, "Bad file descriptor"))
            assert c.read(0, 10) == (w.NBD_EIO, b"")
            with caplog.at_level(logging.ERROR, logger="repdisk.edge.nbdserver"):
                dev.fail = ValueError("a bug in the device")
                assert c.read(0, 10) == (w.NBD_EIO, b"")
                assert c.simple(w.CMD_FLUSH) == w.NBD_EIO
            assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [dev.fail, dev.fail]
            dev.fail = None
            assert c.write(0, b"abc") == 0
            assert c.read(0, 3) == (0, b"abc")


def test_flush_and_fua_flush_outside_the_event_loop():
    dev = MemDevice(1 << 20)
    with serving(dev) as (thread, events):
        with RawClient(thread.address) as c:
            c.connect()
            assert c.write(0, b"x") == 0 and dev.flushes == 0
            assert c.write(0, b"y", flags=w.CMD_FLAG_FUA) == 0 and dev.flushes == 1
            assert c.simple(w.CMD_WRITE_ZEROES, 0, 1, flags=w.CMD_FLAG_FUA) == 0 and dev.flushes == 2
            assert c.simple(w.CMD_FLUSH) == 0 and dev.flushes == 3
        server_thread = thread._thread.ident
        assert server_thread not in dev.flush_threads


class HeldFlushDevice(MemDevice):
    """A device whose flush waits until the test releases it."""

    def __init__(self, size):
        super().__init__(size)
        self.release = threading.Event()
        self.flushing = threading.Event()

    def flush(self) -> None:
        self.flushing.set()
        assert self.release.wait(20)
        super().flush()


def test_a_flush_does_not_hold_up_the_requests_after_it():
    """The device flush runs in its own thread: a write sent after a FLUSH
    is applied and answered while the flush is still running; the FLUSH is
    answered once it is done, and FLUSHes sent meanwhile share the next
    device flush."""
    dev = HeldFlushDevice(1 << 20)
    with serving(dev) as (thread, events):
        with RawClient(thread.address) as c:
            c.connect()
            assert c.write(0, b"before") == 0
            flush = c.request(w.CMD_FLUSH)
            assert dev.flushing.wait(10)
            assert c.write(100, b"after") == 0  # answered before the flush's reply
            assert c.read(100, 5) == (0, b"after")
            more = [c.request(w.CMD_FLUSH), c.request(w.CMD_FLUSH)]
            deadline = time.monotonic() + 10
            while thread.server.statistics()["requests"]["flush"] < 3:  # both queued behind the held flush
                assert time.monotonic() < deadline
                time.sleep(0.005)
            dev.release.set()
            assert c.reply(flush) == (0, b"")
            assert [c.reply(h)[0] for h in more] == [0, 0]
            assert dev.flushes == 2  # the first, then one for both that waited
            c.disc()
            assert c.wait_closed()


def test_write_buffer_is_not_kept_by_the_server():
    """Two writes in a row: the second must not change what the first wrote."""
    dev = MemDevice(1 << 20)
    with serving(dev) as (thread, events):
        with RawClient(thread.address) as c:
            c.connect()
            assert c.write(0, b"A" * 100_000) == 0
            assert c.write(200_000, b"B" * 50_000) == 0
    assert dev.data[:100_000] == b"A" * 100_000


# ---- one client at a time, refuse, disconnect -------------------------------------


def test_second_client_refused_with_a_message(nbd_server):
    with RawClient(nbd_server.address) as first:
        first.connect()
        with RawClient(nbd_server.address) as second:
            second.start()
            replies = second.info_request(w.OPT_GO, EXPORT)
            assert replies[0][0] == w.REP_ERR_POLICY
            assert b"another NBD client" in replies[0][1]
            assert nbd_server.server.peer.encode() in replies[0][1]
            second.option(w.OPT_EXPORT_NAME, EXPORT.encode())
            assert second.wait_closed()
        # The first one is undisturbed.
        assert first.write(0, b"first") == 0
        first.disc()
        assert first.wait_closed()
    nbd_server.events.wait_disconnects(1)
    with RawClient(nbd_server.address) as third:
        third.connect()
        assert third.read(0, 5) == (0, b"first")
    st = stats(nbd_server)
    assert st["refused"] == 1 and st["connections"] == 3


def test_client_in_handshake_holds_the_slot(nbd_server):
    with RawClient(nbd_server.address) as first:
        first.start()
        first.option(w.OPT_LIST)
        first.option_reply()
        first.option_reply()  # served: it has the slot
        with RawClient(nbd_server.address) as second:
            second.start()
            second.option(w.OPT_LIST)
            assert second.option_reply()[1] == w.REP_ERR_POLICY
        first.go()


def test_refuse_and_accept_again(nbd_server):
    nbd_server.thread.call(nbd_server.server.refuse, "the secondary has failed over")
    with RawClient(nbd_server.address) as c:
        c.start()
        for opt in (w.OPT_GO, w.OPT_INFO):
            replies = c.info_request(opt, EXPORT)
            assert replies == [(w.REP_ERR_POLICY, b"the secondary has failed over")]
        c.option(w.OPT_ABORT)
        assert c.option_reply()[1] == w.REP_ACK
    with RawClient(nbd_server.address) as c:
        c.start()
        c.option(w.OPT_EXPORT_NAME, b"")
        assert c.wait_closed()
    nbd_server.thread.call(nbd_server.server.refuse, None)
    with RawClient(nbd_server.address) as c:
        c.connect()
        assert c.read(0, 1)[0] == 0
    assert stats(nbd_server)["refused"] == 2


def test_refuse_applies_to_a_client_already_haggling(nbd_server):
    with RawClient(nbd_server.address) as c:
        c.start()
        nbd_server.thread.call(nbd_server.server.refuse, "not now")
        assert c.info_request(w.OPT_GO, EXPORT) == [(w.REP_ERR_POLICY, b"not now")]


def test_disconnect(nbd_server):
    assert nbd_server.thread.run(nbd_server.server.disconnect) is None  # no client: no-op
    with RawClient(nbd_server.address) as c:
        c.connect()
        (peer,) = nbd_server.events.wait_connects(1)
        assert nbd_server.thread.call(lambda: nbd_server.server.peer) == peer
        nbd_server.thread.run(nbd_server.server.disconnect)
        # disconnect() returned: the handler has ended and on_disconnect was called.
        assert nbd_server.events.disconnected == [(peer, "disconnected by the server")]
        assert nbd_server.thread.call(lambda: nbd_server.server.peer) is None
        assert c.wait_closed()
    with RawClient(nbd_server.address) as c:
        c.connect()


def test_callbacks_that_raise_are_logged_not_fatal(caplog):
    def boom(*args):
        raise RuntimeError("callback bug")

    dev = MemDevice(4096)
    with serving(dev) as (thread, events):
        thread.server.on_connect = thread.server.on_disconnect = boom
        with caplog.at_level(logging.ERROR, logger="repdisk.edge.nbdserver"):
            with RawClient(thread.address) as c:
                c.connect()
                assert c.write(0, b"ok") == 0
                c.disc()
                assert c.wait_closed()
            wait_for(lambda: sum(r.exc_info is not None for r in caplog.records) == 2, "two logged callback errors")
        with RawClient(thread.address) as c:
            c.connect()
            assert c.read(0, 2) == (0, b"ok")


def test_stopping_the_server_closes_the_client():
    s = serving(MemDevice(4096))
    thread, events = s.__enter__()
    stopped = False
    try:
        with RawClient(thread.address) as c:
            c.connect()
            s.__exit__(None, None, None)
            stopped = True
            assert c.wait_closed()
    finally:
        if not stopped:
            s.__exit__(None, None, None)
    assert events.disconnected[0][1] == "server shutting down"


# ---- listening --------------------------------------------------------------------


def test_unix_socket_stale_file_replaced_and_removed():
    d = short_tmpdir()
    path = f"{d}/nbd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # leaves the socket file behind, like a crashed server
    with serving(MemDevice(4096), f"unix:{path}") as (thread, events):
        assert thread.address == f"unix:{path}"
        with RawClient(thread.address) as c:
            c.connect()
            assert c.read(0, 1)[0] == 0
    assert not os.path.exists(path)
    os.rmdir(d)


def test_unix_socket_path_that_is_a_file_is_refused(tmp_path):
    from repdisk.core.errors import InvalidArgument

    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(InvalidArgument):
        with serving(MemDevice(4096), f"unix:{path}"):
            pass
    assert path.read_text() == "precious"


@pytest.mark.parametrize("listen", ["nonsense", "host:port", "127.0.0.1:99999", "unix:"])
def test_bad_listen_address(listen):
    from repdisk.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        with serving(MemDevice(4096), listen):
            pass


def test_tcp_port_zero_reports_the_port():
    with serving(MemDevice(4096), "127.0.0.1:0") as (thread, events):
        host, port = thread.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0


@pytest.mark.parametrize("host", ["[::1]", "localhost"])
def test_tcp_host_names(host):
    if host == "[::1]" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        s = serving(MemDevice(4096), f"{host}:0")
        thread, events = s.__enter__()
    except OSError as e:
        pytest.skip(f"cannot listen on {host}: {e}")
    try:
        with RawClient(thread.address) as c:
            c.connect()
            assert c.read(0, 1)[0] == 0
    finally:
        s.__exit__(None, None, None)


# ---- look-ahead: the writes queued behind the current request -------------------


def _frame(cmd, offset, length, handle=1, payload=b""):
    return w.REQUEST.pack(w.REQUEST_MAGIC, 0, cmd, handle, offset, length) + payload


def test_look_ahead_names_each_queued_write_once_and_stops_at_what_it_cannot_frame():
    """_look_ahead reads the frames already received after the current
    request and passes every write, write-zeroes and trim in range to the
    device's write_soon, once; it stops at a cut header and at a bad magic
    (the loop reports that one in its turn) and consumes nothing."""
    from repdisk.edge.nbdserver import _look_ahead, _ThreadWire

    size = 1 << 20
    ours, theirs = socket.socketpair()
    try:
        wire = _ThreadWire(ours.fileno(), b"")
        seen = []

        def hint(offset, length):
            seen.append((offset, length))

        theirs.sendall(
            _frame(w.CMD_WRITE, 0, 4096, payload=b"a" * 4096)  # the current request
            + _frame(w.CMD_READ, 8192, 4096)
            + _frame(w.CMD_WRITE_ZEROES, 16384, 8192)
            + _frame(w.CMD_TRIM, 65536, 4096)
            + _frame(w.CMD_FLUSH, 0, 0)
            + _frame(w.CMD_WRITE, size - 4096, 4096, payload=b"b" * 4096)
            + _frame(w.CMD_WRITE, size, 4096, payload=b"c" * 4096)  # past the end: no hint
            + _frame(w.CMD_WRITE, 512, 100, payload=b"d" * 100)[:20]  # cut in its header
        )
        header = wire.exactly(w.REQUEST.size)
        assert w.REQUEST.unpack(header)[2] == w.CMD_WRITE
        payload = bytearray(4096)
        wire.into(memoryview(payload))
        buffered = wire.buffered
        ahead = _look_ahead(wire, 0, hint, size)
        assert seen == [(16384, 8192), (65536, 4096), (size - 4096, 4096)]
        assert wire.buffered == buffered  # nothing consumed
        assert ahead == buffered - 20  # up to the cut header
        assert _look_ahead(wire, ahead, hint, size) == ahead
        assert len(seen) == 3  # nothing named twice

        theirs.sendall(_frame(w.CMD_WRITE, 512, 100, payload=b"d" * 100)[20:]
                       + b"\xde\xad\xbe\xef" + bytes(24)  # wrong magic
                       + _frame(w.CMD_WRITE, 4096, 4096, payload=b"e" * 4096))
        wire.exactly(w.REQUEST.size)  # the read, consumed: its frame has no payload
        ahead -= w.REQUEST.size
        wire.end += wire._recv_into(wire.view[wire.end:])  # received, not consumed
        ahead = _look_ahead(wire, ahead, hint, size)
        assert seen[3:] == [(512, 100)]  # and not the write behind the bad magic
        assert ahead == wire.buffered - (w.REQUEST.size + w.REQUEST.size + 4096)
    finally:
        ours.close()
        theirs.close()
    ours, theirs = socket.socketpair()
    try:  # a write too large for the protocol: no hint, nothing after it framed
        wire = _ThreadWire(ours.fileno(), b"")
        theirs.sendall(_frame(w.CMD_FLUSH, 0, 0) + _frame(w.CMD_WRITE, 0, w.MAX_REQUEST + 1)
                       + _frame(w.CMD_WRITE, 4096, 4096, payload=b"f" * 4096))
        wire.exactly(w.REQUEST.size)
        del seen[:]
        assert _look_ahead(wire, 0, hint, 1 << 30) == 0 and seen == []
    finally:
        ours.close()
        theirs.close()


def test_a_secondarys_server_applies_pipelined_writes_it_looked_ahead_at(tmp_path):
    """The secondary's device over the real server: writes sent in one batch,
    each looked ahead at while the ones before were applied, land as sent,
    with copy-before-write; garbage behind them closes the connection after
    their replies and touches nothing."""
    from repdisk.core.blockdev import StackReplicaDevice
    from repdisk.core.image import RawImage
    from repdisk.core.stack import SecondaryStack

    size = 4 << 20
    path = str(tmp_path / "replica.img")
    original = os.urandom(size)
    with open(path, "wb") as f:
        f.write(original)
    stack = SecondaryStack(RawImage.open(path), path + ".hidden", path + ".active", 4096)
    hints = []

    class Device(StackReplicaDevice):  # the real device, its hints listed
        def write_soon(self, offset, length):
            hints.append((offset, length))
            super().write_soon(offset, length)

    try:
        with serving(Device(stack)) as (thread, events):
            with RawClient(thread.address) as c:
                c.connect()
                rnd = random.Random(3)
                model = bytearray(original)
                frames, handles = [], []
                for i in range(200):
                    off = rnd.randrange(0, size // 512 - 16) * 512
                    n = rnd.choice([512, 4096, 5000, 8192])
                    data = rnd.randbytes(n)
                    model[off : off + n] = data
                    frames.append(_frame(w.CMD_WRITE, off, n, handle=i, payload=data))
                    handles.append(i)
                frames.append(_frame(w.CMD_WRITE_ZEROES, 0, 8192, handle=500))
                model[0:8192] = bytes(8192)
                c.send(b"".join(frames) + bytes(w.REQUEST.size))
                for h in handles + [500]:
                    assert c.reply(h) == (0, b"")
                assert c.wait_closed()
        assert stack.replica_read(0, size) == bytes(model)
        assert stack.view_read(0, size) == original  # the view still shows the checkpoint
        # Each queued write named once, in order, never the first (it is
        # never queued behind another); how many depends on how the bytes
        # arrived, but 200 writes sent at once are not all read one by one.
        sent = [(w.REQUEST.unpack_from(f)[4], w.REQUEST.unpack_from(f)[5]) for f in frames]
        assert hints and hints[0] != sent[0]
        it = iter(sent[1:])
        assert all(h in it for h in hints), "a hint out of order, repeated or never sent"
    finally:
        stack.close()
