"""The secondary's block stack against the bytearray model (Hypothesis)."""

import ctypes
import errno
import mmap
import os
import shutil
import struct
import subprocess

import hypothesis.strategies as hs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from repdisk.core.errors import IOFailure, OutOfRange
from repdisk.core.geometry import Geometry
from repdisk.core.image import DIRECT_MIN, REFOLIO_MIN, WRITE_PIECE, RawImage, cachestat
from repdisk.core.stack import SecondaryStack

from model import PairModel
from nodes import wait_until

BS = 512


def make_stack(tmp, size, initial=b"", bs=BS):
    path = os.path.join(tmp, "replica.img")
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(initial)
    img = RawImage.open(path, size)
    return SecondaryStack(img, path + ".hidden", path + ".active", bs)


@hs.composite
def ranges(draw, size):
    """Offsets and lengths biased to block edges and the end of the disk."""
    edge = draw(hs.sampled_from(["any", "aligned", "end", "tiny"]))
    if edge == "aligned":
        off = draw(hs.integers(0, size // BS - 1)) * BS
        length = draw(hs.integers(1, 4)) * BS
    elif edge == "end":
        length = draw(hs.integers(1, 3 * BS))
        off = max(0, size - length)
    elif edge == "tiny":
        off = draw(hs.integers(0, size - 1))
        length = draw(hs.integers(1, 3))
    else:
        off = draw(hs.integers(0, size - 1))
        length = draw(hs.integers(1, 3 * BS))
    length = min(length, size - off)
    return off, length


class StackMachine(RuleBasedStateMachine):
    """Primary writes (NBD side), secondary writes and reads (view), checkpoint
    and failover in any order; after every step the view, the replica and
    the overlays agree with the model."""

    @initialize(size_blocks=hs.integers(1, 12), tail=hs.integers(0, BS - 1), seed=hs.binary(min_size=0, max_size=64),
                sparse_copy_min=hs.sampled_from([1, BS, 1 << 16]))
    def setup(self, size_blocks, tail, seed, sparse_copy_min):
        import tempfile

        self.tmp = tempfile.mkdtemp(prefix="repdisk-stack-")
        self.size = size_blocks * BS + tail
        initial = (seed * (self.size // max(1, len(seed)) + 1))[: self.size] if seed else bytes(self.size)
        self.stack = make_stack(self.tmp, self.size, initial)
        self.stack.sparse_copy_min = sparse_copy_min  # the commit's hole-keeping copy on small disks too
        self.model = PairModel(self.size, initial)
        self.counter = 0
        self.written = []  # ranges written so far: reads aimed at them hit the overlays' fast paths

    def teardown(self):
        if hasattr(self, "stack"):
            self.stack.close()
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)

    def _data(self, n):
        self.counter += 1
        return bytes((self.counter * 7 + i) % 251 + 1 for i in range(n))

    @rule(data=hs.data())
    @precondition(lambda self: not self.model.failed_over)
    def primary_write(self, data):
        off, n = data.draw(ranges(self.size))
        buf = self._data(n)
        self.stack.primary_write(buf, off)
        self.model.primary_write(off, buf)
        self.written.append((off, n))

    @rule(data=hs.data())
    @precondition(lambda self: not self.model.failed_over)
    def primary_zero(self, data):
        off, n = data.draw(ranges(self.size))
        self.stack.primary_zero(off, n)
        self.model.primary_zero(off, n)

    def _view_write(self, buf, off):
        self.stack.view_write(buf, off)
        self.model.secondary_write(off, buf)

    @rule(data=hs.data())
    def secondary_write(self, data):
        off, n = data.draw(ranges(self.size))
        buf = self._data(n)
        self.stack.view_write(buf, off)
        self.model.secondary_write(off, buf)
        self.written.append((off, n))

    @rule(data=hs.data())
    @precondition(lambda self: self.written)
    def view_read_written(self, data):
        """Read (part of) a range written earlier: inside one overlay, or across
        blocks both overlays hold."""
        off, n = data.draw(hs.sampled_from(self.written))
        a = data.draw(hs.integers(0, n - 1))
        b = data.draw(hs.integers(a + 1, n))
        assert self.stack.view_read(off + a, b - a) == bytes(self.model.view[off + a : off + b])

    @rule(data=hs.data())
    def view_read(self, data):
        off, n = data.draw(ranges(self.size))
        assert self.stack.view_read(off, n) == bytes(self.model.view[off : off + n])

    @rule()
    @precondition(lambda self: not self.model.failed_over)
    def checkpoint(self):
        self.stack.checkpoint()
        self.model.checkpoint()
        assert self.stack.hidden.used_bytes == 0 and self.stack.active.used_bytes == 0

    @rule(data=hs.data(), window_blocks=hs.integers(1, 4), window_span=hs.integers(1, 16))
    @precondition(lambda self: not self.model.failed_over)
    def failover(self, data, window_blocks, window_span):
        # Secondary writes land while windows are copied, as the node lets
        # them: before the copy, after it, or after the window is done; a
        # write that touches a block being copied waits until it is done.
        windows = self.stack.commit_windows(max_bytes=BS * window_blocks, max_span=BS * window_span)
        for i, w in enumerate(windows):
            assert w.held.count() <= window_blocks and w.end - w.first <= window_span
            # (a write may give active blocks to commit: a few, so that the commit ends)
            when = data.draw(hs.sampled_from(["none", "before copy", "after copy", "after done"])) if i < 6 else "none"
            if data.draw(hs.booleans()):
                off, n = data.draw(ranges(self.size))
            else:  # from inside the window to past its end
                off = data.draw(hs.integers(w.first * BS, min(w.end * BS, self.size) - 1))
                n = min(data.draw(hs.integers(1, 4 * BS)), self.size - off)
            buf = self._data(n)
            if when != "none" and w.touches(*self.stack.geometry.blocks(off, n)):
                when = "after done"
            if when == "before copy":
                self._view_write(buf, off)
            self.stack.commit_copy(w)
            if when == "after copy":
                self._view_write(buf, off)
            self.stack.commit_done(w)
            if when == "after done":
                self._view_write(buf, off)
            assert self.stack.view_read(0, self.size) == bytes(self.model.view)
        self.stack.finish_commit()
        self.model.failover()

    @invariant()
    def agrees(self):
        if not hasattr(self, "stack"):
            return
        assert self.stack.view_read(0, self.size) == bytes(self.model.view)
        assert self.stack.replica_read(0, self.size) == bytes(self.model.replica)
        if self.model.failed_over:
            with open(self.stack.replica.path, "rb") as f:
                assert f.read() == bytes(self.model.view)


TestStack = StackMachine.TestCase
TestStack.settings = settings(max_examples=150, stateful_step_count=30, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])


def test_hidden_holds_only_what_the_primary_overwrote(tmp_path):
    """Copy-before-write works at the block grain: 4 KiB writes into a 4 KiB
    grain stack cost 4 KiB each in the hidden overlay (QEMU: 64 KiB)."""
    size = 8 << 20
    path = str(tmp_path / "r.img")
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    stack = SecondaryStack(RawImage.open(path), path + ".h", path + ".a", 4096)
    for i in range(0, 256):
        stack.primary_write(os.urandom(4096), (i * 7919 % 2048) * 4096)
    written = len({i * 7919 % 2048 for i in range(256)}) * 4096
    assert stack.hidden.used_bytes == written
    assert os.stat(path + ".h").st_blocks * 512 <= 1.1 * written
    stack.close()


def test_cbw_of_a_hole_copies_nothing(tmp_path):
    stack = make_stack(str(tmp_path), 1 << 20)
    stack.primary_write(b"x" * 100_000, 5000)
    assert stack.hidden.used_bytes > 0
    assert os.stat(stack.hidden.path).st_blocks == 0  # holes are taken over, not copied
    assert stack.view_read(0, 1 << 20) == bytes(1 << 20)
    stack.close()


@given(off=hs.integers(-5, 5000), n=hs.integers(-1, 5000))
@settings(max_examples=100, deadline=None)
def test_out_of_range_is_refused_and_changes_nothing(tmp_path_factory, off, n):
    size = 4096 + 100
    stack = make_stack(str(tmp_path_factory.mktemp("oor")), size, b"\1" * size)
    inside = off >= 0 and n >= 0 and off + n <= size
    inside_write = off >= 0 and off + max(n, 0) <= size  # a write's length is its buffer's
    for op, ok in ((lambda: stack.view_write(b"\2" * max(n, 0), off), inside_write),
                   (lambda: stack.primary_write(b"\3" * max(n, 0), off), inside_write),
                   (lambda: stack.view_read(off, n), inside)):
        if ok:
            op()
        else:
            with pytest.raises(OutOfRange):
                op()
    if not inside_write:
        assert stack.view_read(0, size) == b"\1" * size
        assert stack.replica_read(0, size) == b"\1" * size
    stack.close()


def test_geometry():
    g = Geometry(10_000, 4096)
    assert g.nblocks == 3
    assert g.blocks(0, 1) == (0, 1)
    assert g.blocks(4095, 2) == (0, 2)
    assert g.inner_blocks(1, 8192) == (1, 2)
    assert g.inner_blocks(8192, 1808) == (2, 3)  # the short last block counts as covered
    assert g.byte_range(2, 3) == (8192, 1808)
    with pytest.raises(Exception):
        Geometry(100, 1000)


def test_overlay_files_are_reused_and_stale_blocks_never_show(tmp_path):
    """Checkpoint only clears bitmaps: the files keep old bytes.  A block the
    hidden overlay takes over from a hole must read as zeros, not as what an
    earlier epoch left in the file."""
    BS = 4096  # the file system's grain: punched blocks become holes
    size = 64 * BS
    stack = make_stack(str(tmp_path), size, b"\7" * size, bs=BS)
    stack.primary_write(b"\1" * BS, 5 * BS)  # hidden[5] <- 7s
    stack.checkpoint()
    stack.primary_zero(5 * BS, BS)  # hidden[5] <- 1s, replica[5] a hole
    stack.checkpoint()
    assert os.stat(stack.hidden.path).st_blocks > 0  # the file kept its bytes
    stack.primary_write(b"\2" * BS, 5 * BS)  # takes the hole over without copying
    assert stack.view_read(5 * BS, BS) == bytes(BS)
    stack.view_write(b"\3", 5 * BS + 7)  # the active fill reads through hidden
    assert stack.view_read(5 * BS, BS) == bytes(7) + b"\3" + bytes(BS - 8)
    stack.close()
    # A restart reuses the files: a new stack over them starts empty.
    again = SecondaryStack(RawImage.open(stack.replica.path), stack.hidden.path, stack.active.path, BS)
    assert again.hidden.used_bytes == 0 and again.active.used_bytes == 0
    assert again.view_read(0, size) == again.replica_read(0, size)
    again.close()


def test_view_read_layer_precedence(tmp_path):
    """Blocks held by both overlays read from active; a read inside one layer
    (the one-pread fast paths) and a read across layers agree."""
    orig = bytes(range(256)) * (4 * BS // 256)
    stack = make_stack(str(tmp_path), 4 * BS, orig)
    try:
        stack.primary_write(b"P" * (4 * BS), 0)  # hidden keeps the original four blocks
        stack.view_write(b"A" * BS, BS)  # block 1: in both overlays, active wins
        stack.view_write(b"B" * 10, 3 * BS + 5)  # block 3: partial, filled from hidden
        want = bytearray(orig)
        want[BS : 2 * BS] = b"A" * BS
        want[3 * BS + 5 : 3 * BS + 15] = b"B" * 10
        assert stack.view_read(BS, BS) == b"A" * BS  # active holds it all
        assert stack.view_read(0, BS) == orig[:BS]  # hidden holds it all
        assert stack.view_read(BS - 7, 14) == bytes(want[BS - 7 : BS + 7])  # across layers
        assert stack.view_read(0, 4 * BS) == bytes(want)
        assert stack.view_read(3 * BS, BS) == bytes(want[3 * BS :])
        stack.checkpoint()
        assert stack.view_read(0, 4 * BS) == b"P" * (4 * BS)
    finally:
        stack.close()


@pytest.mark.parametrize("length", [1, 4096, WRITE_PIECE - 1, WRITE_PIECE, WRITE_PIECE + 1, 5 * WRITE_PIECE + 513, 1 << 20])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_big_writes_go_down_in_pieces_and_land_whole(tmp_path, monkeypatch, length, kind):
    """RawImage.pwrite caps each syscall at WRITE_PIECE (so the page cache
    never builds folios bigger than that from our writes) and still writes
    every byte, at unaligned offsets and after a short write."""
    size = 2 << 20
    img = RawImage.open(str(tmp_path / "img"), size)
    data = os.urandom(length)
    offset = 777
    calls = []
    real_pwrite = os.pwrite

    def recording_pwrite(fd, buf, off):
        calls.append(len(buf))
        if len(calls) == 2 and len(buf) > 1:  # the kernel may write less than asked
            return real_pwrite(fd, memoryview(buf)[: len(buf) // 2], off)
        return real_pwrite(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    img.pwrite(kind(data), offset)
    monkeypatch.undo()
    assert max(calls) <= WRITE_PIECE
    assert sum(calls) >= length
    assert len(calls) >= -(-length // WRITE_PIECE)
    assert img.pread(offset, length) == data
    assert img.pread(0, offset) == bytes(offset)
    assert img.pread(offset + length, size - offset - length) == bytes(size - offset - length)
    img.close()


def test_a_write_that_makes_no_progress_fails_instead_of_spinning(tmp_path, monkeypatch):
    img = RawImage.open(str(tmp_path / "img"), 1 << 20)
    real_pwrite = os.pwrite
    calls = []

    def stuck_pwrite(fd, buf, off):
        calls.append(len(buf))
        return real_pwrite(fd, buf, off) if len(calls) == 1 else 0

    monkeypatch.setattr(os, "pwrite", stuck_pwrite)
    with pytest.raises(IOFailure) as e:
        img.pwrite(bytes(3 * WRITE_PIECE), 0)
    monkeypatch.undo()
    assert len(calls) == 2
    assert e.value.errno == errno.EIO and "no progress" in str(e.value)
    img.close()


KPF_COMPOUND_TAIL = 1 << 16  # /proc/kpageflags: a page inside a folio, not its first


def _folios(path: str, offset: int, length: int) -> int:
    """How many page-cache folios hold [offset, offset+length) of `path`
    (page aligned, all of it cached), as the kernel's page flags say: each
    page is mapped, its frame looked up in /proc/self/pagemap, and every
    page that is not a large folio's tail starts a folio."""
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, offset + length)  # shared, never written
    finally:
        os.close(fd)
    try:
        for off in range(offset, offset + length, page):
            m[off]  # map it: its frame shows in pagemap
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))  # the view dies here: m can close
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            entries = os.pread(pm.fileno(), 8 * (length // page), 8 * ((addr + offset) // page))
            starts = 0
            for (entry,) in struct.iter_unpack("<Q", entries):
                pfn = entry & ((1 << 55) - 1)
                if not entry >> 63 or not pfn:  # not mapped, or frames hidden from us
                    pytest.skip("page frames are not visible here (needs root)")
                (flags,) = struct.unpack("<Q", os.pread(kf.fileno(), 8, 8 * pfn))
                starts += not flags & KPF_COMPOUND_TAIL
        return starts
    finally:
        m.close()


def _drop_all(img) -> None:
    img.fsync()
    os.posix_fadvise(img.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def test_a_large_write_over_scattered_small_folios_gets_large_ones(tmp_path):
    """The page cache a guest's 4 KiB writes leave (every 4th page of 4 MiB
    here, written back) would keep a later 1 MiB write in folios of one or
    two pages (0.48-0.64 ms/MiB of system time, against 0.27-0.41:
    tools/folio_cost.py --rewrite).  RawImage.pwrite drops those clean
    pages first, and the write then makes folios of up to WRITE_PIECE, as
    in a range nothing cached.  Counted by the kernel's page flags."""
    img = RawImage.open(str(tmp_path / "img"), 8 << 20)
    if cachestat(img.fd, 0, 0) is None:
        pytest.skip("no cachestat(2) on this kernel (before Linux 6.5)")
    region, pages = 4 << 20, (4 << 20) // mmap.PAGESIZE
    img.pwrite(os.urandom(region), 0)
    if _folios(img.path, 0, region) > pages // 8:
        pytest.skip("this file system's page cache makes no large folios")
    _drop_all(img)
    for off in range(0, region, 4 * mmap.PAGESIZE):
        os.pwrite(img.fd, b"s" * mmap.PAGESIZE, off)
    img.fsync()
    assert cachestat(img.fd, 0, region) == (pages // 4, 0, 0)  # what the write meets
    data = os.urandom(region)
    for off in range(0, region, 1 << 20):
        img.pwrite(data[off : off + (1 << 20)], off)
    assert img.cache_drops == 4
    assert _folios(img.path, 0, region) <= pages // 8, "the write went into the small folios"
    assert img.pread(0, region) == data
    img.close()


def test_only_clean_ranges_cached_in_part_are_dropped_before_a_large_write(tmp_path):
    """The cases _drop_fragments leaves alone: a range cached in full (a
    drop would cost new memory: 0.14 -> 0.25 ms/MiB), one with dirty pages
    (a drop would start their write-back), one nothing cached, a write
    smaller than REFOLIO_MIN, and the unaligned ends of a write (only its
    whole pages go).  Every write lands either way."""
    mib = 1 << 20
    img = RawImage.open(str(tmp_path / "img"), 8 * mib)
    if cachestat(img.fd, 0, 0) is None:
        pytest.skip("no cachestat(2) on this kernel (before Linux 6.5)")
    model = bytearray(8 * mib)

    def write(data, off):
        img.pwrite(data, off)
        model[off : off + len(data)] = data

    def scatter(lo, hi):  # the 4 KiB writes that leave a range cached in part
        for off in range(lo, hi, 4 * mmap.PAGESIZE):
            os.pwrite(img.fd, b"s" * 100, off)
            model[off : off + 100] = b"s" * 100

    write(os.urandom(mib), 0)
    img.fsync()
    write(os.urandom(mib), 0)  # cached in full, clean
    assert img.cache_drops == 0
    write(os.urandom(mib), 2 * mib)  # nothing cached
    assert img.cache_drops == 0
    _drop_all(img)
    scatter(0, mib)  # cached in part, dirty
    write(os.urandom(mib), 0)
    assert img.cache_drops == 0
    _drop_all(img)
    scatter(mib, 2 * mib)
    img.fsync()  # cached in part, clean
    write(os.urandom(REFOLIO_MIN - mmap.PAGESIZE), mib)  # too small
    assert img.cache_drops == 0
    img.fsync()
    write(os.urandom(mib + 200), mib - 100)  # the one to drop: its whole pages only
    assert img.cache_drops == 1
    cached, dirty, _ = cachestat(img.fd, 0, 8 * mib)
    assert dirty == mib // mmap.PAGESIZE + 2  # its pages, and the two it shares with neighbours
    assert img.pread(0, 8 * mib) == model
    img.close()


def _resident(path: str) -> int:
    """Bytes of `path` in the page cache, as the kernel reports them (fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def _direct_io_here(tmp_path) -> bool:
    try:
        fd = os.open(str(tmp_path / "probe"), os.O_RDWR | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


needs_fincore = pytest.mark.skipif(not shutil.which("fincore"), reason="needs fincore (util-linux)")


@needs_fincore
@pytest.mark.parametrize("offset,length,direct", [
    (0, DIRECT_MIN, True),                      # the smallest direct write
    (8192, (3 << 20) + 4096, True),             # more than one bounce buffer
    (4096, DIRECT_MIN - 4096, False),           # small: a page-cache write costs less
    (512, 1 << 20, False),                      # offset not aligned
    (0, (1 << 20) + 100, False),                # length not aligned
])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_direct_writes_go_past_the_page_cache_when_large_and_aligned(tmp_path, offset, length, direct, kind):
    """pwrite(direct=True) is what an O_DIRECT opener of disk.img gets: large
    aligned writes leave nothing in the page cache (the kernel's count, not
    ours), the rest is written through it, and every byte lands."""
    if not _direct_io_here(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    size = 8 << 20
    img = RawImage.open(str(tmp_path / "img"), size)
    data = os.urandom(length)
    img.pwrite(kind(data), offset, direct=True)
    assert img.direct_bytes == (length if direct else 0)
    cached = _resident(img.path)
    assert (cached == 0) if direct else (cached >= length - 4096), cached
    assert img.pread(offset, length) == data
    assert img.pread(0, offset) == bytes(offset)
    assert img.pread(offset + length, size - offset - length) == bytes(size - offset - length)
    img.pwrite(b"b" * DIRECT_MIN, 1 << 20)  # direct=False: through the page cache
    assert img.direct_bytes == (length if direct else 0) and _resident(img.path) > cached
    img.close()


@pytest.mark.parametrize("fail_at", [0, 1])
def test_a_direct_write_that_fails_is_written_through_the_page_cache(tmp_path, monkeypatch, fail_at):
    """O_DIRECT failing (ENOSPC here) on the first bounce-buffer piece or a
    later one: the rest goes through the page cache, whose own error would
    be the one reported; nothing is lost and direct stays on."""
    if not _direct_io_here(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    img = RawImage.open(str(tmp_path / "img"), 8 << 20)
    data = os.urandom(3 << 20)
    real_pwrite = os.pwrite
    direct_calls = []

    def pwrite(fd, buf, off):
        if fd == img._direct_fd:
            direct_calls.append(len(buf))
            if len(direct_calls) > fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", pwrite)
    img.pwrite(data, 1 << 20, direct=True)
    monkeypatch.undo()
    assert len(direct_calls) == fail_at + 1
    assert img.direct_bytes == fail_at << 20
    assert img.pread(1 << 20, len(data)) == data
    img.pwrite(data[: 1 << 20], 0, direct=True)
    assert img.direct_bytes == (fail_at + 1) << 20  # still on
    img.close()


def test_a_file_system_without_o_direct_gets_page_cache_writes(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT (at open, or EINVAL at the first
    write): the image stops trying, and every write lands."""
    img = RawImage.open(str(tmp_path / "img"), 4 << 20)
    real_open, real_pwrite = os.open, os.pwrite
    opens = []

    def refusing_open(path, flags, *a):
        if flags & os.O_DIRECT:
            opens.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refusing_open)
    for i in range(2):
        img.pwrite(bytes([i + 1]) * DIRECT_MIN, i * DIRECT_MIN, direct=True)
    monkeypatch.undo()
    assert len(opens) == 1 and img.direct_bytes == 0
    assert img.pread(0, 2 * DIRECT_MIN) == b"\1" * DIRECT_MIN + b"\2" * DIRECT_MIN
    img.close()

    img = RawImage.open(str(tmp_path / "img2"), 4 << 20)
    if not _direct_io_here(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    einvals = []

    def einval_pwrite(fd, buf, off):
        if fd == img._direct_fd:
            einvals.append(off)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, buf, off)

    monkeypatch.setattr(os, "pwrite", einval_pwrite)
    for i in range(2):
        img.pwrite(bytes([i + 3]) * DIRECT_MIN, i * DIRECT_MIN, direct=True)
    monkeypatch.undo()
    assert einvals == [0] and img.direct_bytes == 0 and img._direct_fd == -1
    assert img.pread(0, 2 * DIRECT_MIN) == b"\3" * DIRECT_MIN + b"\4" * DIRECT_MIN
    img.close()


def test_overlays_on_another_file_system_still_copy_before_write_and_commit(tmp_path):
    """`--state-dir` may put the overlays on another file system than the
    replica (here tmpfs): copy_file_range refuses that (EXDEV since Linux
    5.19), and the copies fall back to reading and writing."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at /dev/shm")
    other = os.path.join(shm, f"repdisk-test-{os.getpid()}")
    os.mkdir(other)
    try:
        size = 64 * BS + 100  # a short last block
        initial = bytes(range(256)) * (size // 256) + b"\xee" * (size % 256)
        path = os.path.join(tmp_path, "replica.img")
        with open(path, "wb") as f:
            f.write(initial)
        stack = SecondaryStack(RawImage.open(path, size), os.path.join(other, "h"), os.path.join(other, "a"), BS)
        view = bytearray(initial)
        stack.primary_write(b"P" * (3 * BS), 5 * BS)  # copy before write, across file systems
        stack.primary_write(b"Q" * 150, size - 150)
        stack.view_write(b"V" * 700, 20 * BS + 3)
        view[20 * BS + 3 : 20 * BS + 703] = b"V" * 700
        assert stack.view_read(0, size) == bytes(view)
        for w in stack.commit_windows(max_bytes=8 * BS):
            stack.commit_copy(w)
            stack.commit_done(w)
        stack.finish_commit()
        with open(path, "rb") as f:
            assert f.read() == bytes(view)
        assert stack.view_read(0, size) == bytes(view)
    finally:
        shutil.rmtree(other)


def test_a_view_fsync_flushes_the_replica_from_the_failover_on_and_nothing_before(tmp_path):
    """While replicating, the view's fsync writes nothing back: the overlays
    are dropped at restart anyway.  While the commit runs, part of the view
    is in the replica already, and after it all of it: the VM's fsync
    flushes the replica."""
    stack = make_stack(str(tmp_path), 16 * BS)
    stack.view_write(b"a" * BS, 0)
    stack.primary_write(b"p" * BS, 4 * BS)
    calls = []
    for name, f in (("replica", stack.replica), ("active", stack.active.file), ("hidden", stack.hidden.file)):
        f.fsync = (lambda name, real: lambda: (calls.append((name, stack.committing)), real()))(name, f.fsync)
    stack.flush_view()
    assert calls == []  # replicating: nothing that would outlive the node
    w = next(stack.commit_windows())
    stack.commit_copy(w)
    stack.commit_done(w)
    stack.flush_view()
    assert calls == [("replica", True)]
    for w in stack.commit_windows():
        stack.commit_copy(w)
        stack.commit_done(w)
    stack.finish_commit()
    stack.flush_view()
    assert calls[-1] == ("replica", False)


def test_commit_windows_take_megabytes_of_scattered_blocks_not_a_span(tmp_path):
    """A window takes up to max_bytes of the blocks its layer holds, however
    far apart (the failover of scattered 4 KiB writes copies in few, large
    windows), within max_span of address space."""

    def windows(max_bytes, max_span):
        stack = make_stack(str(tmp_path), 1024 * BS)
        for b in range(0, 1024, 16):  # 64 scattered blocks
            stack.view_write(b"s" * BS, b * BS)
        seen = []
        for w in stack.commit_windows(max_bytes=max_bytes, max_span=max_span):
            seen.append((w.first, w.end, w.held.count()))
            stack.commit_copy(w)
            stack.commit_done(w)
        stack.finish_commit()
        stack.close()
        return seen

    # 10 blocks per window (the last: what is left), each ending at its 10th
    seen = windows(10 * BS, 512 * BS)
    assert [n for _, _, n in seen] == [10] * 6 + [4]
    assert seen[0] == (0, 145, 10) and seen[3] == (480, 625, 10)
    # or at max_span
    seen = windows(100 * BS, 64 * BS)
    assert seen[0] == (0, 64, 4) and len(seen) == 16


def test_a_write_landing_in_a_window_where_nothing_is_copied_stays_in_the_view(tmp_path):
    """A write that touches no block the window copies goes ahead while the
    window is copied.  When it also covers a block active holds beyond the
    window, it goes to active, setting bits inside the window: those were
    not copied, so the window must not drop them when it is done."""
    stack = make_stack(str(tmp_path), 16 * BS, b"r" * (16 * BS))
    stack.view_write(b"a" * BS, 0)
    stack.view_write(b"b" * BS, 5 * BS)
    windows = stack.commit_windows(max_bytes=2 * BS, max_span=3 * BS)
    w = next(windows)
    assert (w.layer, w.first, w.end) == (stack.active, 0, 3)
    b0, b1 = stack.geometry.blocks(2 * BS, 4 * BS)
    assert not w.touches(b0, b1)  # the node lets it through
    stack.view_write(b"w" * (4 * BS), 2 * BS)  # blocks 2..5: into active, as block 5 is there
    stack.commit_copy(w)
    stack.commit_done(w)
    for w in windows:
        stack.commit_copy(w)
        stack.commit_done(w)
    stack.finish_commit()
    expect = b"a" * BS + b"r" * BS + b"w" * (4 * BS) + b"r" * (10 * BS)
    assert stack.view_read(0, 16 * BS) == expect
    with open(stack.replica.path, "rb") as f:
        assert f.read() == expect


def test_a_failover_after_an_initial_sync_keeps_the_replica_sparse(tmp_path):
    """The initial sync over a sparse replica makes the hidden overlay take
    over holes (nothing to copy).  Committing them must punch holes in the
    replica, not write zeros that allocate the whole disk."""
    size, MiB = 32 << 20, 1 << 20
    initial = bytes(12 * MiB) + b"r" * MiB
    stack = make_stack(str(tmp_path), size, initial)
    stack.replica.punch(0, 12 * MiB)  # sparse but for [12, 13) MiB
    stack.primary_write(b"p" * (5 * MiB), 8 * MiB)  # the sync's data: hidden takes over holes, then r
    stack.view_write(b"v" * BS, 0)
    assert stack.hidden.used_bytes == 5 * MiB
    for w in stack.commit_windows():
        stack.commit_copy(w)
        stack.commit_done(w)
    stack.finish_commit()
    expect = b"v" * BS + bytes(12 * MiB - BS) + b"r" * MiB + bytes(size - 13 * MiB)
    assert stack.view_read(0, size) == expect
    with open(stack.replica.path, "rb") as f:
        assert f.read() == expect
    allocated = os.stat(stack.replica.path).st_blocks * 512
    assert allocated < 2 * MiB, f"{allocated} bytes allocated in the replica"


def test_protect_soon_starts_reading_what_the_copy_before_write_will_copy(tmp_path):
    """The NBD server hints the writes it has received but not applied yet:
    the replica's blocks their copy-before-write will copy are read into the
    page cache in the background.  Blocks an overlay holds already, and a
    standalone stack, read nothing: checked once a later hint's read has
    landed (the reads are asynchronous; nothing is timed)."""
    mib = 1 << 20
    stack = make_stack(str(tmp_path), 8 * mib, os.urandom(8 * mib), bs=4096)
    img = stack.replica
    if cachestat(img.fd, 0, 0) is None:
        pytest.skip("no cachestat(2) on this kernel (before Linux 6.5)")

    def cached(offset, length):
        return cachestat(img.fd, offset, length)[0]

    def read_in(offset, pages):
        wait_until(lambda: cached(offset, pages * 4096) == pages, 10, f"{pages} pages at {offset} read in")

    os.fsync(img.fd)
    stack.primary_write(b"\x01" * 4096, 2 * mib)  # block 512 now in the hidden overlay
    stack.view_write(b"\x02" * 4096, 3 * mib)  # block 768 in the active one
    before = stack.view_read(0, 8 * mib), stack.replica_read(0, 8 * mib)
    os.fsync(img.fd)
    os.posix_fadvise(img.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert cached(0, 0) == 0

    stack.protect_soon(2 * mib, 4096)
    stack.protect_soon(3 * mib, 4096)
    stack.protect_soon(0, 0)
    stack.protect_soon(mib + 100, 3 * 4096)  # unaligned: the four blocks it touches
    read_in(mib, 4)
    assert cached(0, 0) == 4  # and nothing for the held blocks
    stack.protect_soon(2 * mib - 4096, 2 * 4096)  # one block held, one not: that one is read
    read_in(2 * mib - 4096, 1)
    assert cached(2 * mib, 4096) == 0

    assert (stack.view_read(0, 8 * mib), stack.replica_read(0, 8 * mib)) == before  # only hints

    os.posix_fadvise(img.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    stack.standalone = True
    stack.protect_soon(5 * mib, 4096)
    stack.standalone = False
    stack.protect_soon(6 * mib, 4096)
    read_in(6 * mib, 1)
    assert cached(0, 0) == 1  # the standalone hint read nothing
