"""repdisk's NBD server (trio): serves one BlockDevice to one client at a time.

On the secondary the client is the primary's replica link, the only writer,
so the server takes one client into the handshake/transmission phase at a
time and refuses any other with a message saying why; such a second client
may still open a read-only side export (the received map can be read with
nbdinfo or nbdcopy while the primary's link holds the slot).  The node can also
refuse new clients (`refuse`) and drop the current one (`disconnect`, at
failover).

Protocol: fixed newstyle handshake (with NO_ZEROES), NBD_OPT_GO / INFO /
EXPORT_NAME / LIST / ABORT; besides the device, the node may serve read-only
side exports by name (`side_export`: the secondary's received map); simple
replies only (structured replies, TLS and
metadata contexts are answered NBD_REP_ERR_UNSUP).  Commands READ, WRITE (FUA:
write, then flush), FLUSH, TRIM, WRITE_ZEROES, DISC.  The wire format lives in
nbdwire.

Threads: listening and the handshake run in trio.  The transmission phase of
the one client runs in a thread of its own, with blocking socket I/O and the
device called inline, like one of nbdkit's connection threads: the request
loop then costs no trip through trio's scheduler per request (measured: the
secondary's CPU per 4 KiB write fell from ~130 to ~70 us, and async
replication went ~1.45x faster).  FLUSH is handed to a second thread
(_Flusher): the device flush runs while later requests are applied, and its
reply goes out when the flush is done.  Disconnecting or stopping the server
shuts the socket down, which ends those threads.

Atomicity (the node relies on it): a connection's requests run one after the
other (FLUSH's device flush excepted: see Threads).  A WRITE's payload is
received completely before anything is applied, and each request's device
call runs start to end holding the server's `lock` (the node passes the lock
its other users of the device hold); flush runs without it.  So whoever holds the lock sees a request either not applied or
applied completely.

I/O: the connection reads through one preallocated buffer (a WRITE payload
too large for it goes straight into a reusable buffer), and replies are queued
and sent with one writev when the thread is about to wait for input (or the
batch grows large).

Errors: a device error (RepdiskError) is replied with its errno through
nbdwire's one table; any other exception is logged and replied as EIO.  Bytes
that break the protocol close that one connection (one log line), never the
server, and never touch the device.
"""

import logging
import os
import queue
import select
import socket
import stat
import threading
from time import perf_counter as _now

import trio

from repdisk.core.errors import InvalidArgument, ReadOnly, RepdiskError

from . import nbdwire as w
from . import spin as _spin
from .spin import SpinPolicy

log = logging.getLogger(__name__)

# Receive buffer per connection.  Headers and small payloads are read through
# it (one recv can bring in several pipelined requests); large payloads are
# received straight into the payload buffer.
RECV_BUFFER = 256 << 10
# Options one connection may send before we stop listening to it.
MAX_OPTIONS = 64
# Replies wait in a batch while more requests have already arrived, and go out
# in one writev before the connection thread would wait for input, or when the
# batch holds this many bytes or buffers.
REPLY_BATCH_BYTES = 256 << 10
REPLY_BATCH_PARTS = 256
_IOV_MAX = 1024  # buffers per writev (Linux)

# What we announce (no CAN_MULTI_CONN: one client at a time).
_TRANSMISSION_FLAGS = (
    w.FLAG_HAS_FLAGS | w.FLAG_SEND_FLUSH | w.FLAG_SEND_FUA | w.FLAG_SEND_TRIM | w.FLAG_SEND_WRITE_ZEROES
)

# A side export: read-only (writes get EPERM), flush accepted.
_SIDE_FLAGS = w.FLAG_HAS_FLAGS | w.FLAG_READ_ONLY | w.FLAG_SEND_FLUSH

# Commands that write: a range past the end is ENOSPC for them, EINVAL for the others.
_WRITING = frozenset({w.CMD_WRITE, w.CMD_WRITE_ZEROES})
# Commands that change the disk: their FUA flag means "flush before replying"
# (on others it is ignored), and the secondary applies them with a
# copy-before-write (_look_ahead).
_CHANGING = frozenset({w.CMD_WRITE, w.CMD_WRITE_ZEROES, w.CMD_TRIM})
_REQUEST_COUNTERS = ("read", "write", "flush", "trim", "write_zeroes", "disc", "other")


class _PeerGone(Exception):
    """The client closed the connection or it broke."""


class _Wire:
    """The handshake's socket I/O (in trio): reads through one buffer (views
    it returns are valid until the next call); sends several buffers in one
    writev.  `leftover()` hands what was received past the handshake to the
    transmission thread."""

    def __init__(self, sock: trio.socket.SocketType, size: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0  # first unread byte
        self.end = 0  # end of received bytes

    async def _recv_into(self, view: memoryview) -> int:
        while True:
            try:
                n = os.readv(self.fd, [view])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as e:
                raise _PeerGone(f"receive failed: {e.strerror or e}") from None
            if n == 0:
                raise _PeerGone("connection closed by the client")
            return n

    async def send(self, *parts) -> None:
        """Send `parts` in order, in one writev when the socket takes it all."""
        bufs = [memoryview(p) for p in parts if len(p)]
        while bufs:
            try:
                n = os.writev(self.fd, bufs[:_IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except OSError as e:
                raise _PeerGone(f"send failed: {e.strerror or e}") from None
            _consume(bufs, n)

    async def exactly(self, n: int) -> memoryview:
        """The next `n` bytes (n <= buffer size)."""
        if self.end - self.start < n:
            _compact(self, n)
            while self.end - self.start < n:
                self.end += await self._recv_into(self.view[self.end :])
        start = self.start
        self.start = start + n
        return self.view[start : start + n]

    def leftover(self) -> bytes:
        data = bytes(self.view[self.start : self.end])
        self.start = self.end = 0
        return data


class _ThreadWire:
    """The transmission phase's socket I/O, in the connection's thread, with
    the socket in blocking mode.  Same buffering as _Wire; replies are queued
    (`reply`) and go out in one writev before the thread waits for input."""

    def __init__(self, fd: int, leftover: bytes, size: int = RECV_BUFFER, spin: SpinPolicy | None = None):
        self.fd = fd
        # Poll before sleeping (NbdServer's request_poll_s), before every read:
        # for the next request, and for the next piece of a large payload.
        # Polling for requests' headers only made 1 MiB streams slower (async
        # unix 346-439 MiB/s against 645-675, stop 40): a wake-up per piece
        # costs more than the CPU the poll takes from the sender.
        self.spin = spin
        self._poll = None
        if spin is not None:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
        self.buf = bytearray(max(size, len(leftover)))
        self.view = memoryview(self.buf)
        self.start, self.end = 0, len(leftover)
        self.view[: self.end] = leftover
        self.out: list = []  # replies not sent yet
        self.out_bytes = 0
        # `reply` and `flush` hold it: the flusher thread (_Flusher) replies too.
        self.lock = threading.Lock()

    @property
    def buffered(self) -> int:
        return self.end - self.start

    def _recv_into(self, view: memoryview) -> int:
        if self.out:
            self.flush()  # the client may be waiting for these before it sends more
        spin = self.spin
        if spin is not None:
            window = spin.window()
            if window:
                poll = self._poll.poll
                end = _now() + window
                while not poll(0):
                    if _now() >= end:
                        spin.record(False)
                        break
                else:
                    spin.record(True)
        try:
            n = os.readv(self.fd, [view])
        except OSError as e:
            raise _PeerGone(f"receive failed: {e.strerror or e}") from None
        if n == 0:
            raise _PeerGone("connection closed by the client")
        SpinPolicy.arrived()  # also with no poll here: the other spinning threads hold theirs
        return n

    def exactly(self, n: int) -> memoryview:
        """The next `n` bytes (n <= buffer size)."""
        if self.end - self.start < n:
            _compact(self, n)
            while self.end - self.start < n:
                self.end += self._recv_into(self.view[self.end :])
        start = self.start
        self.start = start + n
        return self.view[start : start + n]

    def into(self, dst: memoryview) -> None:
        """Fill `dst` from the stream: buffered bytes first; what is left comes
        straight from the socket when it is large, through the buffer when small."""
        total = len(dst)
        pos = min(self.end - self.start, total)
        dst[:pos] = self.view[self.start : self.start + pos]
        self.start += pos
        if pos < total and total - pos < len(self.buf) // 4:
            dst[pos:] = self.exactly(total - pos)
            return
        while pos < total:
            pos += self._recv_into(dst[pos:])

    def reply(self, *parts) -> None:
        with self.lock:
            for p in parts:
                self.out.append(p)
                self.out_bytes += len(p)
            if self.out_bytes >= REPLY_BATCH_BYTES or len(self.out) >= REPLY_BATCH_PARTS:
                self._flush()

    def flush(self) -> None:
        """Send the queued replies (blocking until the socket took them)."""
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        out, total = self.out, self.out_bytes
        if not out:
            return
        self.out, self.out_bytes = [], 0
        sent = 0
        if len(out) <= _IOV_MAX:  # usually all of it goes in this one call
            try:
                sent = os.writev(self.fd, out)
            except OSError as e:
                raise _PeerGone(f"send failed: {e.strerror or e}") from None
            if sent == total:
                return
        bufs = [memoryview(p) for p in out if len(p)]
        _consume(bufs, sent)
        while bufs:
            try:
                n = os.writev(self.fd, bufs[:_IOV_MAX])
            except OSError as e:
                raise _PeerGone(f"send failed: {e.strerror or e}") from None
            _consume(bufs, n)


def _look_ahead(wire: "_ThreadWire", ahead: int, write_soon, size: int) -> int:
    """Tell the device about the writes among the requests already received
    after the current one (`write_soon`), so that what they will read (the
    secondary's copy-before-write) is on its way from the disk while the
    requests before them are applied: the connection applies requests one
    at a time, and a copy from an uncached replica would otherwise wait for
    one disk read after another.  Starts `ahead` bytes past the current
    request (those were seen already); returns how far it has now seen.
    Frames are only read here, never consumed or judged: the loop checks
    each one when its turn comes."""
    unpack_from, header_size = w.REQUEST.unpack_from, w.REQUEST.size
    buf, pos, end = wire.buf, wire.start + ahead, wire.end
    while end - pos >= header_size:
        magic, _flags, cmd, _handle, offset, length = unpack_from(buf, pos)
        if magic != w.REQUEST_MAGIC:
            break  # the loop reports it when it gets there
        if cmd == w.CMD_WRITE and length > w.MAX_REQUEST:
            break  # a protocol error: no hint for it, and no frame after it
        pos += header_size
        if cmd in _CHANGING:
            if offset + length <= size:
                write_soon(offset, length)
            if cmd == w.CMD_WRITE:
                pos += length
    return pos - wire.start


def _compact(wire, need: int) -> None:
    """Make room for `need` buffered bytes at the end of wire's buffer."""
    if wire.start == wire.end:
        wire.start = wire.end = 0
    elif len(wire.buf) - wire.start < need:
        n = wire.end - wire.start
        wire.view[:n] = wire.view[wire.start : wire.end]
        wire.start, wire.end = 0, n


def _consume(bufs: list, n: int) -> None:
    """Drop the first `n` bytes (sent) from the list of buffers."""
    while n:
        if n >= len(bufs[0]):
            n -= len(bufs.pop(0))
        else:
            bufs[0] = bufs[0][n:]
            n = 0


class _Slot:
    """The one client allowed in the handshake/transmission phase."""

    def __init__(self, peer: str):
        self.peer = peer
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.disconnecting = False


class NbdServer:
    """Serves `device` (a repdisk.core.blockdev.BlockDevice) over NBD.

    on_connect(peer) is called when a client enters the transmission phase;
    on_disconnect(peer, error) when that connection ends, with error None after
    a clean NBD_CMD_DISC and a one-line reason otherwise.  Both are plain
    callables, called in the trio thread; an exception from them is logged.

    pwrite gets a memoryview into a buffer that is reused for the next request:
    a device that keeps the data past the call must copy it.
    """

    # A client must finish the handshake within this many seconds.
    handshake_timeout = 30.0

    def __init__(self, device, *, export_name: str = "", description: str = "", on_connect=None, on_disconnect=None,
                 check_export=None, lock=None, side_export=None, request_poll_s: float = 0.0):
        self.device = device
        # The device's client (not a side export's) polls for its next request
        # for up to this long before it sleeps (edge/spin.py; 0: never).
        self.request_poll = _spin.policy(request_poll_s)
        # Held around each request's device call (in the connection's thread);
        # whoever else uses the device holds it too.
        self.lock = lock if lock is not None else threading.Lock()
        self.export_name = export_name
        # check_export(name, commit) -> refusal message or None, for export names
        # other than "" and export_name (repdisk's identity exchange).  Called with
        # commit=False before the reply (a message refuses with NBD_REP_ERR_POLICY),
        # and with commit=True once the client has been told it may go ahead.
        self.check_export = check_export
        # side_export(name) -> (device, description) or None: a read-only export
        # other than the device, made when a client asks for it by name (in
        # the trio thread).  Its clients are not the primary: no on_connect.
        self.side_export = side_export
        self.description = description
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.peer: str | None = None
        self._reason: str | None = None
        self._slot: _Slot | None = None
        self._counters = {
            "connections": 0,
            "refused": 0,
            "protocol_errors": 0,
            "timeouts": 0,
            "error_replies": 0,
            "bytes_read": 0,
            "bytes_written": 0,
        }
        self._requests = dict.fromkeys(_REQUEST_COUNTERS, 0)
        self._next_id = 0

    # ---- control (called by the node) ---------------------------------------------

    def refuse(self, reason: str | None) -> None:
        """While `reason` is set, clients in the handshake get NBD_REP_ERR_POLICY
        with `reason` as the message and cannot enter transmission.  The client
        already in transmission (if any) is not touched: see `disconnect`."""
        self._reason = reason

    async def disconnect(self) -> None:
        """Close the current client's connection (handshake or transmission) and
        return once its handler has ended.  No-op without a client."""
        slot = self._slot
        if slot is None:
            return
        slot.disconnecting = True
        slot.scope.cancel()
        await slot.done.wait()

    def statistics(self) -> dict:
        """Counters since start: connections accepted, refused, closed for
        protocol errors or handshake timeouts, error replies, requests by type,
        bytes read from / written to the device by clients; and the peer."""
        stats = dict(self._counters)
        stats["requests"] = dict(self._requests)
        stats["peer"] = self.peer
        stats.update(_spin.statistics(self.request_poll, "request_poll", "requests"))
        return stats

    # ---- listening ----------------------------------------------------------------

    async def serve(self, listen: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on "HOST:PORT" (TCP, port 0 picks one) or "unix:PATH" and
        serve until cancelled; cancelling closes every connection.
        task_status.started() gets the address actually listened on."""
        unix_path = None
        if listen.startswith("unix:"):
            unix_path = listen[len("unix:") :]
            listener, address, created = await self._listen_unix(unix_path)
            listeners = [listener]
        else:
            listeners, address = await self._listen_tcp(listen)
        log.info("NBD server listening on %s (export %r, %d bytes)", address, self.export_name, self.device.size)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(address)
        finally:
            if unix_path is not None:
                _remove_socket(unix_path, created)

    async def _listen_tcp(self, listen: str) -> tuple[list[trio.SocketListener], str]:
        host, sep, port_text = listen.rpartition(":")
        if not sep or not port_text.isdigit() or int(port_text) > 65535:
            raise InvalidArgument(f"cannot read NBD listen address {listen!r}: use HOST:PORT or unix:PATH")
        port = int(port_text)
        listeners = await trio.open_tcp_listeners(port, host=host.strip("[]") or None)
        if port == 0:
            # Each address would get a port of its own: keep the first address only.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        return listeners, _address_text(listeners[0].socket.getsockname())

    async def _listen_unix(self, path: str) -> tuple[trio.SocketListener, str, tuple[int, int]]:
        if not path:
            raise InvalidArgument("NBD listen address 'unix:' needs a path")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise InvalidArgument(f"{path} exists and is not a socket; refusing to replace it")
            os.unlink(path)  # a stale socket from an earlier run
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen(16)
            st = os.stat(path)
        except BaseException:
            sock.close()
            raise
        return trio.SocketListener(sock), f"unix:{path}", (st.st_dev, st.st_ino)

    # ---- one connection --------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        self._next_id += 1
        self._counters["connections"] += 1
        peer = _peer_text(stream.socket, self._next_id)
        _detect_dead_peer(stream.socket)
        refusal = self._reason
        side_only = False
        if refusal is None and self._slot is not None:
            refusal = (
                f"another NBD client ({self._slot.peer}) is connected; "
                "this server takes one client at a time (the primary is the only writer)"
            )
            side_only = self.side_export is not None  # read-only side exports stay open to it
        slot = None
        if refusal is None:
            slot = self._slot = _Slot(peer)
        elif not side_only:
            self._counters["refused"] += 1
            log.info("NBD client %s refused: %s", peer, refusal)
        session = _Session(self, stream, peer, refusal, side_only)
        try:
            async with stream:
                if slot is None:
                    await session.run()
                else:
                    with slot.scope:
                        await session.run()
        except BaseException as e:
            session.ended(e)
            if not isinstance(e, Exception):
                raise  # Cancelled (server shutdown) and KeyboardInterrupt go on
        else:
            session.ended(None)
        finally:
            if slot is not None:
                if slot.disconnecting and session.error is None:
                    session.error = "disconnected by the server"
                self._end_slot(slot, session)

    def _end_slot(self, slot: _Slot, session: "_Session") -> None:
        if self._slot is slot:
            self._slot = None
        if session.transmitting and session.side:
            log.info("NBD client %s left side export (%s)", slot.peer, session.error or "clean")
        elif session.transmitting:
            self.peer = None
            if session.error is None:
                log.info("NBD client %s disconnected", slot.peer)
            else:
                log.info("NBD client %s disconnected: %s", slot.peer, session.error)
            if self.on_disconnect is not None:
                try:
                    self.on_disconnect(slot.peer, session.error)
                except Exception:
                    log.exception("on_disconnect(%s) failed", slot.peer)
        slot.done.set()

    def _entered_transmission(self, peer: str) -> None:
        self.peer = peer
        log.info("NBD client %s connected", peer)
        if self.on_connect is not None:
            try:
                self.on_connect(peer)
            except Exception:
                log.exception("on_connect(%s) failed", peer)


class _Session:
    """The protocol for one connection: handshake, then transmission."""

    def __init__(self, server: NbdServer, stream: trio.SocketStream, peer: str, refusal: str | None,
                 side_only: bool = False):
        self.server = server
        self.device = server.device
        self.side = False  # serving a side export (read-only), not the device
        self.description = server.description
        self.sock = stream.socket
        self.wire = _Wire(self.sock, w.OPTION_HEADER.size + w.MAX_OPTION)
        self.peer = peer
        self.refusal = refusal  # set when this connection was refused at accept
        # refused only because the slot is taken: a side export may still be
        # read (nbdinfo or nbdcopy of the received map while the primary is connected)
        self.side_only = side_only
        self._refusal_counted = False
        self._side_made: tuple | None = None  # (name, side_export(name)): made once per session
        self.no_zeroes = False
        self.transmitting = False
        self.error: str | None = None
        self._payload_view = memoryview(bytearray(0))  # WRITE payloads land here (reused)
        self.lock = server.lock
        self.tw: _ThreadWire | None = None  # the transmission thread's wire
        self._flusher: _Flusher | None = None  # NBD FLUSH's thread, from the first FLUSH
        self.stopped = False  # the server shut the connection down (disconnect, shutdown)
        self.counters = server._counters
        self.requests = server._requests

    async def run(self) -> None:
        with trio.move_on_after(self.server.handshake_timeout) as deadline:
            try:
                go = await self.handshake()
            except _PeerGone as e:
                raise _PeerGone(f"{e} during the handshake") from None
        if deadline.cancelled_caught:
            self.counters["timeouts"] += 1
            self.error = f"handshake not finished within {self.server.handshake_timeout:g} s"
            log.warning("NBD client %s: %s; closing the connection", self.peer, self.error)
            return
        if go:
            self.transmitting = True
            if self.side:
                log.info("NBD client %s reads a side export: %s", self.peer, self.description)
            else:
                self.server._entered_transmission(self.peer)
            await self.transmission()

    def ended(self, exc: BaseException | None) -> None:
        """Record how the connection ended (one log line for a broken one)."""
        if exc is None:
            return
        if isinstance(exc, w.ProtocolError):
            self.counters["protocol_errors"] += 1
            self.error = f"protocol error: {exc}"
            log.warning("NBD client %s: %s; closing the connection", self.peer, self.error)
        elif isinstance(exc, _PeerGone):
            self.error = str(exc)
            # Clients that give up in the handshake (refused, probing) are normal.
            log.log(logging.WARNING if self.transmitting else logging.INFO, "NBD client %s: %s", self.peer, self.error)
        elif isinstance(exc, trio.Cancelled):
            if self.error is None:
                self.error = "server shutting down"
        elif isinstance(exc, Exception):
            self.error = f"internal error: {exc!r}"
            log.error("NBD client %s: internal error; closing the connection", self.peer, exc_info=exc)
        else:
            self.error = f"{type(exc).__name__}"

    # ---- handshake ---------------------------------------------------------------------

    def _refusal(self, option: int | None = None, data: bytes = b"") -> str | None:
        """Why this connection may not have what `option` asks, or None."""
        refusal = self.refusal if self.refusal is not None else self.server._reason
        if refusal is not None and self.side_only and self.server._reason is None and option is not None:
            if option == w.OPT_EXPORT_NAME:
                name = w.decode_name(data)
            else:
                request = w.parse_info_request(data) if option in (w.OPT_INFO, w.OPT_GO) else None
                name = request[0] if request is not None else None
            if name is not None and self._side_export(name) is not None:
                return None
        if refusal is not None and self.side_only and not self._refusal_counted:
            self._refusal_counted = True
            self.counters["refused"] += 1
            log.info("NBD client %s refused: %s", self.peer, refusal)
        return refusal

    async def handshake(self) -> bool:
        """Option haggling; True to enter transmission, False to close."""
        await self.wire.send(w.greeting())
        (flags,) = w.CLIENT_FLAGS.unpack(await self.wire.exactly(w.CLIENT_FLAGS.size))
        if flags & ~w.CLIENT_FLAGS_KNOWN:
            raise w.ProtocolError(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & w.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            option, length = w.parse_option_header(await self.wire.exactly(w.OPTION_HEADER.size))
            data = bytes(await self.wire.exactly(length))
            if option == w.OPT_ABORT:
                try:
                    await self.wire.send(w.option_reply(option, w.REP_ACK))
                except _PeerGone:
                    pass  # clients may close without waiting for the ACK
                return False
            if option == w.OPT_EXPORT_NAME:
                return await self._export_name(data)
            refusal = self._refusal(option, data)
            if refusal is not None:
                await self.wire.send(w.option_error(option, w.REP_ERR_POLICY, refusal))
                continue
            handler = self._OPTIONS.get(option)
            if handler is None:
                reply = w.option_error(option, w.REP_ERR_UNSUP, f"option {w.option_name(option)} is not supported")
                await self.wire.send(reply)
            elif await handler(self, option, data):
                return True
        raise w.ProtocolError(f"more than {MAX_OPTIONS} options without entering transmission")

    def _known_export(self, name: str) -> bool:
        return name in ("", self.server.export_name)

    async def _export_name(self, data: bytes) -> bool:
        """NBD_OPT_EXPORT_NAME cannot be answered with an error: on refusal or an
        unknown name the spec says to hang up."""
        refusal = self._refusal(w.OPT_EXPORT_NAME, data)
        name = w.decode_name(data)
        if refusal is not None:
            log.info("NBD client %s: NBD_OPT_EXPORT_NAME refused (%s); closing the connection", self.peer, refusal)
            self.error = refusal
            return False
        if name is not None and self._side(name):
            await self.wire.send(w.export_name_reply(self.device.size, _SIDE_FLAGS, self.no_zeroes))
            return True
        if name is not None and not self._known_export(name) and self._checked(name) is None:
            await self.wire.send(w.export_name_reply(self.device.size, _TRANSMISSION_FLAGS, self.no_zeroes))
            self.server.check_export(name, True)
            return True
        if name is None or not self._known_export(name):
            self.error = f"unknown export {bytes(data)[:100]!r} in NBD_OPT_EXPORT_NAME"
            log.warning("NBD client %s: %s; closing the connection", self.peer, self.error)
            return False
        await self.wire.send(w.export_name_reply(self.device.size, _TRANSMISSION_FLAGS, self.no_zeroes))
        return True

    def _side_export(self, name: str):
        """The server's side export `name` as (device, description), or None;
        asked of the server once per session (the secondary's map is a
        snapshot taken under its I/O lock)."""
        if self._side_made is None or self._side_made[0] != name:
            made = self.server.side_export(name) if self.server.side_export is not None else None
            self._side_made = (name, made)
        return self._side_made[1]

    def _side(self, name: str) -> bool:
        """Switch this session to side export `name` if the server has one."""
        made = self._side_export(name)
        if made is None:
            return False
        self.device, self.description = made
        self.side = True
        return True

    def _checked(self, name: str) -> str | None:
        """None when the server's check_export accepts `name`, else why not."""
        if self.server.check_export is None:
            return f"no export named {name!r} (this server exports {self.server.export_name!r})"
        return self.server.check_export(name, False)

    async def _opt_list(self, option: int, data: bytes) -> bool:
        if data:
            await self.wire.send(w.option_error(option, w.REP_ERR_INVALID, "NBD_OPT_LIST takes no data"))
            return False
        server = w.option_reply(option, w.REP_SERVER, w.server_entry(self.server.export_name, self.server.description))
        await self.wire.send(server, w.option_reply(option, w.REP_ACK))
        return False

    async def _opt_info_go(self, option: int, data: bytes) -> bool:
        request = w.parse_info_request(data)
        if request is None:
            reply = w.option_error(option, w.REP_ERR_INVALID, f"malformed NBD_OPT_{w.option_name(option)} request")
            await self.wire.send(reply)
            return False
        name, wanted = request
        checked = False
        self.device, self.description, self.side = self.server.device, self.server.description, False
        if self._side(name):
            checked = True
        elif not self._known_export(name):
            refusal = self._checked(name)
            if refusal is not None:
                code = w.REP_ERR_UNKNOWN if self.server.check_export is None else w.REP_ERR_POLICY
                if code == w.REP_ERR_POLICY:
                    log.warning("NBD client %s: refused: %s", self.peer, refusal)
                    self.counters["refused"] += 1
                await self.wire.send(w.option_error(option, code, refusal))
                return False
            checked = True
        dev = self.device
        infos = [
            w.info_export(dev.size, _SIDE_FLAGS if self.side else _TRANSMISSION_FLAGS),
            w.info_block_size(dev.min_block, dev.preferred_block, w.MAX_REQUEST),
        ]
        if w.INFO_NAME in wanted:
            infos.append(w.info_string(w.INFO_NAME, name if checked else self.server.export_name))
        if w.INFO_DESCRIPTION in wanted and self.description:
            infos.append(w.info_string(w.INFO_DESCRIPTION, self.description))
        replies = [w.option_reply(option, w.REP_INFO, info) for info in infos]
        replies.append(w.option_reply(option, w.REP_ACK))
        await self.wire.send(*replies)
        if checked and option == w.OPT_GO and not self.side:
            self.server.check_export(name, True)  # after the description went out
        return option == w.OPT_GO

    _OPTIONS = {w.OPT_LIST: _opt_list, w.OPT_INFO: _opt_info_go, w.OPT_GO: _opt_info_go}

    # ---- transmission (in the connection's thread) ---------------------------------------

    async def transmission(self) -> None:
        """Run the request loop in a thread of its own until the client leaves,
        breaks the protocol, or the server ends the connection: a cancel
        (disconnect, server shutdown) shuts the socket down, which wakes the
        thread wherever it blocks."""
        leftover = self.wire.leftover()
        fd = self.wire.fd
        finished = False
        failure: Exception | None = None

        async def stop_on_cancel():
            try:
                await trio.sleep_forever()
            finally:
                if not finished:
                    self.stopped = True
                    try:
                        self.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        os.set_blocking(fd, True)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_cancel)
                try:
                    await trio.to_thread.run_sync(self._transmit, fd, leftover, limiter=trio.CapacityLimiter(1))
                except Exception as e:  # raised below, not wrapped in the nursery's group
                    failure = e
                finally:
                    finished = True
                    nursery.cancel_scope.cancel()
        finally:
            os.set_blocking(fd, False)
        if failure is not None:
            raise failure
        await trio.lowlevel.checkpoint()  # a cancel that stopped the thread goes on from here

    def _transmit(self, fd: int, leftover: bytes) -> None:
        self.tw = _ThreadWire(fd, leftover, spin=None if self.side else self.server.request_poll)
        try:
            try:
                self._serve_requests()
            finally:
                if self._flusher is not None:
                    self._flusher.stop()
        except w.ProtocolError:
            # Replies to what was applied before the garbage still go out.
            self._send_now()
            raise
        except _PeerGone:
            if self.stopped:
                return  # the server ended it: not the client's doing
            raise

    def _send_now(self) -> None:
        """Send the queued replies if the socket takes them now (a client that
        sent garbage may not be reading)."""
        os.set_blocking(self.tw.fd, False)
        try:
            self.tw.flush()
        except _PeerGone:  # EAGAIN included: flush maps every OSError to it
            pass

    def _serve_requests(self) -> None:
        # The loop runs once per request (~25K/s): names it uses are local.
        wire = self.tw
        exactly, receive = wire.exactly, wire.into
        unpack, header_size = w.REQUEST.unpack, w.REQUEST.size
        commands = self._SIDE_COMMANDS if self.side else self._COMMANDS
        requests, names, allowed = self.requests, w.CMD_NAMES, w.CMD_FLAGS_ALLOWED
        size = self.device.size
        min_block = self.device.min_block
        write_soon = None if self.side else getattr(self.device, "write_soon", None)
        ahead = 0  # bytes after the current request that _look_ahead has seen
        while True:
            try:
                header = exactly(header_size)
            except _PeerGone as e:
                # Between requests an end of stream is a hang-up, not a truncated frame.
                raise _PeerGone(f"{e} {'mid-request' if wire.buffered else 'without NBD_CMD_DISC'}") from None
            magic, flags, cmd, handle, offset, length = unpack(header)
            if magic != w.REQUEST_MAGIC:
                raise w.ProtocolError(f"bad request magic {magic:#010x}")
            payload = None
            if cmd == w.CMD_WRITE:
                if length > w.MAX_REQUEST:
                    raise w.ProtocolError(f"write of {length} bytes (limit {w.MAX_REQUEST})")
                payload = self._payload(length)
                try:
                    receive(payload)
                except _PeerGone as e:
                    raise _PeerGone(f"{e} mid-request") from None
                ahead -= header_size + length
            else:
                ahead -= header_size
            if write_soon is not None and wire.buffered - ahead >= header_size:
                ahead = _look_ahead(wire, max(ahead, 0), write_soon, size)
            apply = commands.get(cmd)
            if apply is None:
                if cmd == w.CMD_DISC:
                    requests["disc"] += 1
                    wire.flush()
                    return
                requests["other"] += 1
                log.debug("NBD client %s: unknown %s", self.peer, w.command_name(cmd))
                self._reply(w.NBD_EINVAL, handle)
                continue
            requests[names[cmd]] += 1
            # Checks the spec asks for, answered before the device sees anything.
            if flags & ~allowed[cmd]:
                self._reply(w.NBD_EINVAL, handle)
                continue
            if cmd != w.CMD_FLUSH:
                if offset + length > size or (cmd == w.CMD_READ and length > w.MAX_REQUEST):
                    self._reply(w.NBD_ENOSPC if cmd in _WRITING else w.NBD_EINVAL, handle)
                    continue
                if min_block > 1 and (offset | length) % min_block:
                    self._reply(w.NBD_EINVAL, handle)
                    continue
            self._execute(apply, cmd, handle, flags, offset, length, payload)

    def _payload(self, length: int) -> memoryview:
        """A view of `length` bytes of the connection's reusable write buffer."""
        if len(self._payload_view) < length:
            self._payload_view = memoryview(bytearray(max(length, 1 << 20)))
        return self._payload_view[:length]

    def _reply(self, error: int, handle: int, data=None) -> None:
        """Queue a reply; it is sent with the batch (see REPLY_BATCH_BYTES)."""
        if error:
            self.counters["error_replies"] += 1
        if data is None:
            self.tw.reply(w.simple_reply(error, handle))
        else:
            self.tw.reply(w.simple_reply(error, handle), data)

    def _failed(self, exc: Exception, cmd: int, offset: int, length: int) -> int:
        """The NBD error for a device exception: RepdiskError through its errno,
        anything else is logged and is EIO."""
        if isinstance(exc, RepdiskError):
            log.debug("NBD %s at %d+%d failed: %s", w.command_name(cmd), offset, length, exc)
            return w.nbd_error(exc.errno)
        log.error(
            "NBD %s at %d+%d from %s failed unexpectedly; replying EIO",
            w.command_name(cmd),
            offset,
            length,
            self.peer,
            exc_info=exc,
        )
        return w.NBD_EIO

    def _flush(self) -> int:
        self.tw.flush()  # the replies so far need not wait for the fsync
        try:
            self.device.flush()
        except Exception as e:
            return self._failed(e, w.CMD_FLUSH, 0, 0)
        return 0

    # Each command is a plain function that calls the device, holding the lock
    # (see Atomicity above).  Durability comes afterwards, without the lock,
    # before the reply: inline for FUA on writing commands, in the flusher
    # thread for FLUSH.

    def _read(self, offset: int, length: int, payload):
        data = self.device.pread(offset, length)
        if len(data) != length:  # would put the stream out of step
            raise RuntimeError(f"device returned {len(data)} bytes for a read of {length}")
        self.counters["bytes_read"] += length
        return data

    def _write(self, offset: int, length: int, payload):
        self.device.pwrite(payload, offset)
        self.counters["bytes_written"] += length

    def _zero(self, offset: int, length: int, payload):
        # NO_HOLE needs nothing special: the range reads as zeros either way.
        self.device.zero(offset, length)

    def _trim(self, offset: int, length: int, payload):
        self.device.trim(offset, length)

    def _flush_request(self, offset: int, length: int, payload):
        # In the order requests arrive, before the flush itself: the received
        # map's generations turn here (StackReplicaDevice.flush_request).
        hook = getattr(self.device, "flush_request", None)
        if hook is not None:
            hook()

    def _read_only(self, offset: int, length: int, payload):
        raise ReadOnly("this export is read-only")

    _COMMANDS = {
        w.CMD_READ: _read,
        w.CMD_WRITE: _write,
        w.CMD_FLUSH: _flush_request,
        w.CMD_TRIM: _trim,
        w.CMD_WRITE_ZEROES: _zero,
    }
    _SIDE_COMMANDS = {
        w.CMD_READ: _read,
        w.CMD_WRITE: _read_only,
        w.CMD_FLUSH: _flush_request,
        w.CMD_TRIM: _read_only,
        w.CMD_WRITE_ZEROES: _read_only,
    }

    def _execute(self, apply, cmd: int, handle: int, flags: int, offset: int, length: int, payload) -> None:
        try:
            with self.lock:
                data = apply(self, offset, length, payload)
        except Exception as e:
            self._reply(self._failed(e, cmd, offset, length), handle)
            return
        if cmd == w.CMD_FLUSH:
            if self._flusher is None:
                self._flusher = _Flusher(self)
            self._flusher.submit(handle)  # replied once the device flushed
            return
        error = 0
        if flags & w.CMD_FLAG_FUA and cmd in _CHANGING:
            error = self._flush()
        self._reply(error, handle, data)


class _Flusher:
    """NBD FLUSH in a thread of its own, so that the connection goes on
    applying the requests that follow while the device flushes (an fsync
    under write-back can take seconds, and the primary's writes would wait
    that long).  The reply goes out when the device flush is done (NBD
    replies need not come in order); that flush started after every request
    received before the FLUSH was applied, so it covers them.  FLUSHes that
    queue up meanwhile share the next device flush."""

    def __init__(self, session: "_Session"):
        self.session = session
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="nbd-flush", daemon=True)
        self.thread.start()

    def submit(self, handle: int) -> None:
        self.queue.put(handle)

    def stop(self) -> None:
        """Finish the flushes submitted (NBD: a disconnect completes what is
        outstanding), then end the thread."""
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        session, q = self.session, self.queue
        while True:
            handles = [q.get()]
            while not q.empty():
                handles.append(q.get())
            stop = None in handles
            handles = [h for h in handles if h is not None]
            if handles:
                try:
                    session.device.flush()
                    error = 0
                except Exception as e:
                    error = session._failed(e, w.CMD_FLUSH, 0, 0)
                try:
                    for h in handles:
                        session._reply(error, h)
                    session.tw.flush()
                except _PeerGone:
                    pass  # the connection is ending: nobody to tell
            if stop:
                return


# ---- addresses ---------------------------------------------------------------------


def _address_text(sockname) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_text(sock: trio.socket.SocketType, conn_id: int) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        name = None
    if sock.family == socket.AF_UNIX:
        try:
            path = sock.getsockname()
        except OSError:
            path = ""
        return f"unix:{path}#{conn_id}"
    if isinstance(name, tuple):
        return _address_text(name)
    return f"connection #{conn_id}"


def _remove_socket(path: str, created: tuple[int, int]) -> None:
    """Remove our unix socket file, unless another server replaced it since."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == created:
            os.unlink(path)
    except OSError:
        pass


def _detect_dead_peer(sock) -> None:
    """A primary whose host died (or whose network was cut and never came
    back) would hold the one client slot for ever: TCP keepalive probes an
    idle connection after 10 s, and TCP_USER_TIMEOUT ends one whose data has
    gone unacknowledged for 30 s.  Unix sockets need neither."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)
    except (OSError, AttributeError) as e:  # not Linux
        log.debug("cannot set TCP keepalive: %s", e)
