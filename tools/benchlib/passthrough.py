"""The Python FUSE floor: a minimal pyfuse3 passthrough of one raw file.

    python passthrough.py IMAGE MOUNTPOINT

Shows IMAGE as MOUNTPOINT/disk.img with the same mount options, direct I/O,
block size, malloc settings, pyfuse3 task settings and worker loop (repdisk.edge.fuseloop,
with its poll for the next request) as repdisk's front end,
and nothing else: a read is one os.pread inline in the handler, a write
repdisk's own RawImage.pwrite (os.pwrite in pieces of WRITE_PIECE), as
repdisk writes its images.  The benchmark runs fio on it next to repdisk, so that its tables
separate what a single-threaded Python FUSE daemon costs on this machine from
what repdisk adds on top.  Stops on SIGTERM/SIGINT (unmounting)."""

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from repdisk.app import FUSE_MAX_TASKS, FUSE_MIN_TASKS, keep_heap  # noqa: E402
from repdisk.core.image import RawImage  # noqa: E402
from repdisk.edge import fuseloop  # noqa: E402
from repdisk.edge.fuse import PREFERRED_IO_SIZE, mount_options  # noqa: E402
from repdisk.edge.spin import FUSE_POLL_US  # noqa: E402

DISK = pyfuse3.ROOT_INODE + 1


class Passthrough(pyfuse3.Operations):
    def __init__(self, fd: int, size: int):
        super().__init__()
        self.fd, self.size = fd, size
        self.image = RawImage("floor image", fd, size)

    def _attr(self, inode):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.attr_timeout = a.entry_timeout = 300
        a.st_blksize = PREFERRED_IO_SIZE
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
        elif inode == DISK:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"disk.img":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(DISK)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attr(inode)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)  # as repdisk's disk.img

    async def read(self, fh, off, size):
        return os.pread(self.fd, min(size, max(0, self.size - off)), off)

    async def write(self, fh, off, buf):
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.image.pwrite(buf, off)
        return len(buf)

    async def fsync(self, fh, datasync):
        os.fsync(self.fd)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass


async def main(fs, mountpoint):
    keep_heap()
    pyfuse3.init(fs, mountpoint, mount_options("pyfuse3-floor"))
    try:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal():
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(stop_on_signal)
            with fuseloop.installed(FUSE_POLL_US / 1e6):
                await pyfuse3.main(min_tasks=FUSE_MIN_TASKS, max_tasks=FUSE_MAX_TASKS)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    image, mountpoint = sys.argv[1], sys.argv[2]
    fd = os.open(image, os.O_RDWR)
    trio.run(main, Passthrough(fd, os.fstat(fd).st_size), mountpoint)
