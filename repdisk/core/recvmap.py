"""What the secondary received that the primary may not have on its disk yet.

In sync mode the primary sends a write into an extent its activity log does
not hold durably yet to the secondary *first*, and writes its own image only
once the secondary answered (PrimaryNode, "replica first").  Its log entry is
stored later, without waiting.  So the primary's disk never holds a write
the secondary lacks, but a crash of the primary's host can take such a write
out of the primary's page cache while the secondary has it.  This map is how
the primary finds those ranges after such a crash: the secondary marks every
range it receives, and forgets a range only once the primary's flush
protocol says the primary's disk holds it durably.

The flush protocol (PrimaryNode._flush): the primary sends one NBD FLUSH at a
time; for each, it first waits for every request sent before, then sends
FLUSH; it flushes its own image alongside (from the start of the flush, or
once those requests are answered if a replica-first write is among them),
and starts the next flush only after both.  A write that arrived before
FLUSH k was in the primary's page cache before FLUSH k was sent (its reply
was handled by then), so before flush k+1 and its fsync began.  So when
FLUSH k+2 arrives, every write that arrived before FLUSH k is on the
primary's disk: generation "between FLUSH k-1 and FLUSH k" may go.
Three generations, rotated on each FLUSH: the current one and the two before.

Pure and synchronous: the secondary calls `mark` for every write, zero and
trim it takes and `flushed` for every NBD FLUSH, in the order they arrive (one
connection, requests applied one after the other), under its I/O lock.
Grain: 64 KiB, so a 1 TiB disk costs 2 MiB per generation (allocated on
first use); marking is one bitarray slice assignment.
"""

from bitarray import bitarray

GRAIN_SHIFT = 16  # 64 KiB per bit
GENERATIONS = 3  # the current one and the two before (module doc)


class ReceivedMap:
    def __init__(self, size: int, shift: int = GRAIN_SHIFT):
        self.size = size
        self.shift = shift
        self.nbits = (size + (1 << shift) - 1) >> shift
        # Newest first; None: nothing received in that generation.
        self._gens: list[bitarray | None] = [None] * GENERATIONS
        self.flushes = 0

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        cur = self._gens[0]
        if cur is None:
            cur = self._gens[0] = bitarray(self.nbits, endian="little")
            cur.setall(0)
        cur[offset >> self.shift : ((offset + length - 1) >> self.shift) + 1] = 1

    def flushed(self) -> None:
        """An NBD FLUSH arrived: the oldest generation is on the primary's disk."""
        gens = self._gens
        gens.pop()
        gens.insert(0, None)
        self.flushes += 1

    def snapshot(self) -> bitarray:
        """Every grain any generation holds (little-endian bit order: bit i of
        byte j is grain 8j+i)."""
        out = bitarray(self.nbits, endian="little")
        out.setall(0)
        for g in self._gens:
            if g is not None:
                out |= g
        return out

    def count(self) -> int:
        """Grains held (for the status)."""
        return self.snapshot().count() if any(g is not None for g in self._gens) else 0

    def byte_ranges(self, bits: bitarray | None = None):
        """[(offset, length)] of the held grains (runs merged, clipped to the disk)."""
        bits = self.snapshot() if bits is None else bits
        return grain_ranges(bits, self.shift, self.size)


def grain_ranges(bits: bitarray, shift: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges [(offset, length)] of the set runs of a grain bitmap."""
    out = []
    pos = 0
    n = len(bits)
    while True:
        a = bits.find(1, pos)
        if a < 0:
            return out
        b = bits.find(0, a)
        if b < 0:
            b = n
        start = a << shift
        out.append((start, min(b << shift, size) - start))
        pos = b


def map_ranges(data: bytes, nbits: int, shift: int, size: int) -> list[tuple[int, int]]:
    """grain_ranges of a map read back as bytes (the side export): its first
    `nbits` bits, little-endian."""
    bits = bitarray(endian="little")
    bits.frombytes(data)
    del bits[nbits:]
    return grain_ranges(bits, shift, size)
