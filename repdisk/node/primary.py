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

Replica first (sync mode, activity log kept durable): a write into an extent
the log does not hold durably yet does not wait for the log's fdatasync.  It
goes to the secondary first and is written to the local image when the
secondary's reply is handled (the link's `after`, before any later
overlapping request is sent); the extent enters the log in the background.
While such a write is in flight in an extent, every write there goes replica
first too, so local writes keep the wire's order.  The local disk then never
holds a write the secondary lacks; what a host crash may take out of our page
cache while the secondary has it, the secondary's received map keeps
(repdisk.core.recvmap) until our flush protocol (`_flush`) says it is on our
disk.  After an unclean stop the primary reads that map back from the same
secondary run and resyncs it, or does a full sync if the secondary restarted.
"""

import collections
import logging
import os
import time

import trio
from bitarray import bitarray

from ..core import meta as md
from ..core.bitmap import Bitmap
from ..core.errors import Busy, ImageError, IOFailure, RepdiskError, SplitBrain, UnknownCommand
from ..core.geometry import Geometry
from ..core.image import RawImage
from ..core.recvmap import GENERATIONS, GRAIN_SHIFT, grain_ranges
from . import state as st
from .control import Progress, parse_command

log = logging.getLogger(__name__)

SYNC_CHUNK = 4 << 20  # bytes per sync request
AL_SHIFT = 22  # activity-log extent: 4 MiB
AL_SLOTS = 1024  # extents kept active: a crash costs at most 1024 x 4 MiB = 4 GiB of resync
AL_DURABILITY = ("host", "process")  # what crash the activity log survives (--al-durability)
AL_EVICT_DIVISOR = 16  # a full log evicts 1/16 of its extents at once (one image flush)
INLINE_WAIT_MS = 2  # sync mode: how long a lone write may block the loop for its reply
REPLY_POLL_US = 200  # sync mode: how long it may poll for the reply before sleeping (ReplicaLink.set_reply_poll)
SYNC_MAX_REQUESTS = 64  # requests the link keeps in flight, sync mode (the (re)sync pipelines)
ASYNC_MAX_REQUESTS = 256  # async mode: room for full batches while the last ones are answered
VERIFY_CHUNK = 16 << 20  # bytes compared at a time (4 pipelined NBD reads)
REPAIR_PIECE = 4 << 20  # a repair compares the ranges in doubt in pieces of at most this
REPAIR_BATCH = 64  # pieces read at once (pipelined), then compared in one thread hop,
REPAIR_BATCH_BYTES = 32 << 20  # and at most this many bytes of them (a repair holds two batches)
RECENT_ENDS = 32  # write ends remembered to tell a sequential stream (_log_ahead)
# A sequential stream keeps the next LOG_AHEAD extents (128 MiB) in the log, so
# that it does not wait for a log store (an fdatasync, 5-20 ms while the disks
# write back) when it crosses into one; a crash resyncs at most that much more.
# At 8 extents (32 MiB, ~25 ms of a 1.3 GB/s stream) an async primary with
# write-behind waited for the log 10-18 times per 512 MiB, at 32 two to five
# times.  At most a quarter of the log (--al-extents), which must also hold the
# extents the stream is writing: a smaller log would evict them.
LOG_AHEAD = 32
# While replica-first writes are unflushed, both sides are flushed once the
# secondary's map has taken FLUSH_BYTES of them since the last flush, or
# FLUSH_INTERVAL seconds after it: a crash of our host resyncs about three
# times that much.  (A flush forces the write-back of everything dirty: every
# 2 s it cost 4 KiB random writes over a hot 512 MiB 15-25%.)
FLUSH_INTERVAL = 30.0
FLUSH_BYTES = 256 << 20
FLUSH_POLL = 0.25  # seconds between looks at the budget


def is_zero(buf) -> bool:
    """All zero bytes?  Checks the ends first so random data costs nothing."""
    n = len(buf)
    if n == 0 or buf[0] or buf[n - 1]:
        return False
    return buf == bytes(n)


class LinkReplaced(RepdiskError):
    """What `_flush` returns, having done nothing, when the link it was asked
    to flush failed and was let go while the flush waited for its turn."""


class PrimaryNode:
    role = "primary"

    def __init__(self, image: RawImage, *, uri: str, mode: str = "sync", block_size: int = 4096,
                 async_queue: int = 64 << 20, assume_synced: bool = False, connect_timeout: float = 10.0,
                 link_factory=None, meta_path: str | None = None, al_path: str | None = None,
                 al_extents: int = AL_SLOTS, io_timeout: float = 10.0, resync_rate: int = 0,
                 checkpoint_flush: bool = False, batch: int = 1, batch_delay: float = 0.005,
                 reply_poll_us: int = REPLY_POLL_US, al_durability: str = "host",
                 replica_first: bool = True, flush_interval: float = FLUSH_INTERVAL,
                 flush_bytes: int = FLUSH_BYTES):
        self.image = image
        self.write_behind = None  # a WriteBehind fed by the image (--write-behind), set by run.py
        self.geometry = Geometry(image.size, block_size)
        self.uri = uri
        self.mode = mode
        self.async_queue = async_queue
        self.batch = batch  # async mode: writes sent together (ReplicaLink.set_batching); 1 = off
        self.batch_delay = batch_delay  # seconds the first of them may wait
        self.reply_poll_us = reply_poll_us  # sync mode: spin for a reply before sleeping; 0 = never
        self.connect_timeout = connect_timeout
        self.state = st.P_CONNECTING
        self.epoch = 0
        self.error: str | None = None
        self.dirty = Bitmap(self.geometry.nblocks)
        self._sync_base = None  # the dirty bits when the running sync started
        self.sync = Progress()
        self.link = None
        self.peer_identity: str | None = None  # the secondary's export description
        self._sync_window: tuple[int, int] | None = None
        self._link_down = trio.Event()
        self._retry_now = trio.Event()
        self._state_changed = trio.Event()
        self._lock = trio.Lock()
        self.attempts = 0
        self.next_attempt: float | None = None
        self.reconnect_error: str | None = None
        self._link_factory = link_factory
        self.writes_forwarded = 0
        self.writes_marked = 0
        self.resync_kind: str | None = None  # how the last connection was caught up
        self._assume_synced = assume_synced  # for the first connection only
        self._force = False  # 'resolve discard-secondary': overwrite whatever the secondary holds
        self._plain = False  # the secondary is a plain NBD server (no repdisk identity)
        self.meta_path, self.al_path = meta_path, al_path
        self.al_extents = al_extents
        if al_durability not in AL_DURABILITY:
            raise ValueError(f"activity-log durability must be one of {', '.join(AL_DURABILITY)}")
        # "host": the log and evicted extents' data are flushed (fdatasync), so
        # a host crash too costs at most the log's extents of resync;
        # "process": the log stays in the page cache, which survives a crash of
        # this process but not of the host: then the whole disk is resynced.
        self.al_durability = al_durability
        self.io_timeout = io_timeout
        self.resync_rate = resync_rate  # bytes/s of (re)sync, 0: unlimited
        self.checkpoint_flush = checkpoint_flush  # every checkpoint also sends NBD FLUSH
        self.meta_problem: str | None = None
        # Replica first (module doc): wanted, and possible on the current link.
        self.replica_first = replica_first and mode == "sync" and al_path is not None and al_durability == "host"
        self._rf_ok = False
        self._rf_busy: dict[int, int] = {}  # extent -> replica-first writes in flight there
        self._al_bg: set[int] = set()  # extents a background task is putting into the log
        # extents written replica first once lately (FIFO): a second write puts one in the log
        self._rf_recent: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._rf_recent_max = 4 * max(1, al_extents)
        self._recent_ends: collections.OrderedDict[int, None] = collections.OrderedDict()  # where writes ended
        self.writes_replica_first = 0
        self.flush_interval = flush_interval
        self.flush_bytes = flush_bytes
        self._flush_lock = trio.Lock()  # one flush at a time (the flush protocol)
        self._flush_broken: str | None = None  # a local flush failed: no NBD FLUSH ever again
        # A failed fdatasync of the image outside the flush protocol (activity
        # log evictions).  The kernel reports a write-back error once, so the
        # next fsync may succeed over lost pages: the next flush treats this
        # as its own failure (repair from the secondary, or flushing breaks).
        self._sync_failure: RepdiskError | None = None
        # Flushes until the secondary's received map holds no replica-first
        # write: each sets it to the map's generations (recvmap.GENERATIONS).
        # (Other writes there are in logged extents, or in a sync, which is
        # resent whole after a crash and flushed when it ends.)
        self._flushes_owed = 0
        self._rf_bytes = 0  # map grains replica-first writes touched since the last flush, in bytes
        self._last_flush = 0.0  # trio clock
        self.flushes = 0
        # (link, writes_marked) when the last flush whose local fsync succeeded
        # began: while both still hold, every write since is on that link's
        # secondary, and a failed local fsync can be repaired from it.
        self._clean_flush: tuple | None = None
        # Map grains of the writes started on the link since the latest flush
        # began, and between the two latest flush starts: after a failed
        # local fsync, what is in doubt (`_repair_from_replica`); after a
        # failed flush on the secondary, what to send again
        # (`_resend_unflushed`).  Plain bitarrays: a slice set per request.
        grains = (image.size + (1 << GRAIN_SHIFT) - 1) >> GRAIN_SHIFT
        self._written, self._written_before = bitarray(grains), bitarray(grains)
        self._written.setall(0)
        self._written_before.setall(0)
        # The same two generations for what a sync sent: if the secondary's
        # flush fails, it may not be on its disk (`_resend_unflushed`).  Kept
        # apart from `_written`, which bounds a repair of our own disk: a
        # sync's data came from our disk and is no doubt there.
        self._synced, self._synced_before = bitarray(grains), bitarray(grains)
        self._synced.setall(0)
        self._synced_before.setall(0)
        self.repair = Progress()  # the last repair from the replica
        self.repairs = 0
        self.repair_result: str | None = None
        self.repair_refused: str | None = None  # why the last repair was not tried (status, bench)
        self.repair_held = 0.0  # seconds the last repair held writes
        self._writes_active = 0  # disk_write calls in progress
        self._writes_quiet: trio.Event | None = None  # set when they reach 0
        self._writes_held: trio.Event | None = None  # while a repair runs: set when it ends
        self._map_pending = False  # after an unclean stop: merge the secondary's received map
        self.received_merge: str | None = None  # what that merge found (status)
        self.meta = self._load_meta(assume_synced)
        # Activity log: extents that may hold writes the secondary has not acknowledged.
        self._al: collections.OrderedDict[int, trio.Event] = collections.OrderedDict()  # LRU first
        self._al_file = md.AlSlots(AL_SHIFT)  # what the log file holds: the active extents and evicted ones not yet safe to drop
        self._al_leaving: dict[int, int] = {}  # extent -> evictions of it in progress
        # extent -> writes in progress there (a plain dict: Counter's Python-level
        # __missing__/__delitem__ cost ~4% of the primary's CPU per write)
        self._al_busy: dict[int, int] = {}
        self._al_lock = trio.Lock()
        self._al_version = self._al_stored = 0  # changes made / persisted (group commit)
        self._al_batch = max(1, al_extents // AL_EVICT_DIVISOR)  # extents evicted at a time
        self._al_ahead = min(LOG_AHEAD, al_extents // 4)  # extents a stream logs ahead (_log_ahead)
        self._al_fd = None
        self.al_writes = 0
        self.al_evictions = 0
        self.al_waits = 0  # writes that waited for a log store
        if al_path is not None:
            self._al_fd = os.open(al_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.ftruncate(self._al_fd, 0)
            self._al_store(self._al_file.encode())
        self.verify = Progress()
        self.verify_diffs: list[tuple[int, int]] = []  # differing block runs [first, end)
        self.verify_result: str | None = None
        self._verify_window: tuple[int, int] | None = None
        self._verify_touched = False
        self._link_nursery = None
        self._stopping = False  # shutdown ran: closing the link is not losing the secondary
        self._fuse_fd: int | None = None

    @property
    def fuse_fd(self) -> int | None:
        """The FUSE device of our mount, set by the front end once mounted.  In
        sync mode a lone write waits for its reply inline until the device has
        another request for us (ReplicaLink.set_inline_wait)."""
        return self._fuse_fd

    @fuse_fd.setter
    def fuse_fd(self, fd: int | None) -> None:
        self._fuse_fd = fd
        if self.link is not None:
            self._inline_wait(self.link)

    def _inline_wait(self, link) -> None:
        if hasattr(link, "set_inline_wait"):
            link.set_inline_wait(INLINE_WAIT_MS if self.mode == "sync" else 0, self._fuse_fd)
        if hasattr(link, "set_reply_poll"):
            link.set_reply_poll(self.reply_poll_us / 1e6 if self.mode == "sync" else 0)

    def _batching(self, link) -> None:
        """Async mode sends writes in batches: one trio round and one server
        read per batch instead of per write (ReplicaLink module doc).  Sync
        mode waits for every write, so there is nothing to batch."""
        if hasattr(link, "set_batching"):
            link.set_batching(self.batch if self.mode == "async" else 0, self.batch_delay)

    @property
    def size(self) -> int:
        return self.geometry.size

    def _event(self, event: str) -> str | None:
        new, action = st.transition(st.PRIMARY, st.PRIMARY_WHY, self.state, event)
        if new != self.state:
            log.info("state %s -> %s (%s)", self.state, new, event)
            m = self.meta
            if new in (st.P_DEGRADED, st.P_STANDALONE, st.P_SPLIT_BRAIN) and m.gen == m.peer_gen:
                # From now on our disk takes writes the secondary does not get.
                m.gen = md.new_gen()
            self.state = new
            self._persist()
            self._state_changed.set()
            self._state_changed = trio.Event()
        return action

    # ---- metadata and the activity log ----------------------------------------
    def _load_meta(self, assume_synced: bool) -> md.Meta:
        dirty, nblocks = self.dirty, self.geometry.nblocks
        m = None
        if self.meta_path is not None:
            try:
                m = md.load_meta(self.meta_path)
            except md.MetaError as e:
                self.meta_problem = str(e)
                if os.path.exists(self.meta_path):
                    log.error("%s; the secondary's content is unknown: full sync", e)
                else:
                    log.info("%s: a new disk lineage; the secondary gets a full sync", self.meta_path)
        if m is None:
            m = md.Meta(node=md.new_id(), disk=md.new_id(), gen=md.new_gen())
            dirty.set_all()
        else:
            if m.bitmap is not None and m.nbits == nblocks:
                dirty.bits = m.bitmap
            else:
                log.warning("%s: no dirty bitmap for %d blocks: full sync", self.meta_path, nblocks)
                dirty.set_all()
            if not m.clean:
                # Replica-first writes our disk may have lost: the secondary has their map.
                self._map_pending = bool(m.peer_run)
                if not m.al_host and m.boot != md.boot_id():
                    log.error("unclean stop across a reboot of the host, and the activity log was kept "
                              "in the page cache only (--al-durability process): full sync")
                    dirty.set_all()
                else:
                    self._recover_al(dirty)
        if assume_synced:
            dirty.clear_all()
        m.clean = False
        m.boot, m.al_host = md.boot_id(), self.al_durability == "host"
        self.meta = m
        self.epoch = m.epoch  # before persisting: _persist writes self.epoch back
        self._persist()  # the restored set (bitmap + activity log) is now in the bitmap
        return m

    def _recover_al(self, dirty: Bitmap) -> None:
        """After an unclean stop: every extent in the activity log may differ."""
        try:
            with open(self.al_path, "rb") as f:
                shift, extents = md.decode_al(f.read(1 << 20))
        except (OSError, TypeError, md.MetaError) as e:
            log.error("unclean stop and no usable activity log (%s): full sync", e)
            dirty.set_all()
            return
        for e in extents:
            blocks = self._extent_blocks(e, shift)
            if blocks is not None:
                dirty.set(*blocks)
        log.warning("unclean stop: %d activity-log extents (%d bytes) will be resynced",
                    len(extents), len(extents) << shift)

    def _extent_blocks(self, e: int, shift: int = AL_SHIFT) -> tuple[int, int] | None:
        """Blocks [first, end) of log extent `e` (clipped to the disk); None past its end."""
        start = e << shift
        if start >= self.geometry.size:
            return None
        return self.geometry.blocks(start, min(1 << shift, self.geometry.size - start))

    def _persist(self, strict: bool = False) -> None:
        """Write the metadata (with the dirty bitmap) atomically.  Blocking, but
        only at state changes, start, stop and activity-log evictions.  A
        failure is logged; with `strict` (an eviction, which may drop extents
        from the log only once their dirty bits are on disk) it is raised."""
        if self.meta_path is None:
            return
        m = self.meta
        m.epoch = self.epoch
        # A snapshot (this may run in a thread while the loop marks blocks).
        bits = self.dirty.bits.copy() if self._sync_base is None else self.dirty.bits | self._sync_base
        m.nbits, m.bitmap = len(bits), bits
        try:
            md.save_meta(self.meta_path, m)
        except OSError as e:
            if strict:
                raise IOFailure(f"cannot write metadata {self.meta_path}", e) from None
            log.error("cannot write metadata %s: %s", self.meta_path, e)
        finally:
            m.bitmap = None

    def _al_store(self, data: bytes) -> None:
        try:
            os.pwrite(self._al_fd, data, 0)
            if self.al_durability == "host":
                os.fdatasync(self._al_fd)
        except OSError as e:
            raise IOFailure(f"activity log {self.al_path}: cannot store it", e) from None

    async def _al_enter(self, e0: int, e1: int, *, background: bool = False) -> None:
        """Make extents e0..e1 active (persisted in the log) before data is
        written there.  A write that has to wait for a store counts in
        `al_waits` (once), a background add (`_al_soon`) does not."""
        counted = background
        for e in range(e0, e1 + 1):
            ev = self._al.get(e)
            if ev is not None:
                self._al.move_to_end(e)
                if ev.is_set():
                    continue
            if not counted:
                self.al_waits += 1
                counted = True
            if ev is None:
                await self._al_add(e)
            else:
                await ev.wait()
                if self._al.get(e) is not ev:  # the store we waited for failed: try ours
                    await self._al_add(e)

    async def _al_add(self, e: int) -> None:
        ev = self._al[e] = trio.Event()
        self._al_file.add(e)
        self._al_version += 1
        stored = False
        try:
            if len(self._al) > self.al_extents:
                await self._al_evict(e)
            await self._al_commit()
            stored = True
        finally:
            if not stored and self._al.get(e) is ev:
                # Not in the log after all: the write that needed it fails, and
                # the next write there (or one waiting on `ev`) stores it again.
                del self._al[e]
                if e not in self._al_leaving:
                    self._al_file.discard(e)
                self._al_version += 1
            ev.set()

    async def _al_evict(self, e: int) -> None:
        """Drop a batch of idle extents (least recently used first) from the
        log, so that the next misses only add: the image flush that makes
        their data durable is paid once per batch."""
        want = len(self._al) - self.al_extents + self._al_batch - 1
        victims = []
        for x in self._al:
            if len(victims) >= want:
                break
            if x != e and x not in self._al_busy and self._al[x].is_set():
                victims.append(x)
        if not victims:
            return
        leaving = self._al_leaving
        for x in victims:  # no await since choosing them (they stay in the file until below)
            del self._al[x]
            leaving[x] = leaving.get(x, 0) + 1
        # An extent may leave the log once nothing sent there is in flight (in
        # sync mode a write is busy until the secondary answered; async writes
        # finish first), its dirty bits are in the persisted bitmap, and its
        # data is on the local disk: after a host crash the primary's image
        # must not lack a write the secondary has, outside the log.
        link = self.link
        flushed = False
        try:
            if self.mode != "sync" and link is not None and link.failed is None and link.inflight_requests:
                try:
                    await link.settle()
                except RepdiskError:
                    pass  # the link failed: its in-flight ranges are marked dirty
            if any(self.dirty.any(*self._extent_blocks(x)) for x in victims):
                await trio.to_thread.run_sync(self._persist, True)
            if self.al_durability == "host":
                try:
                    await trio.to_thread.run_sync(self.image.datasync)
                except RepdiskError as e:
                    self._note_sync_failure(e)
                    raise
            flushed = True
        finally:
            for x in victims:
                leaving[x] -= 1
                if not leaving[x]:
                    del leaving[x]
                if x in self._al:  # a write made it active again meanwhile
                    continue
                if not flushed:  # its data may not be on disk: it stays in the log
                    back = self._al[x] = trio.Event()
                    back.set()
                    self._al.move_to_end(x, last=False)
                elif x not in leaving:
                    self._al_file.discard(x)
        self.al_evictions += 1
        self._al_version += 1

    async def _al_commit(self) -> None:
        """Persist the log as it is now.  Group commit: misses that arrive
        while a store runs share the next one."""
        want = self._al_version
        async with self._al_lock:
            if self._al_stored >= want:
                return
            version = self._al_version
            data = self._al_file.encode()
            if self.al_durability == "host":
                await trio.to_thread.run_sync(self._al_store, data)
            else:  # a page-cache write: cheaper inline than a thread hop
                self._al_store(data)
            self._al_stored = version
            self.al_writes += 1

    # ---- the link ------------------------------------------------------------
    def _new_link(self, uri):
        if self._link_factory is not None:
            return self._link_factory(uri)
        from ..edge.replica import ReplicaLink

        return ReplicaLink(uri, max_requests=ASYNC_MAX_REQUESTS if self.mode == "async" else SYNC_MAX_REQUESTS,
                           max_bytes=self.async_queue)

    async def connect(self):
        """Connect to the secondary, telling it who we are (export name) and
        learning who it is (export description).  Refuses a secondary whose
        size differs (ImageError); raises SplitBrain for one that holds writes
        we do not have or another disk."""
        from ..edge.replica import probe_description, uri_export, with_export

        m = self.meta
        if self._map_pending:
            await self._merge_received_map()
        named = None
        if not self._plain and uri_export(self.uri) == "":
            named = with_export(self.uri, md.format_export_name(m.disk, m.gen, m.peer_gen, self._force))
        try:
            link = await self._open(named or self.uri)
        except ImageError:
            raise
        except RepdiskError as e:
            if named is None:
                raise
            # Refused (split brain, another disk) or a plain server that does not
            # know our export name: its description says which.
            try:
                desc = await trio.to_thread.run_sync(probe_description, self.uri)
            except RepdiskError:
                raise e from None
            ident = md.parse_identity(desc)
            if ident is not None:
                verdict = md.primary_verdict(m.disk, m.gen, m.peer_gen, ident)
                if verdict == md.SPLIT_BRAIN:
                    raise SplitBrain(
                        f"split brain: secondary {self.uri} (node {ident['node']}) is at data generation "
                        f"{ident['gen']:x}, which this primary (generation {m.gen:x}, last shared "
                        f"{m.peer_gen:x}) never had: both sides took writes; nothing was overwritten. "
                        f"'resolve discard-secondary' makes the secondary a copy of this disk") from None
                if verdict == md.FOREIGN:
                    raise SplitBrain(
                        f"secondary {self.uri} holds disk {ident['disk']}, not this primary's disk {m.disk} "
                        f"(a secondary of another pair?); nothing was overwritten. "
                        f"'resolve discard-secondary' overwrites it with this disk") from None
                raise
            log.info("%s is a plain NBD server (%s): connecting without identity", self.uri, desc)
            self._plain = True
            link = await self._open(self.uri)
        return link

    async def _merge_received_map(self) -> None:
        """After an unclean stop: mark for resync every range the secondary
        run we last replicated to (replica first) received and did not see
        flushed: our disk may have lost it with the page cache.  If that run
        is gone, nothing says what it holds: full sync."""
        from ..core.recvmap import map_ranges
        from ..edge.replica import fetch_export, probe_description, uri_export, with_export

        m, dirty = self.meta, self.dirty
        info = None
        if uri_export(self.uri) == "":
            try:
                desc, data = await trio.to_thread.run_sync(fetch_export, with_export(self.uri, md.RECEIVED_EXPORT))
                info = md.parse_received(desc)
            except RepdiskError as e:
                # Unreachable or busy: try again with the next connection.  A
                # server that answers but has no map cannot tell us anything.
                desc = await trio.to_thread.run_sync(probe_description, self.uri)
                ident = md.parse_identity(desc)
                if ident is not None and ident["run"] == m.peer_run:
                    raise IOFailure(f"cannot read the received map of secondary run {m.peer_run}: {e}", None) from None
        if info is None or info["run"] != m.peer_run:
            why = "it has none" if info is None else f"it is run {info['run']} now"
            self.received_merge = (f"full sync: the secondary run {m.peer_run} that took our replica-first writes "
                                   f"is gone ({why})")
            log.error("unclean stop: %s", self.received_merge)
            dirty.set_all()
        else:
            n = self._mark_dirty(map_ranges(data, info["bits"], info["shift"], self.size))
            self.received_merge = f"{n} bytes the secondary received unflushed will be resynced"
            log.warning("unclean stop: %s (received map of run %s)", self.received_merge, m.peer_run)
        self._map_pending = False
        self._persist()

    async def _open(self, uri):
        link = self._new_link(uri)
        await link.connect()
        if link.size != self.size:
            await _close_quietly(link)
            raise ImageError(f"secondary {self.uri} is {link.size} bytes but {self.image.path} is "
                             f"{self.size} bytes; refusing to replicate to it")
        link.on_failure = self._on_link_failure
        return link

    def split_brain(self, why: str) -> None:
        self.error = why
        log.error("%s", why)
        self._event("split_brain")

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
            if self._stopping:  # a clean stop closed the link: do not reconnect
                await trio.sleep_forever()
            if self.state in (st.P_STANDALONE, st.P_SPLIT_BRAIN):
                await self._state_changed.wait()
                continue
            if link is None:
                self.next_attempt = time.time() + backoff
                with trio.move_on_after(backoff):
                    await self._retry_now.wait()
                self._retry_now = trio.Event()
                if self.state in (st.P_STANDALONE, st.P_SPLIT_BRAIN):
                    continue
                self.attempts += 1
                self.next_attempt = None
                try:
                    with trio.fail_after(self.connect_timeout):
                        link = await self.connect()
                except SplitBrain as e:
                    self.reconnect_error = str(e)
                    self.split_brain(str(e))
                    continue
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
        ident = md.parse_identity(identity)
        m = self.meta
        if self._force:
            kind = md.FULL
        else:
            kind = md.primary_verdict(m.disk, m.gen, m.peer_gen, ident)
        if kind != md.INCREMENTAL:
            if kind != md.FULL:  # the secondary accepted us, so its description was stale: be safe
                log.warning("secondary %s described itself as %s (%s): full sync", self.uri, identity, kind)
                kind = md.FULL
            if self._assume_synced:
                log.info("--assume-synced: no initial sync")
            else:
                self.dirty.set_all()  # another or unknown secondary: its content is unknown
        self._assume_synced = False
        self.resync_kind = kind
        if ident is not None:
            m.peer_gen = m.gen  # the secondary took our generation when it accepted us
        run = ident["run"] if ident is not None and self.replica_first else ""
        if run != m.peer_run:
            if m.peer_run:
                # Replica-first writes to the previous run may be in our page
                # cache only, and the new run has no map of them.
                try:
                    await trio.to_thread.run_sync(self.image.datasync)
                except RepdiskError as e:
                    self._break_flushing(f"flushing the image failed: {e}")
            m.peer_run = run
            self._persist()  # before any write is sent to that run
        self._rf_ok = bool(run) and self.replica_first and self._flush_broken is None
        self.peer_identity = identity
        self._link_down = trio.Event()
        self.link = link
        self._inline_wait(link)
        self._batching(link)
        self.attempts = 0
        self.reconnect_error = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_link, link)
                self._link_nursery = nursery
                self._event("connected")
                self.error = None
                log.info("connected to secondary %s (%s)", self.uri, identity or "plain NBD server")
                nursery.start_soon(self._sync_then_replicate, link)
                nursery.start_soon(self._watchdog, link)
                if self._rf_ok and self.flush_interval > 0:
                    nursery.start_soon(self._flush_timer, link)
                await self._link_down.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.link = None
            self._rf_ok = False
            self._link_nursery = None
            self._sync_window = None
            with trio.CancelScope(shield=True):
                await _close_quietly(link)

    async def _watchdog(self, link) -> None:
        """A cut network does not break a TCP connection for many minutes:
        declare the secondary lost when requests are in flight and none has
        been answered for io_timeout seconds."""
        if self.io_timeout <= 0 or not hasattr(link, "completions"):
            return
        last, since = link.completions(), time.monotonic()
        while link.failed is None:
            await trio.sleep(min(1.0, self.io_timeout / 4))
            now, done = time.monotonic(), link.completions()
            if done != last or not link.inflight_requests:
                last, since = done, now
            elif now - since >= self.io_timeout:
                link.abort(f"no reply for {self.io_timeout:g} s with {link.inflight_requests} requests in flight")
                return

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
            self.sync.finish()  # every byte acknowledged: the sync's own time
        if self.state == st.P_SYNCING and self._rf_ok:
            # Until flushed, the secondary's received map holds everything the
            # sync sent, and a crash of our host would resync all of it again:
            # replicating once both disks hold the sync durably.
            try:
                for _ in range(GENERATIONS):
                    if await self._flush(link) is not None:
                        return
            except RepdiskError as e:
                log.error("flush after the sync: %s", e)
        if self.state == st.P_SYNCING:
            self._force = False
            self._event("sync_done")
            log.info("sync done: %d bytes in %.2f s", self.sync.done, self.sync.elapsed)

    async def _sync(self, link) -> None:
        """Send every dirty block: data runs as writes, holes and zeros as
        WRITE_ZEROES, up to SYNC_CHUNK per request, pipelined (wait=False)."""
        geo, dirty = self.geometry, self.dirty
        self.sync.start(dirty.count() << geo.shift)
        per = SYNC_CHUNK >> geo.shift
        if self.resync_rate > 0:
            per = max(1, min(per, (self.resync_rate // 10) >> geo.shift))  # about 10 steps a second
        t0 = trio.current_time()
        # Until the sync is drained, what it cleared may not be on the secondary
        # yet: the persisted bitmap keeps it (see _persist).
        self._sync_base = dirty.bits.copy()
        try:
            await self._sync_loop(link, per, t0)
        except RepdiskError:
            raise  # the link failed: what was in flight is marked dirty again by on_failure
        except BaseException:
            dirty.bits |= self._sync_base  # cancelled: in flight is unknown, resend all of it
            raise
        finally:
            self._sync_base = None

    async def _sync_loop(self, link, per: int, t0: float) -> None:
        geo, dirty, image = self.geometry, self.dirty, self.image
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
                        await link.zero(off, length, wait=False, started=self._sync_started)
                    else:
                        await link.write(data, off, wait=False, started=self._sync_started)
            except BaseException:
                dirty.set(a, b)  # not (all) submitted: send it again later
                raise
            finally:
                self._sync_window = None
            if self.sync.total < self.sync.done + n:
                self.sync.total = self.sync.done + n
            self.sync.add(n)
            pos = b
            if self.resync_rate > 0:  # do not starve the VM: stay at or under the rate
                ahead = self.sync.done / self.resync_rate - (trio.current_time() - t0)
                if ahead > 0:
                    await trio.sleep(ahead)
        await link.drain()
        if link.failed is not None:
            raise link.failed

    # ---- the disk (FUSE disk.img) --------------------------------------------
    async def disk_read(self, offset: int, length: int) -> bytes:
        self.geometry.check(offset, length)
        return self.image.pread(offset, length)

    async def disk_write(self, offset: int, buf, direct: bool = False) -> None:
        """direct: the VM opened disk.img with O_DIRECT; the local image takes
        large writes past its page cache (RawImage.pwrite)."""
        self.geometry.check(offset, len(buf))
        while self._writes_held is not None:  # a repair from the replica is running
            await self._writes_held.wait()
        self._writes_active += 1
        try:
            if self._al_fd is None or not len(buf):
                return await self._write(offset, buf, direct)
            e0, e1 = offset >> AL_SHIFT, (offset + len(buf) - 1) >> AL_SHIFT
            busy = self._al_busy
            _count(busy, e0, e1, 1)
            try:
                self._log_ahead(offset, offset + len(buf))
                if self._rf_ok and self._rf_wanted(e0, e1):
                    return await self._write_replica_first(offset, buf, e0, e1, direct)
                await self._al_enter(e0, e1)
                await self._write(offset, buf, direct)
            finally:
                _count(busy, e0, e1, -1)
        finally:
            self._writes_active -= 1
            if not self._writes_active and self._writes_quiet is not None:
                self._writes_quiet.set()

    def _log_ahead(self, start: int, end: int) -> None:
        """A write that continues an earlier one (a sequential stream) puts
        the LOG_AHEAD extents after its own (fewer with a log of fewer than
        4 x LOG_AHEAD extents) into the log in the background,
        so that the stream finds them logged.  Without it, each extent the
        stream enters costs a write that waits for the log's fdatasync (async
        mode, --replica-first off) or goes replica first, which writes the
        local image only after the round trip (sync mode)."""
        ends = self._recent_ends
        seq = start in ends
        if seq:
            del ends[start]
        ends[end] = None
        if len(ends) > RECENT_ENDS:
            ends.popitem(last=False)
        if seq:
            al, bg = self._al, self._al_bg
            first = ((end - 1) >> AL_SHIFT) + 1
            last = min(first + self._al_ahead, ((self.geometry.size - 1) >> AL_SHIFT) + 1)
            if last <= first or last - 1 in al or last - 1 in bg:
                return  # the window is asked for already: most writes of a stream stop here
            for e in range(first, last):
                if e not in al and e not in bg:
                    self._al_soon(e)

    def _rf_wanted(self, e0: int, e1: int) -> bool:
        """Replica first: an extent not (yet) durably in the log, or one with a
        replica-first write in flight (module doc)."""
        al, rf = self._al, self._rf_busy
        for e in range(e0, e1 + 1):
            ev = al.get(e)
            if ev is None or not ev.is_set() or e in rf:
                return True
        return False

    async def _write_replica_first(self, offset: int, buf, e0: int, e1: int, direct: bool) -> None:
        geo = self.geometry
        b0, b1 = geo.blocks(offset, len(buf))
        link = self.link
        if link is None or link.failed is not None or not self._forwardable(offset, len(buf), b0, b1):
            await self._al_enter(e0, e1)  # not sent: the local disk gets it first, logged
            return await self._write(offset, buf, direct)
        w = self._verify_window
        if w is not None and offset < w[1] and w[0] < offset + len(buf):
            self._verify_touched = True
        self._al_background(e0, e1)
        rf = self._rf_busy
        _count(rf, e0, e1, 1)
        self.writes_forwarded += 1
        self.writes_replica_first += 1
        self._flushes_owed = GENERATIONS
        g0, g1 = offset >> GRAIN_SHIFT, ((offset + len(buf) - 1) >> GRAIN_SHIFT) + 1
        self._rf_bytes += (g1 - g0) << GRAIN_SHIFT
        image = self.image
        mv = memoryview(buf)
        local_error: list = []

        def after(pos: int, n: int) -> None:  # the secondary has [pos, pos+n): now our disk
            try:
                image.pwrite(mv[pos - offset : pos - offset + n], pos, direct)
            except RepdiskError as e:
                local_error.append(e)

        try:
            if is_zero(buf):
                await link.zero(offset, len(buf), after=after, started=self._write_started)
            else:
                await link.write(buf, offset, after=after, started=self._write_started)
        except RepdiskError as e:
            # Not (all) taken by the secondary: our disk gets it now, logged
            # like any write while degraded; the range is resynced later.
            self.dirty.set(b0, b1)
            self._link_failed(e)
            await self._al_enter(e0, e1)
            image.pwrite(buf, offset, direct)
            local_error.clear()
        finally:
            _count(rf, e0, e1, -1)
        if local_error:
            # The secondary took it, our disk did not: the range differs until
            # a resync, and the bitmap on disk says so before we answer.
            self.dirty.set(b0, b1)
            self._persist()
            log.error("local write of %d bytes at %d failed after it was replicated; range marked for resync: %s",
                      len(buf), offset, local_error[0])
            raise local_error[0]

    def _al_background(self, e0: int, e1: int) -> None:
        """Put extents e0..e1 into the log, without making anyone wait, once
        they are written again: the next writes there take the parallel path.
        An extent written once (writes spread over a large disk) stays out:
        adding it would cost a log store and, with a full log, an eviction
        (an fdatasync of the image) for nothing."""
        al, bg, recent = self._al, self._al_bg, self._rf_recent
        for e in range(e0, e1 + 1):
            if e in al or e in bg:
                continue
            if e not in recent:
                recent[e] = None
                if len(recent) > self._rf_recent_max:
                    recent.popitem(last=False)
                continue
            del recent[e]
            self._al_soon(e)

    def _al_soon(self, e: int) -> None:
        """Start putting extent `e` (not in the log, nor being put there) into
        the log in the background (on the link's nursery: with no link, the
        write that needs it puts it there)."""
        nursery = self._link_nursery
        if nursery is None:
            return
        self._al_bg.add(e)
        nursery.start_soon(self._al_bg_add, e)

    async def _al_bg_add(self, e: int) -> None:
        try:
            await self._al_enter(e, e, background=True)
        except RepdiskError as err:  # the next write there tries again
            log.warning("activity log: extent %d not added in the background: %s", e, err)
        finally:
            self._al_bg.discard(e)

    async def _write(self, offset: int, buf, direct: bool = False) -> None:
        geo = self.geometry
        w = self._verify_window
        if w is not None and offset < w[1] and w[0] < offset + len(buf):
            self._verify_touched = True
        b0, b1 = geo.blocks(offset, len(buf))
        link = self.link
        if link is None or link.failed is not None or not self._forwardable(offset, len(buf), b0, b1):
            self.image.pwrite(buf, offset, direct)
            self.dirty.set(b0, b1)
            self.writes_marked += 1
            return
        self.writes_forwarded += 1
        # The request goes out first and the local write runs while the
        # secondary works: the link runs `then` when it starts the request, in
        # start order, so local writes keep the order of the wire.
        local: list = []  # [None] once written, [error] if the local write failed

        def write_local():
            try:
                self.image.pwrite(buf, offset, direct)
            except RepdiskError as e:
                local.append(e)
            else:
                local.append(None)

        wait = self.mode == "sync"
        try:
            if is_zero(buf):
                await link.zero(offset, len(buf), wait=wait, then=write_local, started=self._write_started)
            else:
                await link.write(buf, offset, wait=wait, then=write_local, started=self._write_started)
        except RepdiskError as e:
            # The VM's write is done locally (below if not yet); the range is
            # marked dirty.  Replication is degraded, not the VM.
            self.dirty.set(b0, b1)
            self._link_failed(e)
        if not local:  # refused or failed before anything was sent
            write_local()
        if local[0] is not None:
            # The replica may have taken what the local disk could not: the
            # range differs until a resync sends it again.
            self.dirty.set(b0, b1)
            log.error("local write of %d bytes at %d failed after it was replicated; range marked for resync: %s",
                      len(buf), offset, local[0])
            raise local[0]

    # The link runs these as each request starts: where it takes its place in
    # the order a flush covers.  Marked any earlier (before a wait for
    # admission), a flush that starts in between would not cover the request,
    # yet the mark would leave with that flush's generation.
    def _write_started(self, offset: int, length: int) -> None:
        self._written[offset >> GRAIN_SHIFT : ((offset + length - 1) >> GRAIN_SHIFT) + 1] = 1

    def _sync_started(self, offset: int, length: int) -> None:
        self._synced[offset >> GRAIN_SHIFT : ((offset + length - 1) >> GRAIN_SHIFT) + 1] = 1

    def _forwardable(self, offset: int, length: int, b0: int, b1: int) -> bool:
        if self.state == st.P_REPLICATING:
            return True
        if self.state != st.P_SYNCING or self.dirty.any(b0, b1):
            return False
        w = self._sync_window
        return w is None or offset >= w[1] or offset + length <= w[0]

    async def disk_fsync(self) -> None:
        """fsync of disk.img: the local image and, while replicating, NBD FLUSH
        on the secondary (`_flush`).  A failed flush degrades replication; a
        failed local fsync that cannot be repaired from the secondary fails
        the call."""
        while True:
            link = self.link
            if link is None or link.failed is not None or self.state not in (st.P_REPLICATING, st.P_SYNCING):
                return await self._fsync_alone()
            # The secondary's failure degrades replication, not the VM.
            if not isinstance(await self._flush(link), LinkReplaced):
                return  # else the link changed while this waited its turn: look again

    async def _fsync_alone(self) -> None:
        """disk_fsync with no secondary to flush."""
        if self._flush_broken is not None:
            raise IOFailure(f"cannot flush: {self._flush_broken}", None)
        try:
            await trio.to_thread.run_sync(self.image.fsync)
            if self._sync_failure is not None:  # reported to an earlier fdatasync, not to us
                raise self._sync_failure
        except RepdiskError as e:
            # No secondary holds the writes in doubt, so nothing can repair
            # them, and the kernel reports a write-back error only once:
            # every later fsync must fail too, not succeed over lost data.
            self._break_flushing(f"flushing {self.image.path} failed while {self.state}: {e}; writes since "
                                 "the last good flush may be lost and no secondary holds them")
            raise

    async def _flush(self, link) -> RepdiskError | None:
        """The flush protocol (repdisk.core.recvmap): one at a time; wait for
        every request sent before (replica-first ones are then on our disk
        too), then NBD FLUSH; our own fsync alongside (each writes a page
        cache back; on two hosts the wait is the longer, not the sum), from
        the start unless a replica-first write is in flight (`_flush_both`);
        the next flush starts only after both.  After a failed local fsync the page
        cache may have dropped writes the secondary has: our disk is repaired
        from the secondary (`_repair_from_replica`); if that cannot be done,
        no NBD FLUSH is sent again, so the secondary keeps their ranges in its
        received map.
        Raises a local failure; returns the secondary's (the link is then
        failed and replication degraded), None when both flushed, and a
        LinkReplaced, doing nothing, when `link` is no longer the node's link
        once this flush's turn came (it failed and another may serve already:
        flush that one, or our disk alone, `disk_fsync`)."""
        async with self._flush_lock:
            if self._flush_broken is not None:
                raise IOFailure(f"cannot flush: {self._flush_broken}; restart the primary (it resyncs "
                                "what the secondary received since)", None)
            if link is not self.link:
                return LinkReplaced(f"the link this flush was for is gone ({link.failed})")
            self._flushes_owed = max(0, self._flushes_owed - 1)
            self._rf_bytes = 0
            self._last_flush = trio.current_time()
            marked = self.writes_marked
            self._written, self._written_before = self._written_before, self._written
            self._written.setall(0)
            self._synced, self._synced_before = self._synced_before, self._synced
            self._synced.setall(0)
            return await self._flush_both(link, marked)

    async def _flush_both(self, link, marked: int) -> RepdiskError | None:
        """`_flush` once its generations turned: both disks, then the outcome.
        Cancelled before the outcome is handled (the link's tasks are
        cancelled when it fails, a stop gives up after 10 s), it leaves
        nothing in doubt behind: what the secondary may not hold is marked
        for the resync, a failed local fsync is kept for the next flush."""
        remote = local = None
        remote_ok = False
        # Every request started so far has its data in our page cache, unless
        # a replica-first write waits for its reply (it writes our disk then):
        # our fsync need not wait for the link to settle, and an async
        # primary's fsync writes back while the queue drains.  With one in
        # flight it waits, so that it covers every write started before this
        # flush (what a failed fsync leaves in doubt: _repair_from_replica).
        early = not self._rf_busy
        settled = trio.Event()
        try:
            async def flush_remote():
                nonlocal remote, remote_ok
                try:
                    try:
                        await link.settle()
                    finally:
                        settled.set()
                    await link.flush()
                    remote_ok = True
                except RepdiskError as e:  # the link failed: our own fsync still runs
                    remote = e

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flush_remote)
                if not early:
                    await settled.wait()
                try:
                    await trio.to_thread.run_sync(self.image.fsync)
                except RepdiskError as e:
                    local = e
        except BaseException:
            if not remote_ok:
                self._resend_unflushed(remote or "no reply: the flush was cancelled")
            if local is not None:
                self._note_sync_failure(local)
            raise
        if remote is not None:
            self._resend_unflushed(remote)
        if local is None and self._sync_failure is not None:
            local = self._sync_failure  # the kernel told an fdatasync since, not this fsync
        if local is not None:
            self._sync_failure = None  # handled here: repaired, or flushing breaks
            try:
                repaired = remote is None and await self._repair_from_replica(link, local)
            except BaseException:
                self._note_sync_failure(local)
                raise
            if not repaired:
                self._break_flushing(f"flushing {self.image.path} failed: {local}")
                raise local
        if remote is not None:
            if link is self.link:  # else its own end already reported it, and another may serve
                self._link_failed(remote)
            return remote
        self._clean_flush = (link, marked)
        self.flushes += 1
        return None

    def _break_flushing(self, why: str) -> None:
        """A local flush failed and cannot be made good: every later fsync of
        disk.img fails with `why`, no NBD FLUSH is sent again (the secondary's
        received map keeps what a restart must resync), no replica first."""
        self._flush_broken = why
        self._rf_ok = False
        log.error("%s; no NBD FLUSH and no replica-first writes from now on", why)

    def _mark_dirty(self, ranges) -> int:
        """Mark byte ranges [(offset, length)] dirty (one slice per run);
        returns their bytes."""
        geo, n = self.geometry, 0
        for off, length in ranges:
            self.dirty.set(*geo.blocks(off, length))
            n += length
        return n

    def _resend_unflushed(self, error) -> None:
        """The secondary's flush failed (an error reply, or the link went
        down): what it received since the last good flush began may not be
        on its disk (its kernel reports a write-back error once; the next
        flush there may succeed).  Mark all of it for the resync that
        follows the reconnect: what the writes and any sync sent since then,
        by map grain (two generations: since the flush that failed began,
        and between the two latest flush starts)."""
        self._mark_dirty(grain_ranges(self._written | self._written_before | self._synced | self._synced_before,
                                      GRAIN_SHIFT, self.size))
        log.warning("the secondary's flush failed (%s): what it received since the last good flush will be "
                    "sent again (%d bytes dirty now)", error, min(self.dirty.count() << self.geometry.shift,
                                                                   self.size))

    def _note_sync_failure(self, e: RepdiskError) -> None:
        if self._sync_failure is None:
            self._sync_failure = e
        self._flushes_owed = max(self._flushes_owed, 1)
        self._last_flush = float("-inf")  # the flush timer runs the next flush now
        log.error("%s: writes since the last good flush are in doubt; the next flush repairs them "
                  "from the secondary or fails", e)

    async def _repair_from_replica(self, link, failure: RepdiskError) -> bool:
        """Our fsync failed (`failure`), the secondary's flush did not.  The
        kernel may have dropped writes, or kept pages it never wrote, marked
        clean: what was written since the last good fsync began is in doubt.
        If every write since was sent on this link, the secondary holds them
        all: compare our disk with it there (our clean cached pages dropped
        first, so we read what our disk holds), write back what differs, and
        fsync again.  True: our disk holds every write, durably.

        Two passes, so that the VM's writes stop only briefly.  The first runs
        alongside them and writes nothing: a range that reads back equal holds
        the data (a write that lands meanwhile leaves a dirty page, which the
        final fsync writes), one that differs may be lost or merely being
        written.  The second holds writes, settles the link and compares only
        those ranges again, writing back what still differs.  (Dirty pages
        read back equal and are written by the final fsync, which reports any
        new failure.)"""
        image = self.image
        log.error("flushing %s failed: %s; repairing it from the secondary", image.path, failure)

        def why_not() -> str | None:
            """None while every write since the last good flush is on `link`'s secondary."""
            clean = self._clean_flush
            if clean is None or clean[0] is not link:
                return "no flush on this link has succeeded yet"
            if link is not self.link or link.failed is not None:
                return f"the link to the secondary failed ({link.failed})"
            if self.state != st.P_REPLICATING:
                return f"the primary is {self.state}, not replicating"
            if clean[1] != self.writes_marked:
                return (f"{self.writes_marked - clean[1]} writes since the last good flush were only marked "
                        "for a resync, not sent")
            return None

        self.repair_refused = why_not()
        if self.repair_refused is not None:
            self.repair_result = (f"not possible after {failure}: not every write since the last good flush "
                                  f"is on this secondary: {self.repair_refused}")
            log.error("%s", self.repair_result)
            return False
        # (The marks stay: writes started since this flush began may not be
        # on the secondary's disk yet, if its next flush fails.)
        doubt = grain_ranges(self._written | self._written_before, GRAIN_SHIFT, self.size)
        pieces = [(pos, min(REPAIR_PIECE, off + length - pos))
                  for off, length in doubt for pos in range(off, off + length, REPAIR_PIECE)]
        checked = sum(n for _, n in pieces)
        self.repair.start(checked)
        self.repair_held = 0.0
        again = rewritten = 0
        try:
            differ = await self._repair_pass(link, pieces, write_back=False)
            t0 = trio.current_time()
            held = self._writes_held = trio.Event()  # disk_write waits for it
            try:
                await self._writes_done()
                await link.settle()
                if (reason := why_not()) is not None:
                    raise IOFailure(f"the link to the secondary changed during the repair: {reason}", None)
                again = sum(n for _, n in differ)
                self.repair.total += again
                fixed = await self._repair_pass(link, differ, write_back=True)
                rewritten = sum(n for _, n in fixed)
            finally:
                self._writes_held = None
                held.set()
                self.repair_held = trio.current_time() - t0
            await trio.to_thread.run_sync(image.fsync)
        except RepdiskError as e:
            self.repair_result = f"failed after {failure}: {e}"
            log.error("repair from the secondary %s", self.repair_result)
            return False
        finally:
            self.repair.finish()
        self.repairs += 1
        self.repair_result = (f"repaired after {failure}: {checked} bytes written since the last good flush "
                              f"compared, {again} compared again with writes held for {self.repair_held:.3f} s, "
                              f"{rewritten} rewritten, fsync succeeded")
        log.warning("%s: %s", image.path, self.repair_result)
        return True

    async def _repair_pass(self, link, pieces: list, write_back: bool) -> list:
        """Compare `pieces` [(offset, length)] of our disk (clean cached pages
        dropped) with the secondary's, reading REPAIR_BATCH of them at once;
        with `write_back`, write theirs over ours where they differ.  Returns
        the pieces that differed.  The secondary's next batch is read while
        this one is compared, and each batch's local pieces are read from the
        disk all at once (readahead), not one after the other: ranges written
        at random are scattered, and a disk answers many reads at once about
        as fast as one."""
        image = self.image

        def compare(batch, remote) -> list:
            for pos, n in batch:
                image.drop_cached(pos, n)
            for pos, n in batch:
                image.read_soon(pos, n)
            differ = []
            for (pos, n), theirs in zip(batch, remote):
                if image.pread(pos, n) != theirs:
                    if write_back:
                        image.pwrite(theirs, pos)
                    differ.append((pos, n))
            return differ

        async def fetch(batch, remote: list, task_status=trio.TASK_STATUS_IGNORED) -> None:
            """Read `batch` from the secondary into `remote`; started once
            every read of it is submitted."""
            async def one(j, pos, n, task_status):
                remote[j] = await link.read(pos, n, task_status=task_status)

            async with trio.open_nursery() as nursery:
                for j, (pos, n) in enumerate(batch):
                    await nursery.start(one, j, pos, n)
                task_status.started()

        differ: list = []
        todo = list(batches(pieces, REPAIR_BATCH, REPAIR_BATCH_BYTES))
        if not todo:
            return differ
        remote: list = [None] * len(todo[0])
        await fetch(todo[0], remote)
        for k, batch in enumerate(todo):
            following = [None] * len(todo[k + 1]) if k + 1 < len(todo) else None
            async with trio.open_nursery() as nursery:
                if following is not None:  # submitted before the compare starts
                    await nursery.start(fetch, todo[k + 1], following)
                differ += await trio.to_thread.run_sync(compare, batch, remote)
            self.repair.add(sum(n for _, n in batch))
            remote = following
        return differ

    async def _writes_done(self) -> None:
        """Wait until no disk_write is in progress."""
        while self._writes_active:
            self._writes_quiet = trio.Event()
            await self._writes_quiet.wait()
        self._writes_quiet = None

    async def _flush_timer(self, link) -> None:
        """Flush both sides when replica-first writes have put FLUSH_BYTES
        into the secondary's received map since the last flush, or
        flush_interval seconds after it, until the map has dropped every
        replica-first write: what a crash of our host would resync stays
        bounded, and a hot working set is not flushed again and again."""
        self._last_flush = trio.current_time()
        while link.failed is None:
            await trio.sleep(min(FLUSH_POLL, self.flush_interval))
            due = (self._rf_bytes >= self.flush_bytes
                   or trio.current_time() - self._last_flush >= self.flush_interval)
            if due and self._flushes_owed and self.state in (st.P_REPLICATING, st.P_SYNCING) \
                    and self._flush_broken is None:
                try:
                    if await self._flush(link) is not None:
                        return
                except RepdiskError as e:
                    log.error("periodic flush: %s", e)
                    return

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
            "direct_write_bytes": self.image.direct_bytes,
            "page_cache_drops": self.image.cache_drops,
            "write_behind": self.write_behind.as_dict() if self.write_behind is not None else None,
            "node_id": self.meta.node,
            "disk_id": self.meta.disk,
            "generation": f"{self.meta.gen:x}",
            "secondary_generation": f"{self.meta.peer_gen:x}",
            "resync_kind": self.resync_kind,
            "metadata_problem": self.meta_problem,
            "activity_log": {"extents": len(self._al), "extent_bytes": 1 << AL_SHIFT, "max_extents": self.al_extents if self._al_fd is not None else 0,
                             "writes": self.al_writes, "evictions": self.al_evictions, "waits": self.al_waits,
                             "durability": self.al_durability},
            "replica_first": {"active": self._rf_ok, "writes": self.writes_replica_first,
                              "flushes": self.flushes, "flush_broken": self._flush_broken,
                              "secondary_run": self.meta.peer_run or None, "after_unclean_stop": self.received_merge,
                              "repairs": self.repairs,
                              "sync_failure": None if self._sync_failure is None else str(self._sync_failure)},
        }
        if self.repair_result is not None or self.repair.started is not None:
            s["replica_first"]["repair"] = {**self.repair.as_dict(), "writes_held_s": round(self.repair_held, 3),
                                            "result": self.repair_result, "refused": self.repair_refused}
        if self.verify.started is not None:
            geo = self.geometry
            s["verify"] = {**self.verify.as_dict(), "result": self.verify_result,
                           "differing_bytes": sum(b - a for a, b in self.verify_diffs) << geo.shift,
                           "ranges": [[a << geo.shift, min(b << geo.shift, geo.size)] for a, b in self.verify_diffs[:100]]}
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
        handlers = {"checkpoint": (self.checkpoint, (0, 1)), "failover": (self.failover, (0,)),
                    "reconnect": (self.reconnect, (0,)), "connect": (self.connect_to, (1,)),
                    "resolve": (self.resolve, (1,)), "verify": (self.start_verify, (0, 1))}
        try:
            name, args = parse_command(text)
            if name not in handlers or len(args) not in handlers[name][1]:
                raise UnknownCommand(f"unknown command {text!r}; the primary knows: checkpoint [flush], failover, reconnect, "
                                     "connect URI, resolve discard-secondary, verify [resync]")
            async with self._lock:
                await handlers[name][0](*args)
        except RepdiskError as e:
            self.error = str(e)
            raise

    async def checkpoint(self, how: str = "") -> None:
        """Return once every write acknowledged on disk.img before now is on the
        secondary (in its page cache: COLO needs the secondary's view to equal
        this disk, not durability).  `checkpoint flush` (or --checkpoint-flush)
        also sends NBD FLUSH, so the replica is durable up to this checkpoint."""
        if how not in ("", "flush"):
            raise UnknownCommand(f"checkpoint {how!r}: use 'checkpoint' or 'checkpoint flush'")
        self._event("checkpoint")
        flush = how == "flush" or self.checkpoint_flush
        link = self.link
        if flush:
            # Every write acknowledged before now, then NBD FLUSH (and our own
            # fsync: the flush protocol); a local failure is raised as is.
            failed = await self._flush(link)
            if failed is not None:
                raise IOFailure("checkpoint: the secondary did not take the flush", None) from failed
        else:
            try:
                await link.settle()  # every write acknowledged before now
            except RepdiskError as e:
                self._link_failed(e)
                raise IOFailure("checkpoint: the secondary did not take the writes", None) from e
        self.epoch += 1
        self.error = None
        log.info("checkpoint %d: replication drained%s", self.epoch, " and flushed" if flush else "")

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
        self._plain = False
        self.dirty.set_all()  # a new secondary: send it everything
        self._retry_now.set()
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def resolve(self, how: str) -> None:
        if how != "discard-secondary":
            raise UnknownCommand(f"resolve {how!r}: the primary knows 'resolve discard-secondary' (this disk wins; "
                                 "to keep the secondary's data, fail it over and make it the primary instead)")
        self._event("resolve")
        self._force = True
        self.dirty.set_all()  # what the secondary changed since the split is unknown: everything
        self.error = None
        log.warning("split brain resolved by the operator: the secondary's data is discarded (full sync)")
        self._retry_now.set()
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def start_verify(self, mode: str = "") -> None:
        if mode not in ("", "resync"):
            raise UnknownCommand(f"verify {mode!r}: use 'verify' or 'verify resync'")
        if self.verify.started is not None and self.verify.finished is None:
            raise Busy("a verify is already running")
        self._event("verify")
        nursery = self._link_nursery
        self.verify.start(self.size)
        self.verify_diffs = []
        self.verify_result = "running"
        nursery.start_soon(self._verify, self.link, mode == "resync")

    async def _verify(self, link, resync: bool) -> None:
        """Compare the local disk with the replica, VERIFY_CHUNK at a time
        (link.read pipelines it as several NBD reads).  A chunk that a write
        touched while it was compared is compared again."""
        geo, image = self.geometry, self.image
        diffs = self.verify_diffs
        pos = 0
        try:
            while pos < geo.size:
                n = min(VERIFY_CHUNK, geo.size - pos)
                for _ in range(20):
                    self._verify_window, self._verify_touched = (pos, pos + n), False
                    await link.settle()  # every write forwarded before is on the replica
                    remote = await link.read(pos, n)
                    local = await trio.to_thread.run_sync(image.pread, pos, n)
                    if not self._verify_touched:
                        break
                if local != remote:
                    _diff_runs(diffs, geo, pos, local, remote)
                self.verify.add(n)
                pos += n
        except RepdiskError as e:
            self.verify_result = f"interrupted: {e}"
            return
        finally:
            self._verify_window = None
            self.verify.finish()
            if self.verify_result == "running":
                self.verify_result = "interrupted: the secondary was lost"
        nbytes = sum(b - a for a, b in diffs) << geo.shift
        self.verify_result = f"{len(diffs)} differing ranges, {nbytes} bytes" if diffs else "identical"
        log.info("verify done: %s", self.verify_result)
        if resync and diffs and self.state == st.P_REPLICATING and link is self.link:
            for a, b in diffs:
                self.dirty.set(a, b)
            self._event("resync")
            self.sync.start(0)
            await self._sync_then_replicate(link)

    async def shutdown(self) -> None:
        """Clean stop: drain and flush replication, fsync the image."""
        link = self.link
        drained = link is None
        if link is not None and link.failed is None:
            with trio.move_on_after(10) as timeout:
                try:
                    failed = await self._flush(link)
                    if failed is None:
                        drained = True
                        log.info("replication drained and flushed")
                    else:
                        log.warning("final flush to the secondary failed: %s", failed)
                except RepdiskError as e:
                    log.warning("final flush failed: %s", e)
            if timeout.cancelled_caught:
                log.warning("final flush to the secondary did not finish within 10 s")
        self._stopping = True
        if link is not None:
            await _close_quietly(link)  # NBD_CMD_DISC: the secondary sees a clean disconnect
        await trio.to_thread.run_sync(self.image.fsync)
        # A clean stop: the bitmap holds everything the secondary lacks.  Without a
        # drained link, in-flight writes are only covered by the activity log.
        # After a failed local flush, the secondary's received map is what tells
        # the next start which ranges our disk may have lost: not clean.
        self.meta.clean = (drained or (link is not None and link.failed is not None)) and self._flush_broken is None
        await trio.to_thread.run_sync(self._persist)


def batches(pieces: list, count: int, nbytes: int):
    """Consecutive runs of `pieces` [(offset, length)], each ending at `count`
    pieces or once it holds `nbytes` (a longer piece goes alone)."""
    batch: list = []
    size = 0
    for piece in pieces:
        if batch and (len(batch) == count or size + piece[1] > nbytes):
            yield batch
            batch, size = [], 0
        batch.append(piece)
        size += piece[1]
    if batch:
        yield batch


def _count(counts: dict, e0: int, e1: int, step: int) -> None:
    """Add `step` (+1/-1) to the counts of extents e0..e1; a count of 0 goes."""
    for e in range(e0, e1 + 1):
        n = counts.get(e, 0) + step
        if n:
            counts[e] = n
        else:
            del counts[e]


def _diff_runs(runs: list, geo: Geometry, start: int, local: bytes, remote: bytes) -> None:
    """Append the runs [first, end) of blocks that differ between two equal
    slices starting at byte `start` (block aligned).  Called only for slices
    that differ, so the per-block loop is rare."""
    bs = geo.block_size
    b0 = start >> geo.shift
    lv, rv = memoryview(local), memoryview(remote)
    for i in range(0, len(local), bs):
        if lv[i : i + bs] != rv[i : i + bs]:
            blk = b0 + i // bs
            if runs and runs[-1][1] == blk:
                runs[-1] = (runs[-1][0], blk + 1)
            else:
                runs.append((blk, blk + 1))


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
