"""A sparse overlay layer: a file as large as the disk, holding data at the
disk's own offsets, plus a bitmap of the blocks it holds.

Invariant: a block whose bit is clear reads as zeros in the file (the file is
new or was reset), so a block that is a hole in the layer below can be taken
over by setting its bit, without copying anything."""

import os

from .bitmap import Bitmap
from .errors import IOFailure
from .geometry import Geometry
from .image import RawImage


class Overlay:
    def __init__(self, path: str, geometry: Geometry):
        self.path = path
        self.geometry = geometry
        self.map = Bitmap(geometry.nblocks)
        self.file = self._fresh_file()

    def _fresh_file(self) -> RawImage:
        """A new empty sparse file replaces whatever is at `path` (rename is atomic)."""
        tmp = f"{self.path}.new"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, self.geometry.size)
            os.rename(tmp, self.path)
        except OSError as e:
            raise IOFailure(f"create overlay {tmp}", e) from None
        return RawImage(self.path, fd, self.geometry.size)

    @property
    def used_bytes(self) -> int:
        return self.map.count() << self.geometry.shift

    def reset(self) -> RawImage:
        """Drop everything in O(1): a fresh file and an empty bitmap.  Returns the
        old file, already unlinked, for the caller to close (closing frees its
        extents, which can take a while: do it off the hot path)."""
        old = self.file
        self.file = self._fresh_file()
        self.map.clear_all()
        return old

    def close(self, unlink: bool = True) -> None:
        self.file.close()
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
