"""Positional I/O on a raw image file: no shared file offset, one syscall per
contiguous range.  OSErrors become IOFailure with the operation named."""

import errno
import mmap
import os
import re
import threading

from .errors import ImageError, IOFailure

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

try:  # os.fallocate has no flags argument; use libc for punch hole
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
except OSError:  # pragma: no cover
    _libc = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length); reads of it return zeros afterwards.
    Unaligned edges are zeroed by the file system."""
    if length <= 0:
        return
    if _libc is not None and _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno() if _libc is not None else errno.EOPNOTSUPP
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    # The file system cannot punch holes: write zeros instead.
    zeros = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, memoryview(zeros)[: min(len(zeros), end - offset)], offset)
        offset += n


_SIZE = re.compile(r"\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'10G', '512M', '4096', '1T', '64KiB' -> bytes (binary units)."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ImageError(f"cannot read size {text!r}: use a number of bytes or a suffix K, M, G, T")
    value = int(m.group(1)) << (10 * " KMGTP".index(m.group(2).upper() or " "))
    if value <= 0:
        raise ImageError(f"size {text!r} must be positive")
    return value


# The page cache sizes a folio after the write that creates it: on kernels whose
# ext4 uses large folios (6.18 here) one 1 MiB pwrite makes a 1 MiB folio,
# and every later 4 KiB write into it costs ~20 us of system time against ~4-5 us
# in 64-128 KiB folios (and dirties, so writes back, the whole folio).  A disk
# image takes big sequential writes and then small random ones into the same
# place all the time, so big writes go down in pieces of this size: 8 syscalls
# per MiB instead of 1, a few microseconds against the copy's hundreds.
# tools/folio_cost.py measures it.
WRITE_PIECE = 128 << 10

# Writes that bypass the page cache (`pwrite(direct=True)`: the VM opened
# disk.img with O_DIRECT, as QEMU's cache=none does).  Only large ones: a new
# page-cache MiB costs this machine 0.4-4 ms of system time, depending on
# whether the host took the free memory back (tools/first_touch.py), and an
# O_DIRECT MiB about 1 ms of waiting for the disk; a 4 KiB write costs ~5 us
# through the page cache and ~55 us direct.  O_DIRECT needs the file offset,
# the length and the buffer's address aligned: DIRECT_ALIGN for the first two
# (ext4's logical block size is at most 4 KiB), a page-aligned bounce buffer
# per thread for the last.
DIRECT_MIN = 64 << 10
DIRECT_ALIGN = 4096
_DIRECT_BOUNCE = 1 << 20
_bounce = threading.local()


def _bounce_buffer(n: int) -> memoryview:
    """A page-aligned buffer of at least n bytes, this thread's, reused."""
    buf = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < n:
        buf = mmap.mmap(-1, max(n, _DIRECT_BOUNCE))
        _bounce.buf = buf
    return memoryview(buf)[:n]


# Write-behind (RawImage.set_write_behind): writes of at least this size count
# as a stream (a VM writing a big file, an initial sync, the primary's writes of
# it arriving at the secondary); every `--write-behind` bytes of them, their
# span goes to the kernel's write-back.  4 KiB random writes never do: left in
# the page cache they may be overwritten, and cost no disk write until a flush.
WRITE_BEHIND_MIN = 64 << 10

# sync_file_range(2), which the os module lacks: start writing a range back
# without waiting for it.
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2

# A large write into a range the page cache holds only in part, and clean,
# first drops that part (RawImage._drop_fragments).  What such a range holds
# is mostly what small random writes or reads left: 4 KiB folios, scattered.
# Written over, they stay 4 KiB folios, and the gaps between them get folios
# no bigger than the gaps, so the large write goes through the page cache a
# few KiB at a time: on this machine (tools/folio_cost.py --rewrite) 0.49-0.58
# ms per MiB, against 0.25-0.41 after dropping them first.  A range cached in
# full (written or read in big pieces, or every page of it written) is left
# alone: dropping it costs more than it saves (0.14 -> 0.25, 0.39 -> 0.63
# ms/MiB), as new memory costs more than overwriting.  So is a
# range with dirty pages or pages under write-back: dropping would start
# their write-back and make the kernel drain every CPU's page lists.
REFOLIO_MIN = 64 << 10

# cachestat(2), Linux 6.5, which the os module lacks; the number is the same
# on x86_64, arm64 and the other architectures of the table new system calls
# share since 5.1 (alpha's differs).
_NR_CACHESTAT = 451


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_syscall = getattr(_libc, "syscall", None)
if _syscall is not None:
    _syscall.restype = ctypes.c_long
_cachestat_ok = _syscall is not None
_PAGE = mmap.PAGESIZE
_cachestat_args = threading.local()


def cachestat(fd: int, offset: int, length: int):
    """(cached, dirty, writeback) pages of [offset, offset+length) (length
    0: to the end of the file), or None where the kernel has no cachestat
    (before 6.5: those kernels' ext4 makes no large folios either, so
    nothing here needs it).  Other failures raise OSError."""
    global _cachestat_ok
    if not _cachestat_ok:
        return None
    try:  # a pair of structures per thread: 2.4 us a call instead of 3.1
        rng, st, args = _cachestat_args.v
    except AttributeError:
        rng, st = _CacheRange(), _CacheStat()
        args = ctypes.byref(rng), ctypes.byref(st)
        _cachestat_args.v = rng, st, args
    rng.off, rng.len = offset, length
    if _syscall(_NR_CACHESTAT, fd, *args, 0) != 0:
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err))
        _cachestat_ok = False
        return None
    return st.nr_cache, st.nr_dirty, st.nr_writeback


COPY_PIECE = 1 << 20  # bytes per pread/pwrite when copy_file_range cannot copy
# copy_file_range cannot copy between these two files (another file system,
# a file system without it): copy with pread/pwrite.
_NO_COPY_RANGE = (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RawImage:
    """A raw image file opened read-write."""

    def __init__(self, path: str, fd: int, size: int):
        self.path, self.fd, self.size = path, fd, size
        # A second descriptor of the same file with O_DIRECT, opened at the
        # first direct write; _direct_ok False once the file system refused it.
        self._direct_fd = -1
        self._direct_ok = True
        self.direct_bytes = 0  # written with O_DIRECT (status, tests)
        self.cache_drops = 0  # ranges _drop_fragments dropped (status, tests)
        # Destinations copy_file_range refused: copy_to reads and writes instead.
        self._copy_by_reading: set[str] = set()
        # set_write_behind: the span and bytes of large writes not handed over yet.
        self._behind = None
        self._behind_every = 0
        self._behind_lo = self._behind_hi = self._behind_bytes = 0

    def set_write_behind(self, every: int, start) -> None:
        """After each `every` bytes written through the page cache in writes
        of at least WRITE_BEHIND_MIN, call start(offset, length) with the span
        they covered: the caller starts its write-back (node.writebehind, a
        thread), so that an fsync after a stream of writes has only its tail
        left to write.  every=0 or start=None: off."""
        self._behind = start if every > 0 else None
        self._behind_every = every if self._behind is not None else 0
        self._behind_bytes = 0

    @property
    def write_behind_every(self) -> int:
        return self._behind_every

    def _wrote_large(self, offset: int, length: int) -> None:
        end = offset + length
        if self._behind_bytes:
            if offset < self._behind_lo:
                self._behind_lo = offset
            if end > self._behind_hi:
                self._behind_hi = end
        else:
            self._behind_lo, self._behind_hi = offset, end
        self._behind_bytes += length
        if self._behind_bytes >= self._behind_every:
            self._behind_bytes = 0
            self._behind(self._behind_lo, self._behind_hi - self._behind_lo)

    @classmethod
    def open(cls, path: str, size: int | None = None) -> "RawImage":
        """Open `path`; create it sparse when it is missing and `size` is given.
        An existing image of another size than `size` is refused untouched."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if size is None:
                raise ImageError(f"{path}: no such image; give --size to create it") from None
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                os.ftruncate(fd, size)
            except OSError as e:
                raise ImageError(f"{path}: cannot create image: {e.strerror}") from None
            return cls(path, fd, size)
        except OSError as e:
            raise ImageError(f"{path}: cannot open image: {e.strerror}") from None
        actual = os.lseek(fd, 0, os.SEEK_END)
        if size is not None and actual != size:
            os.close(fd)
            raise ImageError(f"{path}: image is {actual} bytes but --size asks for {size}; refusing to change it")
        if actual == 0:
            os.close(fd)
            raise ImageError(f"{path}: image is empty (0 bytes)")
        return cls(path, fd, actual)

    def close(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def readinto(self, buf, offset: int) -> None:
        """Fill `buf` (a writable buffer) from `offset`; short reads past EOF are zeros."""
        mv = memoryview(buf)
        done = 0
        try:
            while done < len(mv):
                n = os.preadv(self.fd, [mv[done:]], offset + done)
                if n == 0:
                    mv[done:] = bytes(len(mv) - done)
                    break
                done += n
        except OSError as e:
            raise IOFailure(f"read {self.path} at {offset}", e) from None

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise IOFailure(f"read {self.path} at {offset}", e) from None
        if len(data) < length:  # only at a concurrent truncate or EOF
            buf = bytearray(data)
            buf.extend(bytes(length - len(data)))
            return bytes(buf)
        return data

    def pwrite(self, buf, offset: int, direct: bool = False) -> None:
        """Write all of `buf` at `offset`, in pieces of at most WRITE_PIECE
        bytes (see there).  direct=True: past the page cache when the write is
        at least DIRECT_MIN bytes, aligned, and the file system takes O_DIRECT
        (else as any write)."""
        total = len(buf)
        if direct and total >= DIRECT_MIN and not (offset | total) & (DIRECT_ALIGN - 1) and self._pwrite_direct(buf, offset):
            return
        if total >= REFOLIO_MIN:
            self._drop_fragments(offset, total)
        n = 0
        try:
            if total <= WRITE_PIECE:  # most writes: one syscall, no view
                n = os.pwrite(self.fd, buf, offset)
            if n < total:
                mv = memoryview(buf)
                while n < total:
                    k = os.pwrite(self.fd, mv[n : n + WRITE_PIECE], offset + n)
                    if k <= 0:  # never for a regular file; do not spin on it
                        raise OSError(errno.EIO, f"write made no progress after {n} bytes")
                    n += k
        except OSError as e:
            raise IOFailure(f"write {self.path} at {offset}", e) from None
        if total >= WRITE_BEHIND_MIN and self._behind is not None:
            self._wrote_large(offset, total)

    def _drop_fragments(self, offset: int, length: int) -> None:
        """Before a large write: drop the whole pages of its range from the
        page cache when the cache holds some of them, not all, and none
        dirty or under write-back (see REFOLIO_MIN).  Only a hint: the write
        lands the same either way, so errors are ignored."""
        lo = -(-offset // _PAGE) * _PAGE
        hi = (offset + length) // _PAGE * _PAGE
        if hi - lo < REFOLIO_MIN:
            return
        try:
            st = cachestat(self.fd, lo, hi - lo)
            if st is None:
                return
            cached, dirty, writeback = st
            if not (0 < cached < (hi - lo) // _PAGE and not dirty and not writeback):
                return
            os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        except OSError:
            return
        self.cache_drops += 1

    def _pwrite_direct(self, buf, offset: int) -> bool:
        """Write an aligned range with O_DIRECT.  False when nothing was
        written that way (no O_DIRECT here, or the first piece failed): the
        caller then writes it through the page cache, and reports that
        write's failure, if any.  A failure after some pieces writes the
        rest through the page cache here."""
        fd = self._direct_fd
        if fd < 0:
            if not self._direct_ok:
                return False
            try:  # the same open file, not the path (it may have been renamed)
                fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:  # tmpfs, for one
                self._direct_ok = False
                return False
            self._direct_fd = fd
        total = len(buf)
        bounce = _bounce_buffer(min(total, _DIRECT_BOUNCE))
        src = memoryview(buf).cast("B")
        n = 0
        try:
            while n < total:
                k = min(total - n, len(bounce))
                bounce[:k] = src[n : n + k]
                w = os.pwrite(fd, bounce[:k], offset + n)
                if w <= 0:
                    break
                n += w
                if w & (DIRECT_ALIGN - 1):  # short: the rest is not aligned any more
                    break
        except OSError as e:
            if e.errno == errno.EINVAL and not n and not self.direct_bytes:
                self._direct_ok = False  # opened, but the file system refuses the writes
                self._direct_fd = -1
                os.close(fd)
        self.direct_bytes += n
        if not n:
            return False
        if n < total:
            self.pwrite(src[n:], offset + n)
        return True

    def punch(self, offset: int, length: int) -> None:
        try:
            punch_hole(self.fd, offset, length)
        except OSError as e:
            raise IOFailure(f"punch hole in {self.path} at {offset}", e) from None

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise IOFailure(f"fsync {self.path}", e) from None

    def datasync(self) -> None:
        """The data on disk (no timestamps): what the activity log needs."""
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise IOFailure(f"fdatasync {self.path}", e) from None

    def drop_cached(self, offset: int, length: int) -> None:
        """Drop the clean page-cache pages of [offset, offset+length), so that
        the next read sees what the disk holds: after a failed writeback the
        kernel may keep pages it never wrote, marked clean.  Dirty pages stay
        (and are being written back)."""
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise IOFailure(f"dropping cached pages of {self.path} at {offset}", e) from None

    def write_back_soon(self, offset: int, length: int) -> None:
        """Start writing the dirty pages of [offset, offset+length) to disk
        without waiting for them (sync_file_range WRITE), so that a later
        fsync has less left to do.  Only a head start: a write-back error
        is reported by that fsync, so errors here are ignored."""
        if _sync_file_range is not None:
            _sync_file_range(self.fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def read_soon(self, offset: int, length: int) -> None:
        """Start reading [offset, offset+length) into the page cache without
        waiting (POSIX_FADV_WILLNEED): many such calls put many reads in the
        disk's queue at once.  Only a hint: errors are ignored."""
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def copy_to(self, dst: "RawImage", offset: int, length: int) -> None:
        """Copy [offset, offset+length) into `dst` at the same offset
        (copy_file_range; pread/pwrite where the kernel cannot copy between
        the two files, e.g. on two file systems: EXDEV since Linux 5.19)."""
        end = offset + length
        pos = offset
        try:
            while pos < end:
                if dst.path in self._copy_by_reading:
                    n = min(end - pos, COPY_PIECE)
                    dst.pwrite(self.pread(pos, n), pos)  # pread: zeros past our end
                    pos += n
                    continue
                try:
                    n = os.copy_file_range(self.fd, dst.fd, end - pos, pos, pos)
                except OSError as e:
                    if e.errno not in _NO_COPY_RANGE:
                        raise
                    self._copy_by_reading.add(dst.path)
                    continue
                if n == 0:  # source shorter than expected: the rest is zeros
                    dst.punch(pos, end - pos)
                    break
                pos += n
        except OSError as e:
            raise IOFailure(f"copy {self.path} -> {dst.path} at {pos}", e) from None

    def copy_keeping_holes(self, dst: "RawImage", offset: int, length: int, clear=None) -> None:
        """`copy_to`, but what is a hole here is cleared in `dst` with
        `clear(offset, length)` (default: `dst.punch`) instead of zeros
        written there, which would allocate them: an overlay that took over
        holes holds gigabytes of them after an initial sync."""
        clear = dst.punch if clear is None else clear
        pos, end = offset, offset + length
        for a, b in self.data_extents(offset, end):
            if a > pos:
                clear(pos, a - pos)
            self.copy_to(dst, a, b - a)
            pos = b
        if pos < end:
            clear(pos, end - pos)

    def is_hole(self, offset: int, length: int) -> bool:
        """True when [offset, offset+length) holds no data (reads as zeros)."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset
                return True
            return False

    def data_extents(self, offset: int, end: int):
        """Yield (start, stop) of the ranges in [offset, end) that may hold data."""
        pos = offset
        while pos < end:
            try:
                d = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                yield pos, end
                return
            if d >= end:
                return
            try:
                h = os.lseek(self.fd, d, os.SEEK_HOLE)
            except OSError:
                h = end
            yield d, min(h, end)
            pos = h
