"""The primary node: disk.img is the local image; every write is also sent to
the secondary over NBD (libnbd's async API, driven by trio), in sync or async
mode.  When the secondary is lost, writes keep working and every written
block is marked in the dirty bitmap; when it comes back, the marked blocks are
resynced while new writes keep replicating.

Single-threaded on trio: the lines between two awaits run atomically.  The
rules that keep the replica correct:
- a write is forwarded only when its blocks are clean and outside the range the
  sync task is reading; otherwise it is only marked dirty (the sync task sends
  it later);
- the sync task clears the dirty bits of a chunk *before* reading it, and keeps
  the chunk as `_sync_window` until the chunk is submitted, so a write that
  lands meanwhile is marked dirty again and resent after it;
- the link submits a request that overlaps one in flight only after that one
  completed, so later data always wins on the secondary.
"""

import logging
import time

import trio

from ..core.bitmap import Bitmap
from ..core.errors import ImageError, IOFailure, RepdiskError, UnknownCommand
from ..core.geometry import Geometry
from ..core.image import RawImage
from . import state as st
from .control import Progress, parse_command

log = logging.getLogger(__name__)

SYNC_CHUNK = 4 << 20  # bytes per sync request


def is_zero(buf) -> bool:
    """All zero bytes?  Checks the ends first so random data costs nothing."""
    n = len(buf)
    if n == 0 or buf[0] or buf[n - 1]:
        return False
    return buf == bytes(n)


class PrimaryNode:
    role = "primary"

    def __init__(self, image: RawImage, *, uri: str, mode: str = "sync", block_size: int = 4096,
                 async_queue: int = 64 << 20, assume_synced: bool = False, connect_timeout: float = 10.0,
                 link_factory=None):
        self.image = image
        self.geometry = Geometry(image.size, block_size)
        self.uri = uri
        self.mode = mode
        self.async_queue = async_queue
        self.connect_timeout = connect_timeout
        self.state = st.P_CONNECTING
        self.epoch = 0
        self.error: str | None = None
        self.dirty = Bitmap(self.geometry.nblocks)
        if not assume_synced:
            self.dirty.set_all()  # the secondary is not known to hold our data
        self.sync = Progress()
        self.link = None
        self.peer_identity: str | None = None  # description of the secondary last synced
        self._synced_identity: str | None = None
        self._sync_window: tuple[int, int] | None = None
        self._link_down = trio.Event()
        self._retry_now = trio.Event()
        self._state_changed = trio.Event()
        self._lock = trio.Lock()
        self.attempts = 0
        self.next_attempt: float | None = None
        self.reconnect_error: str | None = None
        self._stopping = False  # a clean stop closes the link: not a failure
        self._link_factory = link_factory
        self.writes_forwarded = 0
        self.writes_marked = 0

    @property
    def size(self) -> int:
        return self.geometry.size

    def _event(self, event: str) -> str | None:
        new, action = st.transition(st.PRIMARY, st.PRIMARY_WHY, self.state, event)
        if new != self.state:
            log.info("state %s -> %s (%s)", self.state, new, event)
            self.state = new
            self._state_changed.set()
            self._state_changed = trio.Event()
        return action

    # ---- the link ------------------------------------------------------------
    def _new_link(self):
        if self._link_factory is not None:
            return self._link_factory(self.uri)
        from ..edge.replica import ReplicaLink

        return ReplicaLink(self.uri, max_requests=64, max_bytes=self.async_queue)

    async def connect(self):
        """Connect to the secondary; refuse one whose size differs (ImageError)."""
        link = self._new_link()
        await link.connect()
        if link.size != self.size:
            await _close_quietly(link)
            raise ImageError(f"secondary {self.uri} is {link.size} bytes but {self.image.path} is "
                             f"{self.size} bytes; refusing to replicate to it")
        link.on_failure = self._on_link_failure
        return link

    def connect_failed(self, why: str) -> None:
        self.error = why
        log.warning("%s; serving the disk alone and retrying", why)
        self._event("connect_failed")

    def _on_link_failure(self, offset: int, length: int, error) -> None:
        b0, b1 = self.geometry.blocks(offset, length)
        self.dirty.set(b0, b1)
        self._link_failed(error)

    def _link_failed(self, error) -> None:
        if self.state in (st.P_SYNCING, st.P_REPLICATING) and not self._stopping:
            self.error = f"secondary lost: {error}"
            log.warning("%s; tracking changed blocks from now on", self.error)
            self._event("link_failed")
        self._link_down.set()

    async def supervise(self, first_link=None, *, task_status=trio.TASK_STATUS_IGNORED):
        """Own the link: (re)connect with backoff, sync, replicate, until standalone."""
        task_status.started()
        link = first_link
        backoff = 0.5
        while True:
            if self.state == st.P_STANDALONE:
                await self._state_changed.wait()
                continue
            if link is None:
                self.next_attempt = time.time() + backoff
                with trio.move_on_after(backoff):
                    await self._retry_now.wait()
                self._retry_now = trio.Event()
                if self.state == st.P_STANDALONE:
                    continue
                self.attempts += 1
                self.next_attempt = None
                try:
                    with trio.fail_after(self.connect_timeout):
                        link = await self.connect()
                except (RepdiskError, trio.TooSlowError) as e:
                    reason = e if not isinstance(e, trio.TooSlowError) else f"no answer within {self.connect_timeout} s"
                    why = f"cannot connect to secondary {self.uri}: {reason}"
                    self.reconnect_error = why
                    if self.state == st.P_CONNECTING:
                        self.connect_failed(why)
                    else:  # keep `error` saying why we are degraded
                        log.warning("%s (attempt %d, next in %.1f s)", why, self.attempts, min(backoff * 2, 30))
                    backoff = min(backoff * 2, 30.0)
                    continue
            backoff = 0.5
            await self._replicate(link)
            link = None

    async def _replicate(self, link) -> None:
        """One connection's life: sync what is dirty, then replicate until lost."""
        identity = getattr(link, "description", None)
        if identity is None or identity != self._synced_identity:
            if self._synced_identity is not None or self.state == st.P_DEGRADED:
                # Another (or unknown) secondary: its content is unknown.
                self.dirty.set_all()
        self.peer_identity = identity
        self._link_down = trio.Event()
        self.link = link
        self.attempts = 0
        self.reconnect_error = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_link, link)
                self._event("connected")
                self.error = None
                log.info("connected to secondary %s (%s)", self.uri, identity or "plain NBD server")
                nursery.start_soon(self._sync_then_replicate, link)
                await self._link_down.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.link = None
            self._sync_window = None
            with trio.CancelScope(shield=True):
                await _close_quietly(link)

    async def _run_link(self, link, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            await link.run(task_status=task_status)
        finally:
            self._link_failed(getattr(link, "failed", None) or "connection closed")

    async def _sync_then_replicate(self, link) -> None:
        try:
            await self._sync(link)
        except RepdiskError as e:  # the link failed: _on_link_failure moved us to degraded
            self._link_failed(e)
            return
        if self.state == st.P_SYNCING:
            self._synced_identity = getattr(link, "description", None)
            self.sync.finish()
            self._event("sync_done")
            log.info("sync done: %d bytes in %.2f s", self.sync.done, self.sync.elapsed)

    async def _sync(self, link) -> None:
        """Send every dirty block: data runs as writes, holes and zeros as
        WRITE_ZEROES, up to SYNC_CHUNK per request, pipelined (wait=False)."""
        geo, dirty, image = self.geometry, self.dirty, self.image
        self.sync.start(dirty.count() << geo.shift)
        per = SYNC_CHUNK >> geo.shift
        pos = 0
        while True:
            a = dirty.bits.find(1, pos)
            if a < 0:
                if not dirty.any():
                    break
                pos = 0
                continue
            b = dirty.bits.find(0, a, min(a + per, geo.nblocks))
            if b < 0:
                b = min(a + per, geo.nblocks)
            start, n = geo.byte_range(a, b)
            dirty.clear(a, b)  # before reading: a write from now on marks it again
            self._sync_window = (start, start + n)
            try:
                pieces = await trio.to_thread.run_sync(_read_extents, image, start, n)
                for off, length, data in pieces:
                    if data is None:
                        await link.zero(off, length, wait=False)
                    else:
                        await link.write(data, off, wait=False)
            finally:
                self._sync_window = None
            if self.sync.total < self.sync.done + n:
                self.sync.total = self.sync.done + n
            self.sync.add(n)
            pos = b
        await link.drain()
        if link.failed is not None:
            raise link.failed

    # ---- the disk (FUSE disk.img) --------------------------------------------
    async def disk_read(self, offset: int, length: int) -> bytes:
        self.geometry.check(offset, length)
        return self.image.pread(offset, length)

    async def disk_write(self, offset: int, buf) -> None:
        geo = self.geometry
        geo.check(offset, len(buf))
        self.image.pwrite(buf, offset)
        b0, b1 = geo.blocks(offset, len(buf))
        link = self.link
        if link is None or link.failed is not None or not self._forwardable(offset, len(buf), b0, b1):
            self.dirty.set(b0, b1)
            self.writes_marked += 1
            return
        self.writes_forwarded += 1
        wait = self.mode == "sync"
        try:
            if is_zero(buf):
                await link.zero(offset, len(buf), wait=wait)
            else:
                await link.write(buf, offset, wait=wait)
        except RepdiskError as e:
            # The VM's write is done locally; the range is marked dirty by the
            # link's failure callback.  Replication is degraded, not the VM.
            self.dirty.set(b0, b1)
            self._link_failed(e)

    def _forwardable(self, offset: int, length: int, b0: int, b1: int) -> bool:
        if self.state == st.P_REPLICATING:
            return True
        if self.state != st.P_SYNCING or self.dirty.any(b0, b1):
            return False
        w = self._sync_window
        return w is None or offset >= w[1] or offset + length <= w[0]

    async def disk_fsync(self) -> None:
        await trio.to_thread.run_sync(self.image.fsync)
        link = self.link
        if link is not None and link.failed is None and self.state in (st.P_REPLICATING, st.P_SYNCING):
            try:
                await link.flush()
            except RepdiskError as e:
                self._link_failed(e)

    # ---- control -------------------------------------------------------------
    def status(self) -> dict:
        link = self.link
        s = {
            "role": self.role,
            "state": self.state,
            "epoch": self.epoch,
            "error": self.error,
            "size": self.size,
            "block_size": self.geometry.block_size,
            "mode": self.mode,
            "secondary": self.uri,
            "secondary_identity": self.peer_identity,
            "inflight_bytes": link.inflight_bytes if link is not None else 0,
            "inflight_requests": link.inflight_requests if link is not None else 0,
            "dirty_bytes": min(self.dirty.count() << self.geometry.shift, self.size),
            "sync": self.sync.as_dict(),
            "writes_forwarded": self.writes_forwarded,
            "writes_marked_dirty": self.writes_marked,
        }
        if self.state in (st.P_DEGRADED, st.P_CONNECTING):
            s["reconnect"] = {
                "attempts": self.attempts,
                "last_error": self.reconnect_error,
                "next_attempt_in_s": None if self.next_attempt is None else round(max(0.0, self.next_attempt - time.time()), 2),
            }
        if link is not None:
            s["link"] = link.statistics()
        return s

    async def command(self, text: str) -> None:
        handlers = {"checkpoint": (self.checkpoint, 0), "failover": (self.failover, 0),
                    "reconnect": (self.reconnect, 0), "connect": (self.connect_to, 1)}
        try:
            name, args = parse_command(text)
            if name not in handlers or len(args) != handlers[name][1]:
                raise UnknownCommand(f"unknown command {text!r}; the primary knows: checkpoint, failover, reconnect, connect URI")
            async with self._lock:
                await handlers[name][0](*args)
        except RepdiskError as e:
            self.error = str(e)
            raise

    async def checkpoint(self) -> None:
        self._event("checkpoint")
        link = self.link
        try:
            await link.flush()  # every write acknowledged before now, then NBD FLUSH
        except RepdiskError as e:
            self._link_failed(e)
            raise IOFailure("checkpoint: the secondary did not take the flush", None) from e
        self.epoch += 1
        self.error = None
        log.info("checkpoint %d: replication drained and flushed", self.epoch)

    async def failover(self) -> None:
        self._event("failover")
        self.error = None
        self._link_down.set()  # _replicate closes the link
        log.info("failover: the secondary is considered dead; continuing standalone")

    async def reconnect(self) -> None:
        self._event("reconnect")
        self._retry_now.set()

    async def connect_to(self, uri: str) -> None:
        self._event("connect")
        self.uri = uri
        self._synced_identity = None
        self.dirty.set_all()  # a new secondary: send it everything
        self._retry_now.set()
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def shutdown(self) -> None:
        """Clean stop: drain and flush replication, fsync the image."""
        link = self.link
        if link is not None and link.failed is None:
            with trio.move_on_after(10) as timeout:
                try:
                    await link.flush()
                    log.info("replication drained and flushed")
                except RepdiskError as e:
                    log.warning("final flush to the secondary failed: %s", e)
            if timeout.cancelled_caught:
                log.warning("final flush to the secondary did not finish within 10 s")
        self._stopping = True
        if link is not None:
            await _close_quietly(link)  # NBD_CMD_DISC: the secondary sees a clean disconnect
        await trio.to_thread.run_sync(self.image.fsync)


def _read_extents(image: RawImage, start: int, n: int):
    """[(offset, length, bytes or None for a hole)] covering [start, start+n)."""
    pieces = []
    pos, end = start, start + n
    for d0, d1 in image.data_extents(start, end):
        if d0 > pos:
            pieces.append((pos, d0 - pos, None))
        pieces.extend(_split_zeros(d0, image.pread(d0, d1 - d0)))
        pos = d1
    if pos < end:
        pieces.append((pos, end - pos, None))
    return pieces


ZERO_GRAIN = 256 << 10
_ZEROS = bytes(ZERO_GRAIN)


def _split_zeros(offset: int, data: bytes):
    """Cut `data` into runs of zeros (data None) and of other bytes at a
    256 KiB grain, so that zeros written into an allocated file still travel
    as WRITE_ZEROES and the replica stays sparse.  Compares in place
    (bytes.startswith is a memcmp), copies nothing."""
    runs: list[list] = []  # [offset, length, is_zero]
    for i in range(0, len(data), ZERO_GRAIN):
        n = min(ZERO_GRAIN, len(data) - i)
        zero = (data[i] == 0 and data[i + n - 1] == 0
                and data.startswith(_ZEROS if n == ZERO_GRAIN else bytes(n), i))
        if runs and runs[-1][2] == zero:
            runs[-1][1] += n
        else:
            runs.append([i, n, zero])
    if len(runs) == 1 and not runs[0][2]:
        return [(offset, len(data), data)]
    mv = memoryview(data)
    return [(offset + i, n, None if zero else mv[i : i + n]) for i, n, zero in runs]


async def _close_quietly(link) -> None:
    try:
        with trio.move_on_after(5):
            await link.close()
    except Exception as e:  # the link is going away anyway
        log.debug("closing link: %s", e)
