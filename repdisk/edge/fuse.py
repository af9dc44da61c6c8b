"""The FUSE front end: a fixed three-inode tree (root, disk.img, control).

Handlers raise only FUSEError: RepdiskError -> its errno, anything else is
logged and reported as EIO (an exception escaping a handler would stop
pyfuse3.main()).  The node behind it provides:

    size                       disk size in bytes
    async disk_read(off, n)    -> bytes
    async disk_write(off, buf, direct)   direct: the opener asked for O_DIRECT
    async disk_fsync()
    status() -> dict           the control file's JSON
    async command(text)        returns once the command has taken effect
"""

import errno
import json
import logging
import os
import stat
import time

import pyfuse3
import trio

from ..core.errors import IOFailure, RepdiskError
from . import fuseloop

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
DISK = ROOT + 1
CONTROL = ROOT + 2
DISK_DIRECT = CONTROL + 1  # the file handle of disk.img opened with O_DIRECT (control's start at 100)
NAMES = {b"disk.img": DISK, b"control": CONTROL}

# st_blksize, the I/O size tools pick by (cmp, cat, cp, stdio buffers).  disk.img
# is direct I/O, so no readahead gathers small reads: at 4096, cmp of a 256 MiB
# disk.img took 7.5 s (64K requests), at 1 MiB (FUSE's largest request) 0.29 s
# (ad-hoc on the 2-core dev machine, idle sync pair, median of 3).
PREFERRED_IO_SIZE = 1 << 20


def fuse_errors(fn):
    """Map every error of a handler to FUSEError: the one errno boundary of FUSE."""

    async def wrapper(*args):
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except RepdiskError as e:
            # the caller's own mistakes (a range past the end, an unknown
            # command) are its to report; a failing disk is the operator's
            log.log(logging.ERROR if isinstance(e, IOFailure) else logging.DEBUG, "%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("unexpected error in FUSE handler %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    wrapper.__name__ = fn.__name__
    return wrapper


class DiskFS(pyfuse3.Operations):
    def __init__(self, node, direct_writes: bool = False):
        """direct_writes: an O_DIRECT opener's writes go past the image's page
        cache (--direct-writes, RawImage.pwrite)."""
        super().__init__()
        self.node = node
        self.direct_writes = direct_writes
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mtime_ns = time.time_ns()
        self._snapshots: dict[int, bytes] = {}  # control fh -> the status it shows
        self._next_fh = 100

    # ---- attributes ------------------------------------------------------------
    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        a.attr_timeout = a.entry_timeout = 300
        a.st_blksize = PREFERRED_IO_SIZE
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif inode == DISK:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = self.node.size
            a.st_blocks = (self.node.size + 511) // 512
        elif inode == CONTROL:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = 0  # generated content, read with direct I/O
            a.attr_timeout = 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != ROOT or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(NAMES[name])

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            if inode == DISK and attr.st_size != self.node.size:
                raise pyfuse3.FUSEError(errno.EPERM)  # the disk has a fixed size
            if inode == ROOT:
                raise pyfuse3.FUSEError(errno.EISDIR)
            # control: O_TRUNC before a command is fine
        return self._attr(inode)

    # ---- directory -------------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        entries = list(NAMES.items())
        for i in range(start_id, len(entries)):
            name, inode = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), i + 1):
                break

    @fuse_errors
    async def releasedir(self, fh):
        pass

    # ---- files -----------------------------------------------------------------
    @fuse_errors
    async def open(self, inode, flags, ctx):
        if inode == DISK:
            # Direct I/O, as QEMU's FUSE export: no second copy of the data in
            # a page cache of disk.img (the image's is the one that counts), one
            # copy less per buffered write, and nothing stale after a checkpoint.
            # With --direct-writes on, an O_DIRECT opener (a hypervisor's
            # cache=none) gets its large writes past the image's page cache
            # too (RawImage.pwrite).
            fh = DISK_DIRECT if self.direct_writes and flags & os.O_DIRECT else DISK
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if inode == CONTROL:
            fh = self._next_fh
            self._next_fh += 1
            if flags & os.O_ACCMODE != os.O_WRONLY:
                status = self.node.status()
                status["fuse"] = fuseloop.statistics()
                status["direct_writes"] = self.direct_writes
                self._snapshots[fh] = (json.dumps(status, indent=2) + "\n").encode()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT else errno.ENOENT)

    @fuse_errors
    async def read(self, fh, off, size):
        if fh == DISK or fh == DISK_DIRECT:
            end = min(off + size, self.node.size)
            if off >= end:
                return b""
            return await self.node.disk_read(off, end - off)
        data = self._snapshots.get(fh, b"")
        return data[off : off + size]

    @fuse_errors
    async def write(self, fh, off, buf):
        if fh == DISK or fh == DISK_DIRECT:
            # As on a block device: a write across the end writes the part
            # inside and returns a short count; one at or past the end fails.
            room = self.node.size - off
            if room <= 0:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            if len(buf) > room:
                buf = buf[:room]
            await self.node.disk_write(off, buf, fh == DISK_DIRECT)
            return len(buf)
        text = bytes(buf).decode("utf-8", "replace").strip()
        await self.node.command(text)
        return len(buf)

    @fuse_errors
    async def fsync(self, fh, datasync):
        if fh == DISK or fh == DISK_DIRECT:
            await self.node.disk_fsync()

    @fuse_errors
    async def flush(self, fh):
        pass

    @fuse_errors
    async def release(self, fh):
        self._snapshots.pop(fh, None)

    @fuse_errors
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.node.size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = 3
        s.f_namemax = 255
        return s


async def invalidate_disk() -> None:
    """Drop the kernel's cached pages of disk.img (after its content changed
    under readers); with direct I/O only private mappings hold any.  Runs in
    a thread: the kernel may need our handlers while it invalidates."""
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, DISK, False)
    except FileNotFoundError:
        pass  # the kernel holds nothing of disk.img: nothing to drop


def fuse_device_fd() -> int | None:
    """The descriptor of this process's /dev/fuse (pyfuse3 keeps it private),
    or None if there is not exactly one."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor)
    return found[0] if len(found) == 1 else None


def mount_options(fsname: str) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.add(f"fsname={fsname}")
    opts.add("allow_other")
    opts.discard("default_permissions")
    return opts


def prepare_mountpoint(path: str) -> None:
    """Make `path` usable as a mount point: create it when missing, clean a
    stale FUSE mount left by a crashed run, refuse a live one."""
    from ..core.errors import ImageError

    try:
        os.stat(path)
        os.listdir(path)  # a dead FUSE mount may still answer stat from cached attributes
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
        return
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise ImageError(f"{path}: cannot use as mount point: {e.strerror}") from None
        log.warning("%s: stale FUSE mount from an earlier run (transport endpoint not connected); unmounting it", path)
        _lazy_unmount(path)
        try:
            os.listdir(path)
        except OSError as e2:
            raise ImageError(f"{path}: stale mount could not be cleaned: {e2.strerror}") from None
        return
    if os.path.ismount(path):
        raise ImageError(f"{path}: something is already mounted there (another repdisk node?); unmount it first")
    if not os.path.isdir(path):
        raise ImageError(f"{path}: not a directory")


def _lazy_unmount(path: str) -> None:
    import subprocess

    for cmd in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        try:
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return
        except FileNotFoundError:
            continue
