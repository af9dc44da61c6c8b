"""A sparse overlay layer: a file as large as the disk, holding data at the
disk's own offsets, plus a bitmap of the blocks it holds.

The file is reused across checkpoints and runs: dropping the layer only
clears the bitmap.  Freeing the file's extents instead (truncate, punch,
unlink) costs one file-system operation per extent -- on a file of scattered
4 KiB blocks and a file system mounted with -o discard, seconds per
checkpoint.  The price: a block whose bit is clear may hold stale bytes from
an earlier epoch, so whoever takes a block over without writing it whole must
clear it first (`clear_stale`).  Every other write into a layer covers whole
blocks."""

import os

from .bitmap import Bitmap
from .errors import IOFailure
from .geometry import Geometry
from .image import RawImage

_ZERO_WRITE_MAX = 1 << 20  # up to this, stale bytes are overwritten with zeros; beyond, punched


class Overlay:
    def __init__(self, path: str, geometry: Geometry):
        self.path = path
        self.geometry = geometry
        self.map = Bitmap(geometry.nblocks)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(fd).st_size != geometry.size:
                os.ftruncate(fd, geometry.size)
        except OSError as e:
            raise IOFailure(f"open overlay {path}", e) from None
        self.file = RawImage(path, fd, geometry.size)

    @property
    def used_bytes(self) -> int:
        return self.map.count() << self.geometry.shift

    def reset(self) -> None:
        """Drop everything the layer holds: O(bitmap), no file-system work."""
        self.map.clear_all()

    def clear_stale(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) of the file read as zeros (it may hold
        bytes of an earlier epoch).  One lseek when it is a hole already."""
        if self.file.is_hole(offset, length):
            return
        if length <= _ZERO_WRITE_MAX:
            self.file.pwrite(bytes(length), offset)
        else:
            self.file.punch(offset, length)

    def close(self) -> None:
        """Close the file, leaving it in place for the next run to reuse
        (unlinking would free every extent now, slowly)."""
        self.file.close()
