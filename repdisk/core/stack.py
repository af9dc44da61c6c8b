"""The secondary's block stack, QEMU block replication's secondary exactly:

    view (the secondary VM's disk)   reads: active -> hidden -> replica
                                     writes: the active overlay only
    primary writes (over NBD)        copy-before-write into hidden, then the replica

Every method is synchronous and runs start to end without yielding; the stack
takes no lock itself: its user calls it holding one lock (the secondary node's
io_lock, shared with the NBD server's thread), so each call is atomic with
respect to the others (that is what makes copy-before-write safe against
concurrent view I/O).  The only long
operation, the failover commit, is split into windows the caller copies one
at a time (see `commit_windows`), holding off the writes that touch a block
the window copies.
"""

from collections.abc import Iterator

from bitarray.util import count_n

from .bitmap import Bitmap
from .geometry import Geometry
from .image import RawImage
from .overlay import Overlay


# A copy-before-write or commit run at least this long looks for holes in
# its source first and punches them in the destination: copying them would
# write (and allocate) zeros, all over the replica after an initial sync.
SPARSE_COPY_MIN = 1 << 16


class SecondaryStack:
    def __init__(self, replica: RawImage, hidden_path: str, active_path: str, block_size: int):
        self.geometry = Geometry(replica.size, block_size)
        self.replica = replica
        self.hidden = Overlay(hidden_path, self.geometry)
        self.active = Overlay(active_path, self.geometry)
        # After failover the overlays are merged into the replica and the view is
        # the replica itself.
        self.standalone = False
        self.committing = False
        self.sparse_copy_min = SPARSE_COPY_MIN

    @property
    def size(self) -> int:
        return self.geometry.size

    # ---- reading -------------------------------------------------------------

    def _read(self, offset: int, length: int, layers: tuple[Overlay, ...]) -> bytearray:
        """Read through `layers` (lowest first) over the replica."""
        geo = self.geometry
        buf = bytearray(length)
        self.replica.readinto(buf, offset)
        b0, b1 = geo.blocks(offset, length)
        end = offset + length
        mv = memoryview(buf)
        for layer in layers:
            for a, b in layer.map.runs(b0, b1):
                start = max(a << geo.shift, offset)
                stop = min(b << geo.shift, end)
                layer.file.readinto(mv[start - offset : stop - offset], start)
        return buf

    def _covered(self, b0: int, b1: int) -> bool:
        """Does either overlay hold a block of [b0, b1)?  (Hot path: two finds.)"""
        return self.hidden.map.any(b0, b1) or self.active.map.any(b0, b1)

    def view_read(self, offset: int, length: int) -> bytes:
        self.geometry.check(offset, length)
        b0, b1 = self.geometry.blocks(offset, length)
        if b1 - b0 == 1:  # one block (most reads): two bit tests, one pread
            if self.active.map.bits[b0]:
                return self.active.file.pread(offset, length)
            if self.hidden.map.bits[b0]:
                return self.hidden.file.pread(offset, length)
            return self.replica.pread(offset, length)
        hidden, active = self.hidden.map, self.active.map
        in_active = active.any(b0, b1)
        if not in_active and not hidden.any(b0, b1):
            return self.replica.pread(offset, length)
        # One layer holds the whole range (a small read, usually): one pread.
        if in_active and active.all(b0, b1):
            return self.active.file.pread(offset, length)
        if not in_active and hidden.all(b0, b1):
            return self.hidden.file.pread(offset, length)
        return bytes(self._read(offset, length, (self.hidden, self.active)))

    def replica_read(self, offset: int, length: int) -> bytes:
        """What the primary sees when it reads over NBD: the replica image."""
        self.geometry.check(offset, length)
        return self.replica.pread(offset, length)

    # ---- the secondary VM's writes ---------------------------------------------

    def view_write(self, buf, offset: int, direct: bool = False) -> None:
        """direct: past the page cache where it can (RawImage.pwrite)."""
        geo = self.geometry
        length = len(buf)
        geo.check(offset, length)
        if length == 0:
            return
        b0, b1 = geo.blocks(offset, length)
        if self.standalone or (self.committing and not self._covered(b0, b1)):
            # The view is the replica for these blocks: write it in place.
            self.replica.pwrite(buf, offset, direct)
            return
        active = self.active
        m = geo.block_size - 1
        end = offset + length
        if offset & m or (end & m and end != geo.size):  # a block only partly written
            # A partly written block that the active overlay does not hold yet is
            # first filled with what the view shows there (read-modify-write), so
            # that a set bit always means "the whole block is here".
            i0, i1 = geo.inner_blocks(offset, length)
            edges = {b for b in (b0, b1 - 1) if not (i0 <= b < i1) and not active.map.test(b)}
            for b in sorted(edges):
                start, n = geo.byte_range(b, b + 1)
                active.file.pwrite(self._read(start, n, (self.hidden,)), start)
        active.file.pwrite(buf, offset, direct)
        active.map.set(b0, b1)

    # ---- the primary's writes (NBD) -------------------------------------------

    def _due(self, offset: int, length: int):
        """(b0, runs): the blocks of [offset, offset+length) whose
        copy-before-write is still due, those neither overlay holds, as runs
        [a, b) relative to b0 (none while standalone)."""
        b0, b1 = self.geometry.blocks(offset, length)
        if b0 == b1 or self.standalone:
            return b0, ()
        in_hidden, in_active = self.hidden.map.bits, self.active.map.bits
        if b1 - b0 == 1:  # one block (most writes): two bit tests, no slices
            return b0, (() if in_hidden[b0] or in_active[b0] else ((0, 1),))
        held = in_hidden[b0:b1] | in_active[b0:b1]
        if held.all():
            return b0, ()
        need = Bitmap(0)
        need.bits = ~held
        return b0, need.runs()

    def _protect(self, offset: int, length: int) -> None:
        """Copy-before-write: keep the view's current content of every block in
        [offset, offset+length) that neither overlay holds yet in the hidden
        overlay.  One copy_file_range per run; holes are taken over for free."""
        b0, runs = self._due(offset, length)
        geo, hidden = self.geometry, self.hidden
        for a, b in runs:
            start, n = geo.byte_range(b0 + a, b0 + b)
            # Holes are taken over, not copied: nothing to copy, and copying
            # would write (allocate) zeros; stale bytes there are cleared.
            if n >= self.sparse_copy_min:
                self.replica.copy_keeping_holes(hidden.file, start, n, clear=hidden.clear_stale)
            elif self.replica.is_hole(start, n):
                hidden.clear_stale(start, n)
            else:
                self.replica.copy_to(hidden.file, start, n)
            hidden.map.set(b0 + a, b0 + b)

    def protect_soon(self, offset: int, length: int) -> None:
        """A primary write of [offset, offset+length) will come: start reading
        the replica's blocks that its copy-before-write will copy (`_due`)
        into the page cache, without waiting.  Many such hints put many
        reads in the disk's queue at once, where the copies one by one would
        wait for each in turn.  Only a hint."""
        b0, runs = self._due(offset, length)
        for a, b in runs:
            self.replica.read_soon(*self.geometry.byte_range(b0 + a, b0 + b))

    def primary_write(self, buf, offset: int) -> None:
        self.geometry.check(offset, len(buf))
        self._protect(offset, len(buf))
        self.replica.pwrite(buf, offset)

    def primary_zero(self, offset: int, length: int) -> None:
        """WRITE_ZEROES and TRIM: the range reads as zeros afterwards (a hole)."""
        self.geometry.check(offset, length)
        self._protect(offset, length)
        self.replica.punch(offset, length)

    def flush_replica(self) -> None:
        """NBD FLUSH: make the primary's writes durable (blocking).  The
        overlays need no durability: they are dropped when the node restarts."""
        self.replica.fsync()

    @property
    def view_is_replica(self) -> bool:
        """From the failover on the view is (becoming) the replica: its fsync
        has something to flush (`flush_view`)."""
        return self.standalone or self.committing

    def flush_view(self) -> None:
        """fsync of the view (blocking).

        While replicating there is nothing to make durable: the view is the
        overlays over the replica, and the overlays do not outlive the node
        (a restart drops them, as COLO rebuilds the secondary VM from the
        primary), while the replica holds the primary's writes, which the
        primary's flushes cover.  So the VM's fsync returns at once instead
        of writing back overlay pages that no restart would ever read.
        From the failover on, the view becomes the replica: during the commit
        it is partly there already (committed chunks, and writes to blocks no
        overlay holds), and after it wholly, so the replica is flushed."""
        if self.view_is_replica:
            self.replica.fsync()

    # ---- checkpoint and failover ---------------------------------------------

    def checkpoint(self) -> None:
        """Drop both overlays: the view becomes the replica (the primary's disk)."""
        self.hidden.reset()
        self.active.reset()

    @property
    def commit_pending(self) -> int:
        """Bytes still to commit in a failover."""
        return self.hidden.used_bytes + self.active.used_bytes

    def commit_windows(self, max_bytes: int = 8 << 20, max_span: int = 1 << 30) -> Iterator["CommitWindow"]:
        """The failover commit as windows, hidden first, then active: each
        starts at a block its layer holds and takes the next blocks the layer
        holds, up to `max_bytes` of them within `max_span` of address space
        (so a window of scattered 4 KiB blocks still copies megabytes, not a
        few blocks).  The caller copies a window with `commit_copy` (in a
        thread; one copy_file_range per run inside it), then calls
        `commit_done` (in the loop); meanwhile it holds off the view writes
        that touch a block the window copies (`CommitWindow.touches`).
        Bits set while the commit runs (view writes into active) are picked
        up: the generator looks again until both overlays are empty."""
        self.committing = True
        shift = self.geometry.shift
        per = max(1, max_bytes >> shift)
        span = max(1, max_span >> shift)
        for layer in (self.hidden, self.active):
            bits = layer.map.bits
            pos = 0
            while True:
                a = bits.find(1, pos)
                if a < 0:
                    if not bits.any():
                        break
                    pos = 0
                    continue
                held = bits[a : min(a + span, len(bits))]
                if held.count() > per:
                    del held[count_n(held, per) :]
                end = a + len(held)
                todo = Bitmap(0)
                todo.bits = held & ~self.active.map.bits[a:end] if layer is self.hidden else held
                yield CommitWindow(layer, a, end, held, todo)
                pos = end

    def commit_copy(self, w: "CommitWindow") -> int:
        """Copy the window's blocks into the replica (blocking); hidden
        blocks that active overrides are skipped.  Returns the bytes copied."""
        geo = self.geometry
        copied = 0
        for a, b in w.todo.runs():
            start, n = geo.byte_range(w.first + a, w.first + b)
            if n >= self.sparse_copy_min:
                w.layer.file.copy_keeping_holes(self.replica, start, n)
            else:  # one copy_file_range; scattered blocks are where the time goes
                w.layer.file.copy_to(self.replica, start, n)
            copied += n
        return copied

    def commit_done(self, w: "CommitWindow") -> None:
        """The window is in the replica: its layer lets go of the blocks it
        held when the window was taken (not of blocks a view write gave it
        since: those were not copied)."""
        w.layer.map.bits[w.first : w.end] &= ~w.held

    def finish_commit(self) -> None:
        """Both overlays are merged: serve the view from the replica from now on."""
        if self.hidden.map.any() or self.active.map.any():
            raise RuntimeError("finish_commit with blocks left in the overlays")
        self.standalone = True
        self.committing = False

    def close(self) -> None:
        self.hidden.close()
        self.active.close()
        self.replica.close()


class CommitWindow:
    """One step of the failover commit: the blocks `layer` held in [first,
    end) when the window was taken (`held`, relative to `first`), and those
    of them to copy into the replica (`todo`: for hidden, what active does
    not override)."""

    __slots__ = ("layer", "first", "end", "held", "todo")

    def __init__(self, layer: Overlay, first: int, end: int, held, todo: Bitmap):
        self.layer, self.first, self.end, self.held, self.todo = layer, first, end, held, todo

    @property
    def nbytes(self) -> int:
        """Bytes of the layer this window lets go of."""
        return self.held.count() << self.layer.geometry.shift

    def touches(self, b0: int, b1: int) -> bool:
        """Does a write to blocks [b0, b1) touch a block being copied?  Only
        such a write must wait: any other goes where the copy does not look
        (the replica at a block the window does not copy, or active)."""
        a, b = max(b0, self.first), min(b1, self.end)
        return a < b and self.todo.bits.find(1, a - self.first, b - self.first) >= 0
