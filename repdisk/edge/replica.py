"""The replica link: one libnbd handle to the secondary, driven by trio, with
many requests in flight.

Only this module touches `nbd.Error`; everything that goes wrong leaves it as a
ReplicaError carrying libnbd's message and errno.

How the handle is driven
------------------------
libnbd is used through its aio API only.  Requests are issued with
aio_pwrite/aio_zero/aio_trim/aio_flush/aio_pread, each with a completion
callback that just appends (request, errno) to a list; the list is processed
after the libnbd call returns (libnbd must not be re-entered from its own
callbacks).  run() owns two tasks:

- the reader waits until the socket is readable, then calls aio_notify_read()
  and keeps calling it while the socket stays readable (libnbd consumes about
  one reply per notification).  It never notifies when the socket is not
  readable: that would park the handle in its reply state and every request
  issued afterwards would be queued but never sent.
- the writer sleeps until libnbd has output it could not send without
  blocking (aio_get_direction() has the WRITE bit after an aio_* call or a
  read notification), then waits until the socket is writable and calls
  aio_notify_write() until the output is gone.

Waiting inline (sync mode)
--------------------------
Waiting for a reply through the reader task costs trio scheduling rounds
that the primary pays on every sync write (~15 us each here).  With
set_inline_wait(ms, wake_fd), a write(wait=True) that is the only request
at the server polls the socket itself, blocking the loop (each poll up to
`ms`, at most four: a reply may arrive in pieces, or an overlapping request
may be answered first), and handles the reply right there.  It gives up, and
waits the normal way, as soon as wake_fd (the FUSE device: another request
for the node) becomes readable, when libnbd still has output to send, or
when a poll times out.  So the loop is not held while another FUSE request
waits, and never for more than 4 x `ms` (plus the spin below, if on).

Polling for the reply (sync mode)
---------------------------------
The inline wait of a sync write first polls without sleeping (poll with
timeout 0) for up to max_s (set_reply_poll), and sleeps only if the reply has
not come by then: the wake-up it saves is tens of microseconds on every sync
write's critical path here.  It spins only while that pays (edge/spin.py,
SpinPolicy): over a slow link, replies in milliseconds, the primary stops
spinning within a few dozen writes and then spends at most max_s per 16.

Batching (async mode)
---------------------
A request at a time costs the primary a trio round per reply and the
secondary a read per request; a batch of requests in flight costs a fraction
of that per request.  At queue depth 1 an async primary never has more than
one request at the server, so with set_batching(n, delay) writes that nobody
waits for (wait=False, at most BATCH_MAX_WRITE bytes) are held: admitted and
indexed, but not yet handed to libnbd.  The batch goes out, in start order,
when n are held, `delay` seconds after it opened, or at once when anything
else is started (a larger write, zero, trim, read: the wire keeps start
order) or waits for the link (a write with wait=True, flush, settle, drain,
close, a request waiting for admission).  Held requests count as outstanding
(inflight_requests); a failure of the link reports them like requests in
flight.  Replication trails the local disk by at most `delay` more.

Ordering and flow control
-------------------------
NBD servers may run concurrent requests in any order, so a write/zero/trim
(or read) whose range overlaps a request that is still outstanding is held
back until that request completed: FIFO among overlapping requests,
non-overlapping ones pass freely.  Overlaps are found through an index of
1 MiB stripes, so a request costs a dict lookup or two, not a scan.

A request is admitted when fewer than max_requests requests and at most
max_bytes payload bytes (write data and read buffers) are outstanding;
"outstanding" counts requests held back by an overlap too, so memory stays
bounded.  Admission is FIFO.  Requests larger than the chunk size (4 MiB, or
the server's maximum block size if smaller) are split into chunks, each its
own request; zero and trim are split at 1 GiB.  A request larger than
max_bytes is admitted when nothing else is outstanding.

Failures
--------
Any error ends the link: a lost connection, a protocol error, or an error
reply to any request.  `failed` is set, on_failure is called for the range of
every write/zero/trim not known to have succeeded (in flight, held back,
waiting for admission), every waiter wakes up with a ReplicaError, and run()
returns.  After that every call raises at once (write/zero/trim still report
their range to on_failure first).  The node resynchronises those ranges
later, so reporting too much is safe and reporting too little is not.
Requests still outstanding when close() gives up waiting, and a write whose
caller is cancelled while it waits for admission, are reported too; a run()
cancelled from outside fails the link ("stopped").

Servers without FUA get a flush after a fua=True write (the write counts once
the flush succeeded); without WRITE_ZEROES, zero() sends zeros; without TRIM,
trim() sends WRITE_ZEROES.
"""

import collections
import errno as _errno
import logging
import os
import re
import select
import socket
from time import perf_counter as _now

import nbd
import trio

from ..core.errors import RepdiskError
from . import spin
from .spin import SpinPolicy

log = logging.getLogger(__name__)

_READ_DIR = nbd.AIO_DIRECTION_READ
_WRITE_DIR = nbd.AIO_DIRECTION_WRITE
_FUA = nbd.CMD_FLAG_FUA

CHUNK = 4 << 20  # the largest write/read sent as one NBD request
ZERO_CHUNK = 1 << 30  # the largest zero/trim sent as one NBD request
DEFAULT_MAX_BLOCK = 32 << 20  # NBD's default maximum payload when the server says nothing
_STRIPE_SHIFT = 20  # the overlap index groups requests by 1 MiB stripe
BATCH_MAX_WRITE = 64 << 10  # larger writes are never held: their cost is their bytes, not the round
# A unix socket's default send buffer (~208 KiB) takes a fifth of a 1 MiB write:
# the loop then feeds the rest while the local pwrite waits its turn, and the
# secondary idles.  With room for a 1 MiB write and the next one's start the
# request leaves in one call (fio 1 MiB seq writes on a unix pair: +25-30%;
# 4 MiB was no better, 8 MiB worse: the copies go to cache-cold memory).  TCP sizes
# its own buffers (autotuning, which setting SO_SNDBUF would stop).
UNIX_SEND_BUFFER = 2 << 20
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux's number; Python does not name it

_WRITE, _ZERO, _TRIM, _FLUSH, _READ = "write", "zero", "trim", "flush", "read"
_KINDS = (_WRITE, _ZERO, _TRIM, _FLUSH, _READ)
_RANGED = frozenset((_WRITE, _ZERO, _TRIM))  # reported to on_failure

_NBD_PREFIX = re.compile(r"^nbd_\w+: ")


class ReplicaError(RepdiskError):
    """The replica link failed; the message says what and why."""

    def __init__(self, message: str, errnum: int | None = None):
        super().__init__(message)
        self.errno = errnum or _errno.EIO


def _nbd_message(e: "nbd.Error") -> str:
    """libnbd's message without the "nbd_aio_notify_read: " prefix."""
    return _NBD_PREFIX.sub("", e.string or str(e))


def _errname(err: int) -> str:
    return f"{_errno.errorcode.get(err, 'errno ' + str(err))} ({os.strerror(err)})"


def _widen_unix_send_buffer(fd: int) -> int | None:
    """Give a unix socket UNIX_SEND_BUFFER bytes of send buffer; return the
    size it has, or None for other sockets, which keep theirs.  With
    CAP_NET_ADMIN (as root) past net.core.wmem_max, as journald does for its
    sockets; otherwise as much as that limit allows."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sk:
            if sk.family != socket.AF_UNIX:
                return None
            if sk.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < UNIX_SEND_BUFFER:
                want = UNIX_SEND_BUFFER // 2  # the kernel doubles it (its bookkeeping overhead)
                try:
                    sk.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, want)
                except PermissionError:
                    sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
            return sk.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError as e:
        log.warning("cannot size the replica socket's send buffer: %s", e)
        return None


class _Counters:
    __slots__ = ("submitted", "submitted_bytes", "completed", "completed_bytes", "failed")

    def __init__(self):
        self.submitted = self.submitted_bytes = self.completed = self.completed_bytes = self.failed = 0

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class _Req:
    """One NBD request, from admission until its reply (or the link's end)."""

    __slots__ = (
        "link", "op", "ctr", "offset", "length", "buf", "nbytes", "flags", "then_flush",
        "seq", "first", "last", "pending", "dependents", "task", "done", "error", "then", "then_error",
        "after", "started",
    )

    def __init__(self, link, op, ctr, offset, length, buf, nbytes, flags=0):
        self.link = link
        self.op = op
        self.ctr = ctr
        self.offset = offset
        self.length = length
        self.buf = buf  # write: the caller's data; read: where the reply goes
        self.nbytes = nbytes  # payload bytes held while outstanding
        self.flags = flags
        self.then_flush = False  # FUA emulated by a flush after the write
        self.seq = 0
        self.first = self.last = -1  # stripes in the overlap index; -1: not indexed
        self.pending = 0  # outstanding overlapping requests that came earlier
        self.dependents = None  # later overlapping requests held back by this one
        self.task = None  # a task parked in wait=True
        self.done = False
        self.error = None
        self.then = None  # the caller's `then`, run when this (last) piece is started
        self.then_error = None  # what it raised (or `after` raised), for the caller
        self.after = None  # the caller's `after`, run when this piece succeeded
        self.started = None  # the caller's `started`, run when this piece is started

    def reply(self, err) -> int:
        # Completion callback, called from inside libnbd: record and return.
        # Returning 1 retires the command (and releases our buffer view).
        self.link._replies.append((self, err.value))
        return 1


class ReplicaLink:
    def __init__(self, uri: str, *, max_requests: int = 64, max_bytes: int = 64 << 20):
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("max_requests and max_bytes must be positive")
        self.uri = uri
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.size = 0
        self.description = None
        self.send_buffer = None  # bytes, for a unix socket (see UNIX_SEND_BUFFER)
        self.on_failure = None
        self.failed = None

        self._h = None
        self._fd = -1
        self._poll = None
        self._can_fua = self._can_flush = self._can_zero = self._can_trim = False
        self._chunk = CHUNK
        self._zero_buf = None

        self._seq = 0
        self._active = {}  # seq -> _Req, oldest first: admitted, not completed
        self._stripes = {}  # stripe -> [_Req] of the active ranged requests
        self._nreq = 0  # admitted requests (reserved capacity)
        self._nbytes = 0  # their payload bytes
        self._sent = 0  # requests handed to libnbd, not yet answered
        self._admit_q = collections.deque()  # [task, _Req, admitted] waiting for capacity
        self._cond_waiters = []  # [predicate, task] for flush/drain/close
        self._replies = []  # (req, errno) appended by completion callbacks

        self._closing = False  # close() was called: new calls are refused
        self._refuse = True  # not connected, failed or closing: entry points take the slow path
        self._running = False
        self._run_scope = None
        self._run_done = trio.Event()
        self._want_write = trio.Event()  # wakes the writer
        self._reader_kick = trio.Event()  # wakes a reader that waits for a direction change

        self._inline_ms = 0  # set_inline_wait: 0 = off
        self._inline_wake = -1
        self._inline_poll = None
        self._inline_done = 0  # replies handled by an inline wait
        self._reply_poll: SpinPolicy | None = None  # set_reply_poll

        self._batch_max = 0  # set_batching: 0 = off
        self._batch_delay = 0.0
        self._batch = []  # admitted requests whose submission is deferred, in start order
        self._batch_kick = trio.Event()  # wakes the batcher when a batch opens
        self._batch_timer = None  # the batcher's wait, while it waits
        self._batches = 0  # batches sent
        self._batched = 0  # requests sent in them

        self._ctr = {k: _Counters() for k in _KINDS}
        self._wctr = self._ctr[_WRITE]
        self._max_depth = 0
        self._max_outstanding = 0
        self._max_inflight_bytes = 0
        self._held_back = 0
        self._failures = 0

    # -- properties and statistics -------------------------------------------

    @property
    def inflight_requests(self) -> int:
        """Requests admitted and not completed (including those held back by an
        overlapping earlier request)."""
        return self._nreq

    @property
    def inflight_bytes(self) -> int:
        """Payload bytes (write data, read buffers) of those requests."""
        return self._nbytes

    def statistics(self) -> dict:
        stats = {k: c.as_dict() for k, c in self._ctr.items()}
        stats.update(
            inflight_requests=self._nreq,
            inflight_bytes=self._nbytes,
            sent_requests=self._sent,
            waiting_for_admission=len(self._admit_q),
            max_depth=self._max_depth,  # most requests at the server at once
            max_outstanding=self._max_outstanding,  # most admitted at once
            max_inflight_bytes=self._max_inflight_bytes,
            held_back=self._held_back,  # requests that waited for an overlapping one
            failures=self._failures,  # requests reported to on_failure
            inline_replies=self._inline_done,  # sync writes answered while waiting inline
            **spin.statistics(self._reply_poll, "reply_poll", "replies"),
            batches=self._batches,  # set_batching: batches sent, and the requests in them
            batched_requests=self._batched,
            send_buffer=self.send_buffer,
            failed=str(self.failed) if self.failed is not None else None,
        )
        return stats

    def set_inline_wait(self, ms: int, wake_fd: int | None) -> None:
        """Let a lone write(wait=True) wait for its reply inline for up to
        `ms` milliseconds unless `wake_fd` becomes readable (module doc).
        ms=0 or no wake_fd turns it off."""
        if wake_fd is None or ms <= 0:
            self._inline_ms, self._inline_wake = 0, -1
        else:
            self._inline_ms, self._inline_wake = int(ms), wake_fd
        self._inline_poll = None

    def set_reply_poll(self, max_s: float) -> None:
        """Let an inline wait poll without sleeping for up to `max_s` seconds
        before it sleeps, while that pays (module doc, "Polling for the
        reply"); 0 turns it off."""
        self._reply_poll = spin.policy(max_s)

    def set_batching(self, max_requests: int, delay: float) -> None:
        """Hold small writes that nobody waits for and send them together:
        when `max_requests` are held, `delay` seconds after the first, or as
        soon as anything waits for the link (module doc, "Batching").
        max_requests <= 1 or delay <= 0 turns it off (and sends what is held)."""
        self._batch_max = max_requests if max_requests > 1 and delay > 0 else 0
        self._batch_delay = delay
        if self._batch_timer is not None:
            self._batch_timer.cancel()  # the batcher sends what is held now
        if not self._batch_max:
            self._send_batch()

    # -- connecting -----------------------------------------------------------

    async def connect(self, *, timeout: float | None = 30.0) -> None:
        """Connect and negotiate (NBD URI: nbd://host:port/export,
        nbd+unix:///export?socket=PATH).  The TCP name lookup, if the URI names
        a host rather than an address, happens inside libnbd and blocks."""
        if self._h is not None or self.failed is not None or self._closing:
            raise ReplicaError(f"replica link to {self.uri}: connect() called twice", _errno.EISCONN)
        h = nbd.NBD()
        error = None
        try:
            h.set_full_info(True)
            h.set_pread_initialize(False)  # we never look at a failed read's buffer
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                h.aio_connect_uri(self.uri)
                await self._drive_handshake(h)
            self._setup(h)
        except nbd.Error as e:
            error = ReplicaError(f"cannot connect to {self.uri}: {_nbd_message(e)}", e.errnum)
        except trio.TooSlowError:
            error = ReplicaError(
                f"cannot connect to {self.uri}: no answer within {timeout} s ({h.connection_state()})",
                _errno.ETIMEDOUT,
            )
        if error is not None:
            # Raised outside the except clause so that no traceback keeps the
            # handle (and its socket) alive: dropping the last reference closes it.
            del h
            raise error

    @staticmethod
    async def _drive_handshake(h) -> None:
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise ReplicaError(f"connection ended during the handshake ({h.connection_state()})", _errno.ECONNRESET)
            fd = h.aio_get_fd()  # may change while libnbd tries several addresses
            d = h.aio_get_direction()
            if d & _READ_DIR and d & _WRITE_DIR:
                readable = await _wait_either(fd)
            elif d & _READ_DIR:
                await trio.lowlevel.wait_readable(fd)
                readable = True
            elif d & _WRITE_DIR:
                await trio.lowlevel.wait_writable(fd)
                readable = False
            else:
                raise ReplicaError(f"handshake stalled ({h.connection_state()})", _errno.EPROTO)
            if readable:
                h.aio_notify_read()
            else:
                h.aio_notify_write()

    def _setup(self, h) -> None:
        self.size = h.get_size()
        try:
            self.description = h.get_export_description()
        except nbd.Error:
            self.description = None
        max_block = h.get_block_size(nbd.SIZE_MAXIMUM) or DEFAULT_MAX_BLOCK
        self._chunk = max(1, min(CHUNK, max_block))
        self._can_fua = bool(h.can_fua())
        self._can_flush = bool(h.can_flush())
        self._can_zero = bool(h.can_zero())
        self._can_trim = bool(h.can_trim())
        self._fd = h.aio_get_fd()
        self.send_buffer = _widen_unix_send_buffer(self._fd)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._h = h
        self._refuse = self._closing
        log.info(
            "replica link connected to %s: %d bytes, chunk %d, fua=%s flush=%s zero=%s trim=%s structured=%s"
            " send buffer %s",
            self.uri, self.size, self._chunk, self._can_fua, self._can_flush, self._can_zero,
            self._can_trim, bool(h.get_structured_replies_negotiated()), self.send_buffer,
        )
        min_block = h.get_block_size(nbd.SIZE_MINIMUM)
        if min_block > 1:
            # libnbd (strict mode) refuses unaligned requests: one would fail the link.
            log.warning("%s wants requests aligned to %d bytes", self.uri, min_block)
        if not self._can_zero:
            log.warning("%s cannot write zeroes: zero() writes a buffer of zeros", self.uri)
        if not self._can_trim:
            log.warning("%s cannot trim: trim() zeroes instead", self.uri)

    # -- the event loop -------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Drive the handle until close() or the link's failure; then return."""
        if self._h is None:
            raise ReplicaError(f"replica link to {self.uri}: run() before connect()", _errno.ENOTCONN)
        if self._running or self._run_done.is_set():
            raise ReplicaError(f"replica link to {self.uri}: run() called twice", _errno.EBUSY)
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                self._run_scope = nursery.cancel_scope
                if self._dead():
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._batcher)
                task_status.started()
        finally:
            self._running = False
            self._run_scope = None
            if self.failed is None and not self._closing:
                # Cancelled from outside: nobody will drive the handle any more.
                self._fail(ReplicaError(f"replica link to {self.uri} stopped", _errno.ESHUTDOWN), logging.INFO)
            self._release_handle()
            self._run_done.set()

    async def _reader(self) -> None:
        h = self._h
        fd = self._fd
        wait_readable = trio.lowlevel.wait_readable
        while True:
            if self._gone(h):
                return
            await wait_readable(fd)
            try:
                self._read_replies(h)
                d = h.aio_get_direction()
            except nbd.Error as e:
                self._fail(ReplicaError(f"connection to {self.uri} lost: {_nbd_message(e)}", e.errnum))
                return
            if self._dead():
                return
            if d & _WRITE_DIR:
                self._want_write.set()
            if not d & _READ_DIR:
                if self._stopped_by_peer(h):
                    return
                # Nothing to read in this state: wait until the writer moved on.
                self._reader_kick = trio.Event()
                await self._reader_kick.wait()

    def _read_replies(self, h) -> None:
        """The socket is readable: about one reply per notification, so keep
        going while it stays readable (never when it is not, see the module
        doc), then handle the replies in one batch.  Once every request at
        the server has its reply there is nothing left to read for now: no
        poll (at QD1, one syscall less per request).  Raises nbd.Error."""
        poll = self._poll.poll
        replies = self._replies
        for _ in range(64):
            if not h.aio_get_direction() & _READ_DIR:
                break
            h.aio_notify_read()
            if len(replies) >= self._sent or not poll(0):
                break
        if self._replies:
            self._process_replies()

    async def _writer(self) -> None:
        h = self._h
        fd = self._fd
        while True:
            await self._want_write.wait()
            self._want_write = trio.Event()
            if self._gone(h):
                return
            try:
                while h.aio_get_direction() & _WRITE_DIR:
                    await trio.lowlevel.wait_writable(fd)
                    h.aio_notify_write()
                    if self._replies:
                        self._process_replies()
                    if self._dead():
                        return
            except nbd.Error as e:
                self._fail(ReplicaError(f"connection to {self.uri} lost: {_nbd_message(e)}", e.errnum))
                return
            self._reader_kick.set()
            if self._stopped_by_peer(h):
                return

    async def _batcher(self) -> None:
        while True:
            await self._batch_kick.wait()
            self._batch_kick = trio.Event()
            with trio.move_on_after(self._batch_delay) as self._batch_timer:
                await trio.sleep_forever()
            self._batch_timer = None
            self._send_batch()

    def _send_batch(self) -> None:
        """Submit the held requests, in start order."""
        batch = self._batch
        if not batch:
            return
        self._batch = []
        self._batches += 1
        self._batched += len(batch)
        for req in batch:
            if self._dead():
                return  # _abort_all failed them all
            self._submit(req)
        if self._replies:
            self._process_replies()

    def _gone(self, h) -> bool:
        """Before waiting on the socket: the link failed, or the handle died
        (and closed the socket) in a call that did not raise.  Waiting on a
        closed descriptor would crash the loop."""
        if self._dead():
            return True
        if h.aio_is_dead() or h.aio_is_closed():
            return self._stopped_by_peer(h)
        return False

    def _stopped_by_peer(self, h) -> bool:
        """After aio_disconnect the handle ends up closed: stop run().  A handle
        that died without raising is a lost connection."""
        if h.aio_is_closed():
            if not self._closing:
                self._fail(ReplicaError(f"connection to {self.uri} closed", _errno.ECONNRESET))
            self._stop_run()
            return True
        if h.aio_is_dead():
            self._fail(ReplicaError(f"connection to {self.uri} lost ({h.connection_state()})", _errno.ECONNRESET))
            return True
        return False

    def _stop_run(self) -> None:
        if self._run_scope is not None:
            self._run_scope.cancel()

    def _release_handle(self) -> None:
        # nbd.NBD has no close() in libnbd 1.14: the handle (and its socket) is
        # closed when the last reference goes; this is the only one left.
        self._h = None
        self._poll = self._inline_poll = None
        self._replies.clear()

    def _dead(self) -> bool:
        """No more requests can be sent."""
        return self.failed is not None or self._h is None

    # -- requests -------------------------------------------------------------
    #
    # The hot path (a write of at most one chunk with capacity to spare) is
    # synchronous from admission to aio_pwrite: no await, no coroutine layer.

    async def write(self, buf, offset: int, *, fua: bool = False, wait: bool = True, then=None,
                    after=None, started=None) -> None:
        """buf: bytes or any buffer the caller does not modify until the reply;
        libnbd sends from it directly (no copy).  `then`: a plain callable run
        when the write's last piece is started (handed to libnbd, or queued
        behind an overlapping earlier request), in the order requests are
        started, before waiting for the reply (the primary writes its own disk
        there, while the secondary works); not run if nothing is started (an
        empty or refused write, a failure before that); its exception
        propagates to the caller.  `after(offset, length)`: a plain callable
        run for each piece (request) of the write once the server reported
        its success, as the reply is handled, before any later overlapping
        request is sent (the primary's replica-first writes write their own
        disk there); not run for a piece that failed.  Needs wait=True: its
        exception propagates to the caller once the write is done.
        `started(offset, length)`: a plain callable that must not raise, run
        for each piece as it is started, when it takes its place in the order
        settle() and flush() cover: a flush that starts later covers it
        (the primary records there what a failed flush leaves in doubt)."""
        if type(buf) is bytes:
            length = len(buf)
        else:
            buf = memoryview(buf)
            if buf.itemsize != 1 or buf.ndim != 1:
                buf = buf.cast("B")
            length = buf.nbytes
        if self._refuse or offset < 0 or offset + length > self.size or not length:
            self._check(_WRITE, offset, length)
            if not length:
                return
        if fua or length > self._chunk:
            return await self._write_chunks(memoryview(buf), offset, length, fua, wait, then, after, started)
        req = _Req(self, _WRITE, self._wctr, offset, length, buf, length)
        req.then = then
        req.after = after
        req.started = started
        if self._admit_q or self._nreq >= self.max_requests or (self._nbytes + length > self.max_bytes and self._nreq):
            await self._admit_slow(req, offset + length)  # started by _pump, in arrival order
        else:
            self._nreq += 1
            self._nbytes += length
            self._start(req, not wait and self._batch_max and length <= BATCH_MAX_WRITE)
            if wait and self._inline_ms and self._sent == 1 and not req.done:
                self._wait_inline(req)
        if req.then_error is not None:
            raise req.then_error
        if wait:
            await self._wait_req(req)
            if req.then_error is not None:
                raise req.then_error

    def _wait_inline(self, req) -> None:
        """Block for req's reply (module doc, "Waiting inline"); return early,
        leaving it to the reader task, when anything else needs the loop.

        Reading replies here, outside the reader task, is safe only because req
        is the sole request at the server: the reader cannot hold a wake-up for
        a reply this reads (an earlier unanswered request would make _sent > 1),
        so it never notifies libnbd of input that is gone (module doc).  A
        second reader of the socket without that guarantee would need a poll
        before every notification."""
        h = self._h
        poll = self._inline_poll
        if poll is None:
            poll = self._inline_poll = select.poll()
            poll.register(self._fd, select.POLLIN)
            poll.register(self._inline_wake, select.POLLIN)
        wake = self._inline_wake
        rp = self._reply_poll
        spun = spin_until = 0.0
        try:
            if h.aio_get_direction() & _WRITE_DIR:
                return  # not all sent yet: the writer task finishes that
            if rp is not None:
                spun = rp.window()
                if spun:
                    spin_until = _now() + spun
            sleeps = 0
            while sleeps < 4:
                if spin_until:
                    events = poll.poll(0)
                    if not events:
                        if _now() >= spin_until:
                            spin_until = 0.0
                        continue
                else:
                    events = poll.poll(self._inline_ms)
                    sleeps += 1
                    if not events:
                        break
                for fd, _ev in events:
                    if fd == wake:
                        return  # another FUSE request: its length says nothing of the link
                self._read_replies(h)
                if req.done or self._dead():
                    if req.done and req.error is None:
                        self._inline_done += 1
                        if spun:
                            rp.record(spin_until > 0.0)  # still spinning: caught
                    return
            if spun:
                rp.record(False)  # no reply within the inline wait
        except nbd.Error as e:
            self._fail(ReplicaError(f"connection to {self.uri} lost: {_nbd_message(e)}", e.errnum))

    async def _write_chunks(self, mv, offset, length, fua, wait, then, after, started) -> None:
        flags = 0
        then_flush = False
        if fua:
            if self._can_fua:
                flags = _FUA
            elif self._can_flush:
                then_flush = True  # emulated: the write counts once a flush after it succeeded
        chunk = self._chunk
        end = offset + length
        reqs = []
        for pos in range(0, length, chunk):
            n = min(chunk, length - pos)
            req = _Req(self, _WRITE, self._wctr, offset + pos, n, mv[pos : pos + n], n, flags)
            req.then_flush = then_flush
            req.after = after
            req.started = started
            if pos + n == length:
                req.then = then
            await self._issue(req, end)
            reqs.append(req)
        await self._issued(reqs, wait)

    async def _issued(self, reqs, wait) -> None:
        """Every request of a call is started (the last one ran `then`): raise
        what `then` raised, then wait if asked."""
        if reqs[-1].then_error is not None:
            raise reqs[-1].then_error
        if wait:
            for req in reqs:
                await self._wait_req(req)
            for req in reqs:
                if req.then_error is not None:
                    raise req.then_error

    async def zero(self, offset: int, length: int, *, wait: bool = True, then=None, after=None,
                   started=None) -> None:
        """NBD WRITE_ZEROES, holes allowed (no NO_HOLE flag).  `then`, `after`
        and `started` as in write()."""
        self._check(_ZERO, offset, length)
        if length:
            await self._zero_or_trim(_ZERO if self._can_zero else None, offset, length, wait, then, after,
                                     started)

    async def trim(self, offset: int, length: int, *, wait: bool = True) -> None:
        """NBD TRIM; a server that cannot trim gets WRITE_ZEROES instead."""
        self._check(_TRIM, offset, length)
        if length:
            op = _TRIM if self._can_trim else _ZERO if self._can_zero else None
            await self._zero_or_trim(op, offset, length, wait, None, None, None)

    async def _zero_or_trim(self, op, offset, length, wait, then, after, started) -> None:
        end = offset + length
        reqs = []
        if op is None:  # the server cannot write zeroes: send zeros
            if self._zero_buf is None:
                self._zero_buf = memoryview(bytes(self._chunk))
            for pos in range(0, length, self._chunk):
                n = min(self._chunk, length - pos)
                req = _Req(self, _WRITE, self._wctr, offset + pos, n, self._zero_buf[:n], n)
                req.after = after
                req.started = started
                if pos + n == length:
                    req.then = then
                await self._issue(req, end)
                reqs.append(req)
        else:
            ctr = self._ctr[op]
            for pos in range(0, length, ZERO_CHUNK):
                req = _Req(self, op, ctr, offset + pos, min(ZERO_CHUNK, length - pos), None, 0)
                req.after = after
                req.started = started
                if pos + ZERO_CHUNK >= length:
                    req.then = then
                await self._issue(req, end)
                reqs.append(req)
        await self._issued(reqs, wait)

    async def flush(self) -> None:
        """Wait for every request submitted before, then NBD FLUSH and its reply."""
        self._check(_FLUSH, 0, 0)
        limit = self._seq
        if self._active and next(iter(self._active)) < limit:
            await self._wait_cond(lambda: not self._active or next(iter(self._active)) >= limit)
        if not self._can_flush:
            return
        req = _Req(self, _FLUSH, self._ctr[_FLUSH], 0, 0, None, 0)
        await self._issue(req, None)
        await self._wait_req(req)

    async def settle(self) -> None:
        """Wait until every request submitted before has completed (no FLUSH;
        later requests are not waited for, so this cannot starve)."""
        self._check(_FLUSH, 0, 0)
        limit = self._seq
        if self._active and next(iter(self._active)) < limit:
            await self._wait_cond(lambda: not self._active or next(iter(self._active)) >= limit)

    async def drain(self) -> None:
        """Wait until no request is outstanding (nor waiting for admission)."""
        self._check(_FLUSH, 0, 0)
        if self._nreq or self._admit_q:
            await self._wait_cond(self._idle)

    def _idle(self) -> bool:
        return not self._nreq and not self._admit_q

    async def read(self, offset: int, length: int, *, task_status=trio.TASK_STATUS_IGNORED) -> bytes:
        """NBD READ.  Started with nursery.start(), it reports started once
        every request of the read is submitted (waiting for admission if the
        link is full), so the caller knows the reply is on its way."""
        self._check(_READ, offset, length)
        if length == 0:
            task_status.started()
            return b""
        ba = bytearray(length)
        mv = memoryview(ba)
        ctr = self._ctr[_READ]
        reqs = []
        for pos in range(0, length, self._chunk):
            n = min(self._chunk, length - pos)
            req = _Req(self, _READ, ctr, offset + pos, n, mv[pos : pos + n], n)
            await self._issue(req, None)
            reqs.append(req)
        task_status.started()
        for req in reqs:
            await self._wait_req(req)
        return bytes(ba)

    async def close(self, *, timeout: float = 10.0) -> None:
        """Drain (best effort, up to timeout seconds), send NBD_CMD_DISC, stop
        run().  Requests still outstanding then are reported to on_failure."""
        if self._closing:
            if self._running:
                await self._run_done.wait()
            return
        self._closing = self._refuse = True
        h = self._h
        if h is None:
            return
        try:
            if self._running and self.failed is None:
                with trio.move_on_after(timeout):
                    if not self._idle():
                        try:
                            await self._wait_cond(self._idle)
                        except ReplicaError:
                            pass
                    if self.failed is None and self._h is not None:
                        try:
                            h.aio_disconnect(0)
                            if h.aio_is_closed():
                                self._stop_run()
                            elif h.aio_get_direction() & _WRITE_DIR:
                                self._want_write.set()
                        except nbd.Error as e:
                            log.debug("disconnect from %s: %s", self.uri, _nbd_message(e))
                            self._stop_run()
                        await self._run_done.wait()
        finally:
            self._abort_all(ReplicaError(f"replica link to {self.uri} closed before the reply", _errno.ESHUTDOWN))
            if self._running:
                self._stop_run()
                with trio.CancelScope(shield=True):
                    await self._run_done.wait()
            else:
                self._release_handle()
        log.info("replica link to %s closed", self.uri)

    # -- admission, ordering, submission --------------------------------------

    def _check(self, op, offset, length) -> None:
        """The slow path of the checks at every entry point: raise if the
        request is out of range or the link cannot take it."""
        if self._h is None and self.failed is None and not self._closing:
            raise ReplicaError(f"replica link to {self.uri} is not connected", _errno.ENOTCONN)
        if op is not _FLUSH and (offset < 0 or length < 0 or offset + length > self.size):
            raise ReplicaError(
                f"{op} of {length} bytes at offset {offset} is outside the replica ({self.size} bytes)",
                _errno.EINVAL,
            )
        if self.failed is not None or self._closing:
            err = self._down_error()
            if op in _RANGED:
                self._report(offset, length, err)
            raise err

    def _down_error(self) -> ReplicaError:
        if self.failed is not None:
            return ReplicaError(f"replica link to {self.uri} is down: {self.failed}", self.failed.errno)
        return ReplicaError(f"replica link to {self.uri} is closed", _errno.ESHUTDOWN)

    async def _issue(self, req, report_end) -> None:
        """Admit and start one request.  report_end: for write/zero/trim, the
        end of the caller's range; if this request cannot be admitted,
        [req.offset, report_end) goes to on_failure (the caller stops there)."""
        if self._admit_q or self._nreq >= self.max_requests or (
            self._nbytes + req.nbytes > self.max_bytes and self._nreq
        ):
            await self._admit_slow(req, report_end)  # started by _pump, in arrival order
        elif self._dead():
            self._admit_failed(req, report_end, self._down_error())
        else:
            self._nreq += 1
            self._nbytes += req.nbytes
            self._start(req)

    async def _admit_slow(self, req, report_end) -> None:
        """Wait for capacity, first come first served.  Returns with the
        request started: _pump starts admitted requests itself, in queue
        order, because trio runs the tasks it wakes together in any order (and
        overlapping requests go on the wire in the order they were started)."""
        self._send_batch()  # what we wait for may be in it
        if self._dead():  # sending it failed the link
            self._admit_failed(req, report_end, self._down_error())
        entry = [trio.lowlevel.current_task(), req, False]
        self._admit_q.append(entry)

        def abort(_):
            # Only called before reschedule(): no capacity was reserved.
            self._admit_q.remove(entry)
            self._pump()  # the head may have changed
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        except BaseException:  # cancelled: nothing was sent
            err = ReplicaError(f"{req.op} cancelled before it was sent", _errno.ECANCELED)
            if report_end is not None:
                self._report(req.offset, report_end - req.offset, err)
            raise
        if not entry[2] or self._dead():  # woken by _abort_all (which zeroed the counters)
            self._admit_failed(req, report_end, self._down_error())

    def _admit_failed(self, req, report_end, err) -> None:
        if report_end is not None:
            self._report(req.offset, report_end - req.offset, err)
        raise err

    def _start(self, req, hold=False) -> None:
        """Index an admitted request and send it unless an overlapping earlier
        one is outstanding; `hold`: add it to the batch instead (set_batching).
        Runs right after admission, with no await in between: the index must
        always match what was admitted."""
        if self._nreq > self._max_outstanding:
            self._max_outstanding = self._nreq
        if self._nbytes > self._max_inflight_bytes:
            self._max_inflight_bytes = self._nbytes
        req.seq = seq = self._seq
        self._seq = seq + 1
        self._active[seq] = req
        if req.started is not None:
            try:
                req.started(req.offset, req.length)
            except Exception as e:  # a caller's bug: the request's range goes to on_failure
                self._fail(ReplicaError(f"the caller's started() failed: {e!r}"))
                return
        if req.op is not _FLUSH and self._index(req):
            self._held_back += 1
        elif hold:
            batch = self._batch
            batch.append(req)
            if len(batch) >= self._batch_max:
                self._send_batch()
            elif len(batch) == 1:
                self._batch_kick.set()
        else:
            if self._batch:
                self._send_batch()  # the wire keeps start order
            self._submit(req)
        if req.then is not None:
            # The caller's `then` runs here, when the request is started (sent, or
            # queued behind an overlapping earlier one), in start order.
            then, req.then = req.then, None
            try:
                then()
            except Exception as e:
                req.then_error = e
        if self._replies:
            self._process_replies()

    def _index(self, req) -> bool:
        """Add req to the overlap index; True if it must wait for others."""
        start = req.offset
        end = start + req.length
        first = start >> _STRIPE_SHIFT
        last = (end - 1) >> _STRIPE_SHIFT
        req.first = first
        req.last = last
        stripes = self._stripes
        is_read = req.op is _READ
        pending = 0
        seen = None if first == last else set()
        for s in range(first, last + 1):
            lst = stripes.get(s)
            if lst is None:
                stripes[s] = [req]
                continue
            for other in lst:
                if other.offset < end and start < other.offset + other.length and not (is_read and other.op is _READ):
                    if seen is not None:
                        if other in seen:
                            continue
                        seen.add(other)
                    pending += 1
                    if other.dependents is None:
                        other.dependents = [req]
                    else:
                        other.dependents.append(req)
            lst.append(req)
        req.pending = pending
        return pending > 0

    def _submit(self, req) -> None:
        h = self._h
        try:
            op = req.op
            if op is _WRITE:
                h.aio_pwrite(req.buf, req.offset, req.reply, req.flags)
            elif op is _ZERO:
                h.aio_zero(req.length, req.offset, req.reply, 0)
            elif op is _TRIM:
                h.aio_trim(req.length, req.offset, req.reply, 0)
            elif op is _FLUSH:
                h.aio_flush(req.reply, 0)
            else:
                h.aio_pread(req.buf, req.offset, req.reply, 0)
            d = h.aio_get_direction()
        except nbd.Error as e:
            what = f"{req.op} of {req.length} bytes at offset {req.offset}"
            self._fail(ReplicaError(f"{what}: {_nbd_message(e)}", e.errnum))
            return
        ctr = req.ctr
        ctr.submitted += 1
        ctr.submitted_bytes += req.length
        self._sent += 1
        if self._sent > self._max_depth:
            self._max_depth = self._sent
        if d & _WRITE_DIR:
            self._want_write.set()

    def _submit_flush_for(self, req) -> None:
        try:
            self._h.aio_flush(req.reply, 0)
            d = self._h.aio_get_direction()
        except nbd.Error as e:
            self._fail(ReplicaError(f"flush after a write at offset {req.offset}: {_nbd_message(e)}", e.errnum))
            return
        self._sent += 1
        if d & _WRITE_DIR:
            self._want_write.set()

    def _process_replies(self) -> None:
        """Handle the replies recorded by completion callbacks (never called
        from inside a libnbd call)."""
        active = self._active
        ready = None
        while self._replies:
            replies, self._replies = self._replies, []
            for req, err in replies:
                if req.done:  # already failed by _fail
                    continue
                self._sent -= 1
                if err:
                    self._fail(self._reply_error(req, err))
                    return
                if req.then_flush:
                    req.then_flush = False
                    self._submit_flush_for(req)
                    continue
                req.done = True
                if req.after is not None:
                    after, req.after = req.after, None
                    try:
                        after(req.offset, req.length)
                    except Exception as e:
                        req.then_error = e
                ctr = req.ctr
                ctr.completed += 1
                ctr.completed_bytes += req.length
                del active[req.seq]
                self._nreq -= 1
                self._nbytes -= req.nbytes
                req.buf = None
                if req.first >= 0:
                    self._unindex(req)
                    if req.dependents is not None:
                        for d in req.dependents:
                            d.pending -= 1
                            if not d.pending:
                                if ready is None:
                                    ready = [d]
                                else:
                                    ready.append(d)
                        req.dependents = None
                if req.task is not None:
                    trio.lowlevel.reschedule(req.task)
                    req.task = None
            if ready:
                ready.sort(key=_seq_of)
                for req in ready:
                    if self._dead():
                        return
                    self._submit(req)
                ready = None
            if self.failed is not None:
                return
        if self._admit_q:
            self._pump()
        if self._cond_waiters:
            self._check_conds()

    def _unindex(self, req) -> None:
        stripes = self._stripes
        for s in range(req.first, req.last + 1):
            lst = stripes[s]
            if len(lst) == 1:
                del stripes[s]
            else:
                lst.remove(req)

    def _reply_error(self, req, err) -> ReplicaError:
        h = self._h
        if err == _errno.ENOTCONN or h is not None and (h.aio_is_dead() or h.aio_is_closed()):
            # Not a server reply (ENOTCONN is no NBD error): libnbd retiring the
            # requests of a connection that ended.
            state = h.connection_state() if h is not None else "closed"
            return ReplicaError(f"connection to {self.uri} lost ({state})", _errno.ENOTCONN)
        what = "flush" if req.op is _FLUSH else f"{req.op} of {req.length} bytes at offset {req.offset}"
        return ReplicaError(f"{self.uri}: {what} failed: server replied {_errname(err)}", err)

    def _pump(self) -> None:
        """Admit and start waiters from the head of the queue while capacity
        allows (see _admit_slow)."""
        q = self._admit_q
        while q and not self._dead():
            entry = q[0]
            nbytes = entry[1].nbytes
            if self._nreq >= self.max_requests or (self._nbytes + nbytes > self.max_bytes and self._nreq):
                return
            q.popleft()
            self._nreq += 1
            self._nbytes += nbytes
            entry[2] = True
            trio.lowlevel.reschedule(entry[0])
            self._start(entry[1])

    async def _wait_req(self, req) -> None:
        if not req.done:
            # What req waits for may be held: a request that overlaps a held
            # one is held back behind it, not sent with the batch.
            self._send_batch()
        if not req.done:
            req.task = trio.lowlevel.current_task()

            def abort(_):
                req.task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        if req.error is not None:
            raise req.error

    async def _wait_cond(self, predicate) -> None:
        """Park until predicate() holds (checked after replies) or the link ends."""
        self._send_batch()  # what we wait for may be in it
        if self.failed is not None:
            raise self._down_error()
        if predicate():
            return
        entry = [predicate, trio.lowlevel.current_task()]
        self._cond_waiters.append(entry)

        def abort(_):
            self._cond_waiters.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if self.failed is not None or not predicate():  # woken by _abort_all
            raise self._down_error()

    def _check_conds(self) -> None:
        keep = []
        for entry in self._cond_waiters:
            if entry[0]():
                trio.lowlevel.reschedule(entry[1])
            else:
                keep.append(entry)
        self._cond_waiters = keep

    # -- failure --------------------------------------------------------------

    def completions(self) -> int:
        """Replies received so far (all request kinds): progress for a watchdog."""
        return sum(c.completed + c.failed for c in self._ctr.values())

    def abort(self, reason: str) -> None:
        """Declare the link dead (e.g. the secondary stopped answering): every
        request in flight is failed and reported to on_failure."""
        self._fail(ReplicaError(f"replica link to {self.uri}: {reason}", _errno.ETIMEDOUT))

    def _fail(self, error: ReplicaError, level: int = logging.ERROR) -> None:
        """The link is dead: report and wake everything, stop run()."""
        if self.failed is not None:
            return
        self.failed = error
        self._refuse = True
        log.log(level, "replica link to %s failed: %s", self.uri, error)
        self._abort_all(self._down_error())
        self._stop_run()

    def _abort_all(self, err: ReplicaError) -> None:
        active = list(self._active.values())
        self._active.clear()
        self._stripes.clear()
        self._batch = []
        self._nreq = self._nbytes = self._sent = 0
        for req in active:
            req.done = True
            req.error = err
            req.buf = None
            req.dependents = None
            req.ctr.failed += 1
            if req.op in _RANGED:
                self._report(req.offset, req.length, err)
            if req.task is not None:
                trio.lowlevel.reschedule(req.task)
                req.task = None
        while self._admit_q:  # they raise and report their own ranges
            trio.lowlevel.reschedule(self._admit_q.popleft()[0])
        waiters, self._cond_waiters = self._cond_waiters, []
        for entry in waiters:
            trio.lowlevel.reschedule(entry[1])

    def _report(self, offset, length, err) -> None:
        self._failures += 1
        cb = self.on_failure
        if cb is None:
            return
        try:
            cb(offset, length, err)
        except Exception:
            log.exception("on_failure(%d, %d) raised", offset, length)


def _seq_of(req) -> int:
    return req.seq


async def _wait_either(fd) -> bool:
    """Wait until fd is readable (True) or writable (False)."""
    result = []
    async with trio.open_nursery() as nursery:

        async def one(wait, value):
            await wait(fd)
            result.append(value)
            nursery.cancel_scope.cancel()

        nursery.start_soon(one, trio.lowlevel.wait_readable, True)
        nursery.start_soon(one, trio.lowlevel.wait_writable, False)
    return result[0]


# -- the identity exchange (repdisk.core.meta) --------------------------------


def uri_export(uri: str) -> str | None:
    """The export name an NBD URI asks for ('' when none)."""
    from urllib.parse import unquote, urlsplit

    path = urlsplit(uri).path
    return unquote(path[1:] if path.startswith("/") else path)


def with_export(uri: str, name: str) -> str:
    """`uri` asking for export `name` instead of its own."""
    from urllib.parse import quote, urlsplit

    u = urlsplit(uri)
    text = f"{u.scheme}://{u.netloc}/{quote(name, safe=':=')}"  # nbd+unix has an empty authority: ///
    return text + (f"?{u.query}" if u.query else "")


def probe_description(uri: str, timeout: float = 5.0) -> str | None:
    """Blocking (run it in a thread): the export description the server gives
    for `uri`, read with NBD_OPT_INFO in libnbd's option mode, so the probe
    never enters transmission.  A server can refuse while the connection it
    just refused is still closing (one client at a time): retried briefly."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            return _probe_once(uri)
        except nbd.Error as e:
            if time.monotonic() > deadline:
                raise ReplicaError(f"cannot read the identity of {uri}: {_nbd_message(e)}", e.errnum or _errno.EIO) from None
        time.sleep(0.05)


def _probe_once(uri: str) -> str | None:
    h = nbd.NBD()  # closed when the last reference goes
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(uri)
    try:
        h.opt_info()
        try:
            return h.get_export_description()
        except nbd.Error:
            return None
    finally:
        try:
            h.opt_abort()
        except nbd.Error:
            pass


def fetch_export(uri: str, timeout: float = 5.0) -> tuple[str | None, bytes]:
    """Blocking (run it in a thread): (description, every byte) of a small
    read-only export, such as the secondary's received map.  Retried briefly
    like probe_description (one client at a time)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            h = nbd.NBD()
            h.set_full_info(True)
            h.connect_uri(uri)
            try:
                try:
                    desc = h.get_export_description()
                except nbd.Error:
                    desc = None
                size = h.get_size()
                data = bytearray(size)
                max_req = 32 << 20
                for pos in range(0, size, max_req):
                    n = min(max_req, size - pos)
                    data[pos : pos + n] = h.pread(n, pos)
            finally:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
            return desc, bytes(data)
        except nbd.Error as e:
            if time.monotonic() > deadline:
                raise ReplicaError(f"cannot read {uri}: {_nbd_message(e)}", e.errnum or _errno.EIO) from None
        time.sleep(0.05)
