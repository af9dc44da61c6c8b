"""Block math.  A disk of `size` bytes is cut into blocks of `block_size` bytes
(a power of two); the last block may be short."""

from dataclasses import dataclass
from functools import cached_property

from .errors import InvalidArgument, OutOfRange


@dataclass(frozen=True)
class Geometry:
    size: int
    block_size: int

    def __post_init__(self):
        bs = self.block_size
        if bs < 512 or bs & (bs - 1):
            raise InvalidArgument(f"block size {bs} is not a power of two >= 512")
        if self.size <= 0:
            raise InvalidArgument(f"disk size {self.size} must be positive")

    # Cached: both are read on every I/O (cached_property writes the instance
    # dict directly, which a frozen dataclass allows).
    @cached_property
    def shift(self) -> int:
        return self.block_size.bit_length() - 1

    @cached_property
    def nblocks(self) -> int:
        return (self.size + self.block_size - 1) >> self.shift

    def check(self, offset: int, length: int) -> None:
        """Raise OutOfRange unless [offset, offset+length) lies inside the disk."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(offset, length, self.size)

    def blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The blocks [first, end) that the byte range touches (empty for length 0)."""
        if length <= 0:
            return offset >> self.shift, offset >> self.shift
        return offset >> self.shift, (offset + length - 1 >> self.shift) + 1

    def inner_blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The blocks [first, end) that the byte range covers completely.

        The disk's last block counts as covered when the range reaches the end
        of the disk."""
        first = (offset + self.block_size - 1) >> self.shift
        end_byte = offset + length
        end = self.nblocks if end_byte >= self.size else end_byte >> self.shift
        return first, max(first, end)

    def byte_range(self, first: int, end: int) -> tuple[int, int]:
        """The byte range (offset, length) of blocks [first, end), clipped to the disk."""
        start = first << self.shift
        stop = min(end << self.shift, self.size)
        return start, max(0, stop - start)
