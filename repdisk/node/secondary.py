"""The secondary node: the NBD server takes the primary's writes into the
replica with copy-before-write; the FUSE view shows active -> hidden -> replica.

The node runs in trio; the NBD server's transmission runs in a thread of its
own (see nbdserver).  Stack calls are synchronous and never yield, and every
one of them, from either thread, holds `io_lock`: each NBD request, view read
and view write is atomic with respect to the others and to checkpoint.  The
failover commit (after the NBD client is gone) copies windows in a thread; a
view write waits while a block it touches is being copied (`_commit_window`).
"""

import logging
import threading

import trio

from ..core import meta as md
from ..core.blockdev import BytesDevice
from ..core.errors import RepdiskError, UnknownCommand
from ..core.recvmap import ReceivedMap
from ..core.stack import SecondaryStack
from . import state as st
from .control import Progress, parse_command
from .writebehind import WriteBehind

log = logging.getLogger(__name__)


class SecondaryNode:
    role = "secondary"

    def __init__(self, stack: SecondaryStack, *, listen: str, invalidate=None, meta_path: str | None = None):
        self.stack = stack
        # This run of the node (a process): the received map lives as long.
        self.run = md.new_id()
        self.received = ReceivedMap(stack.size)
        self.meta_path = meta_path
        self.meta = self._load_meta()
        self.listen = listen
        self.state = st.S_WAITING
        self.epoch = self.meta.epoch
        self.error: str | None = None
        self.peer: str | None = None
        self.server = None  # NbdServer, set by the app
        self.commit = Progress()
        self._commit_window = None  # the CommitWindow being copied
        self._commit_moved = trio.Event()
        self._invalidate = invalidate  # async callable: drop the kernel's cached view
        self._lock = trio.Lock()  # one command at a time
        # Held around every stack call: the NBD server's thread takes it too.
        self.io_lock = threading.Lock()
        self.write_behind = None  # a WriteBehind fed by the replica image (--write-behind), set by run.py

    @property
    def size(self) -> int:
        return self.stack.size

    # ---- identity -----------------------------------------------------------
    def _load_meta(self) -> md.Meta:
        if self.meta_path is None:
            return md.Meta(node=md.new_id())
        boot = md.boot_id()
        try:
            m = md.load_meta(self.meta_path)
            log.info("metadata: node %s, disk %s, generation %x", m.node, m.disk, m.gen)
            if not m.clean and m.disk is not None and m.boot != boot:
                # The host went down under us: what the replica acknowledged was in
                # the page cache and may be lost.  Only a full sync is safe.
                log.warning("%s: the host restarted since this node last ran (unclean stop): "
                            "forgetting disk %s, the primary will do a full sync", self.meta_path, m.disk)
                m.disk, m.gen = None, 0
        except md.MetaError as e:
            # Safe choice: belong to no disk, so the next primary does a full sync.
            log.warning("%s; starting as a new node: the primary will do a full sync", e)
            m = md.Meta(node=md.new_id())
        m.clean = False
        m.boot = boot
        self._save(m)
        return m

    def _save(self, m: md.Meta | None = None) -> None:
        if self.meta_path is not None:
            md.save_meta(self.meta_path, m or self.meta)

    @property
    def description(self) -> str:
        m = self.meta
        return md.format_identity(m.node, m.disk, m.gen, self.epoch, self.run)

    def side_export(self, name: str):
        """The NBD server's hook for side exports: the received map (a
        snapshot, read-only) for a primary recovering from a crash."""
        if name != md.RECEIVED_EXPORT:
            return None
        r = self.received
        with self.io_lock:
            bits = r.snapshot()
        log.info("received map read: %d grains of %d bytes", bits.count(), 1 << r.shift)
        return BytesDevice(bits.tobytes()), md.format_received(self.run, r.shift, r.nbits)

    def check_export(self, name: str, commit: bool) -> str | None:
        """The NBD server's hook for the export name a repdisk primary asks
        for: refuse a primary of another disk or with diverged data."""
        asked = md.parse_export_name(name)
        if asked is None:
            return f"no export named {name[:100]!r}"
        m = self.meta
        verdict = md.secondary_verdict(m.disk, m.gen, asked)
        if verdict == md.FOREIGN:
            why = (f"this secondary holds disk {m.disk}, not {asked['disk']} (a secondary of another pair?); "
                   f"nothing overwritten; 'resolve discard-secondary' on the primary overwrites it")
        elif verdict == md.SPLIT_BRAIN:
            why = (f"split brain: this secondary's data generation {m.gen:x} took writes the primary does not "
                   f"have (primary at {asked['gen']:x}, last shared {asked['peer']:x}); nothing overwritten; "
                   f"'resolve discard-secondary' on the primary makes this node a copy of it")
        else:
            why = None
        if why is not None:
            self.error = why
            if self.state in (st.S_WAITING, st.S_SPLIT_BRAIN):
                self._event("split_brain")
            return why
        if commit:
            log.info("primary of disk %s at generation %x accepted (%s)", asked["disk"], asked["gen"], verdict)
            m.disk, m.gen = asked["disk"], asked["gen"]
            self._save()
            self._describe()
        return None

    def _describe(self) -> None:
        if self.server is not None:
            self.server.description = self.description

    def _event(self, event: str) -> str | None:
        new, action = st.transition(st.SECONDARY, st.SECONDARY_WHY, self.state, event)
        if new != self.state:
            log.info("state %s -> %s (%s)", self.state, new, event)
        self.state = new
        return action

    # ---- NBD server hooks ---------------------------------------------------
    def on_connect(self, peer: str) -> None:
        self._event("connect")
        self.peer = peer
        log.info("primary connected from %s", peer)

    def on_disconnect(self, peer: str, error: str | None) -> None:
        self.peer = None
        if error:
            self.error = f"primary connection from {peer} ended: {error}"
        log.info("primary %s disconnected%s", peer, f": {error}" if error else "")
        if self.state == st.S_REPLICATING:
            self._event("disconnect")

    # ---- the view (FUSE disk.img) -------------------------------------------
    async def disk_read(self, offset: int, length: int) -> bytes:
        with self.io_lock:
            return self.stack.view_read(offset, length)

    async def disk_write(self, offset: int, buf, direct: bool = False) -> None:
        while self._commit_window is not None and self._touches_commit(offset, len(buf)):
            await self._commit_moved.wait()
        with self.io_lock:
            self.stack.view_write(buf, offset, direct)

    def _touches_commit(self, offset: int, length: int) -> bool:
        return self._commit_window.touches(*self.stack.geometry.blocks(offset, length))

    async def disk_fsync(self) -> None:
        if self.stack.view_is_replica:  # else nothing to flush, and no thread hop
            await trio.to_thread.run_sync(self.stack.flush_view)

    # ---- control ------------------------------------------------------------
    def status(self) -> dict:
        geo = self.stack.geometry
        s = {
            "role": self.role,
            "state": self.state,
            "epoch": self.epoch,
            "error": self.error,
            "size": geo.size,
            "block_size": geo.block_size,
            "hidden_bytes": self.stack.hidden.used_bytes,
            "active_bytes": self.stack.active.used_bytes,
            "direct_write_bytes": self.stack.active.file.direct_bytes + self.stack.replica.direct_bytes,
            "page_cache_drops": sum(f.cache_drops for f in (
                self.stack.replica, self.stack.hidden.file, self.stack.active.file)),
            "write_behind": self.write_behind.as_dict() if self.write_behind is not None else None,
            "peer": self.peer,
            "listen": self.listen,
            "node_id": self.meta.node,
            "disk_id": self.meta.disk,
            "generation": f"{self.meta.gen:x}",
            "run": self.run,
            "received": {"grain_bytes": 1 << self.received.shift, "flushes": self.received.flushes},
        }
        if self.state in (st.S_FAILOVER, st.S_STANDALONE) or self.commit.total:
            s["commit"] = self.commit.as_dict()
        if self.server is not None:
            s["nbd"] = self.server.statistics()
        return s

    async def command(self, text: str) -> None:
        try:
            name, args = parse_command(text)
            handler = {"checkpoint": self.checkpoint, "failover": self.failover}.get(name)
            if handler is None or args:
                raise UnknownCommand(f"unknown command {text!r}; the secondary knows: checkpoint, failover")
            async with self._lock:
                await handler()
        except RepdiskError as e:
            self.error = str(e)
            raise

    async def checkpoint(self) -> None:
        self._event("checkpoint")
        with self.io_lock:
            self.stack.checkpoint()  # atomic: no await between the drop and the epoch
        self.epoch += 1
        self.meta.epoch = self.epoch
        self.error = None
        self._describe()
        log.info("checkpoint %d: overlays dropped", self.epoch)
        if self._invalidate is not None:
            await self._invalidate()

    async def failover(self) -> None:
        self._event("failover")
        if self.server is not None:
            self.server.refuse("this secondary has failed over and accepts no primary")
            await self.server.disconnect()
        self.error = None
        self.commit.start(self.stack.commit_pending)
        try:
            await self._commit()
            # The view lives in the replica from now on: what the VM flushed
            # into the overlays must be durable there before they go.
            await trio.to_thread.run_sync(self.stack.flush_replica)
        except Exception as e:
            self._event("commit_failed")
            self.error = f"failover commit failed (view unchanged, retry with 'failover'): {e}"
            log.error("%s", self.error)
            raise
        finally:
            self._commit_window = None
            self._commit_moved.set()
            self._commit_moved = trio.Event()  # a retry's writes must wait, not spin on a set event
        with self.io_lock:
            self.stack.finish_commit()
        # From now on this disk takes writes the primary does not get.
        self.meta.gen = md.new_gen()
        await trio.to_thread.run_sync(self._save)
        self._describe()
        self._event("commit_done")
        self.commit.finish()
        log.info("failover done: %d bytes committed in %.3f s", self.commit.done, self.commit.elapsed)

    async def _commit(self) -> None:
        """Copy the overlays into the replica, window by window.  Each copied
        window goes to write-back at once, from a thread of its own, so the
        disk writes it while the next is copied and the fsync at the end has
        little left (asked from the copying thread instead, the write-back
        held the copy up and gained nothing)."""
        stack = self.stack
        behind = WriteBehind(stack.replica)
        try:
            for w in stack.commit_windows():
                self._commit_window = w
                await trio.to_thread.run_sync(stack.commit_copy, w)
                with self.io_lock:
                    stack.commit_done(w)
                self._commit_window = None
                self._commit_moved.set()
                self._commit_moved = trio.Event()
                self.commit.add(w.nbytes)
                self.commit.total = max(self.commit.total, self.commit.done)  # view writes added some
                behind.add(*stack.geometry.byte_range(w.first, w.end))
        finally:
            behind.close()
