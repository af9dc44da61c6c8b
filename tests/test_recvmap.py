"""The secondary's received map (pure): what it keeps, for how many flushes."""

from repdisk.core.recvmap import GENERATIONS, ReceivedMap, grain_ranges

G = 64 << 10


def test_a_range_is_kept_until_the_third_flush_after_it():
    m = ReceivedMap(10 * G + 100)
    m.mark(G + 5, 1)
    for _ in range(GENERATIONS - 1):
        m.flushed()
        assert m.byte_ranges() == [(G, G)]
    m.mark(3 * G, 2 * G + 1)  # arrives after two flushes: three grains
    m.flushed()
    assert m.byte_ranges() == [(3 * G, 3 * G)]
    assert m.flushes == GENERATIONS


def test_grains_cover_unaligned_ranges_and_stop_at_the_end_of_the_disk():
    size = 10 * G + 100
    m = ReceivedMap(size)
    assert m.nbits == 11 and m.count() == 0 and m.byte_ranges() == []
    m.mark(G - 1, 2)  # straddles two grains
    m.mark(size - 1, 1)  # the last, partial grain
    m.mark(5 * G, 0)  # nothing
    assert m.byte_ranges() == [(0, 2 * G), (10 * G, 100)]
    assert m.count() == 3


def test_generations_are_merged_in_the_snapshot():
    m = ReceivedMap(8 * G)
    m.mark(0, 1)
    m.flushed()
    m.mark(2 * G, 1)
    m.flushed()
    m.mark(4 * G, 1)
    bits = m.snapshot()
    assert bits.tobytes() == bytes([0b10101])  # little-endian bit order: grain i is bit i
    assert grain_ranges(bits, 16, 8 * G) == [(0, G), (2 * G, G), (4 * G, G)]
