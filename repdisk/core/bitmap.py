"""Block bitmaps over bitarray: range operations and run iteration, never a
Python loop per block."""

from collections.abc import Iterator

from bitarray import bitarray


class Bitmap:
    __slots__ = ("bits",)

    def __init__(self, nbits: int):
        self.bits = bitarray(nbits)
        self.bits.setall(0)

    def __len__(self) -> int:
        return len(self.bits)

    def set(self, first: int, end: int) -> None:
        if end > first:
            self.bits[first:end] = 1

    def clear(self, first: int, end: int) -> None:
        if end > first:
            self.bits[first:end] = 0

    def clear_all(self) -> None:
        self.bits.setall(0)

    def set_all(self) -> None:
        self.bits.setall(1)

    def count(self, first: int = 0, end: int | None = None) -> int:
        return self.bits.count(1, first, len(self.bits) if end is None else end)

    def any(self, first: int = 0, end: int | None = None) -> bool:
        return self.bits.find(1, first, len(self.bits) if end is None else end) >= 0

    def all(self, first: int, end: int) -> bool:
        return self.bits.find(0, first, end) < 0

    def test(self, i: int) -> bool:
        return bool(self.bits[i])

    def runs(self, first: int = 0, end: int | None = None, value: int = 1) -> Iterator[tuple[int, int]]:
        """Yield maximal runs [a, b) of `value` inside [first, end)."""
        bits = self.bits
        end = len(bits) if end is None else end
        other = 1 - value
        pos = first
        while pos < end:
            a = bits.find(value, pos, end)
            if a < 0:
                return
            b = bits.find(other, a, end)
            if b < 0:
                b = end
            yield a, b
            pos = b

    @classmethod
    def from_bytes(cls, data: bytes, nbits: int) -> "Bitmap":
        bm = cls(0)
        bm.bits = bitarray()
        bm.bits.frombytes(data)
        del bm.bits[nbits:]
        if len(bm.bits) != nbits:
            raise ValueError(f"bitmap has {len(bm.bits)} bits, expected {nbits}")
        return bm
