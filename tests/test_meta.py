"""The metadata file, the activity log and the identity strings (pure)."""

import os

import pytest
from bitarray import bitarray

from repdisk.core import meta as md


def test_meta_round_trip_and_atomic_replace(tmp_path):
    p = str(tmp_path / "x.meta")
    m = md.Meta(node="n1", disk="d1", gen=md.new_gen(), peer_gen=5, epoch=3, clean=True, nbits=13, bitmap=bitarray("1111111100010"),
                boot=md.boot_id())
    md.save_meta(p, m)
    got = md.load_meta(p)
    assert got == m
    m.epoch = 4
    md.save_meta(p, m)
    assert md.load_meta(p).epoch == 4
    assert sorted(os.listdir(tmp_path)) == ["x.meta"]  # no temporary left behind


def test_bitmap_is_stored_compressed_and_version_1_still_reads(tmp_path):
    bits = bitarray(1 << 28)  # a 1 TiB disk at 4 KiB blocks
    bits.setall(0)
    bits[1000:5000] = 1
    bits[1 << 27 : (1 << 27) + 99999] = 1
    m = md.Meta(node="n", disk="d", gen=7, nbits=len(bits), bitmap=bits)
    data = md.encode_meta(m)
    assert len(data) < 64 << 10  # not 32 MiB
    got = md.decode_meta(data)
    assert got.bitmap == bits and got.nbits == len(bits)
    # A version-1 file (raw bitmap bytes) from an earlier repdisk.
    js = b'{"boot": "", "clean": true, "disk": "d", "epoch": 2, "gen": 7, "nbits": 12, "node": "n", "peer_gen": 0}'
    raw = b"\xf0\x30"
    import zlib
    v1 = md.META_HEADER.pack(md.META_MAGIC, 1, zlib.crc32(raw, zlib.crc32(js)), len(js), len(raw)) + js + raw
    old = md.decode_meta(v1)
    assert old.bitmap.tobytes() == raw and old.nbits == 12 and old.epoch == 2
    # A bitmap that is not a valid encoding (checksum recomputed) is refused, not guessed at.
    bad = b"\x7f\x7f\x7f"
    v2 = md.META_HEADER.pack(md.META_MAGIC, 2, zlib.crc32(bad, zlib.crc32(js)), len(js), len(bad)) + js + bad
    with pytest.raises(md.MetaError):
        md.decode_meta(v2)


@pytest.mark.parametrize("damage", ["missing", "empty", "magic", "flip", "truncate", "version"])
def test_untrustworthy_meta_is_a_clear_error(tmp_path, damage):
    p = tmp_path / "x.meta"
    data = bytearray(md.encode_meta(md.Meta(node="n", disk="d", gen=7, nbits=16, bitmap=bitarray(16))))
    if damage == "empty":
        data = bytearray()
    elif damage == "magic":
        data[0] ^= 1
    elif damage == "flip":
        data[-1] ^= 0x10
    elif damage == "truncate":
        data = data[:-3]
    elif damage == "version":
        data[8] = 9
    if damage != "missing":
        p.write_bytes(data)
    with pytest.raises(md.MetaError) as e:
        md.load_meta(str(p))
    assert str(p) in str(e.value)


def test_activity_log_round_trip():
    slots = md.AlSlots(22)
    for e in (3, 1, 99):
        slots.add(e)
    data = slots.encode()
    assert md.decode_al(data) == (22, [3, 1, 99])
    bad = bytearray(data)
    bad[-1] ^= 1
    with pytest.raises(md.MetaError):
        md.decode_al(bytes(bad))
    with pytest.raises(md.MetaError):
        md.decode_al(b"")


def test_identity_strings():
    text = md.format_identity("ab", "cd", 0x1F, 3)
    assert md.parse_identity(text) == {"node": "ab", "disk": "cd", "gen": 0x1F, "run": ""}
    assert md.parse_identity(md.format_identity("ab", "cd", 0x1F, 3, "r1"))["run"] == "r1"
    rec = md.format_received("r1", 16, 1000)
    assert md.parse_received(rec) == {"run": "r1", "shift": 16, "bits": 1000}
    assert md.parse_identity(rec) is None  # the side export's description is no disk identity
    for other in (None, "", text, "repdisk/1 received run=r1", "repdisk/1 received run=r shift=x bits=1"):
        assert md.parse_received(other) is None
    assert md.parse_identity(md.format_identity("ab", None, 0, 0))["disk"] is None
    for plain in (None, "", "nbdkit memory plugin", "repdisk/1 node=x", "repdisk/1 node=x disk=y gen=zz", "repdisk/1 a"):
        assert md.parse_identity(plain) is None
    name = md.format_export_name("cd", 0x10, 0x20, force=True)
    assert md.parse_export_name(name) == {"disk": "cd", "gen": 0x10, "peer": 0x20, "force": True}
    assert md.parse_export_name(md.format_export_name("cd", 1, 0))["force"] is False
    for other in ("", "foo", "repdisk:", "repdisk:disk=cd:gen=xyz:peer=0", "repdisk:disk"):
        assert md.parse_export_name(other) is None


def test_verdicts():
    asked = {"disk": "D", "gen": 2, "peer": 1, "force": False}
    assert md.secondary_verdict(None, 0, asked) == md.FULL  # a fresh secondary is adopted
    assert md.secondary_verdict("D", 1, asked) == md.INCREMENTAL  # behind: it has what we last shared
    assert md.secondary_verdict("D", 2, asked) == md.INCREMENTAL  # already at our generation
    assert md.secondary_verdict("D", 3, asked) == md.SPLIT_BRAIN  # it took writes of its own
    assert md.secondary_verdict("D", 0, asked) == md.SPLIT_BRAIN
    assert md.secondary_verdict("E", 1, asked) == md.FOREIGN
    assert md.secondary_verdict("E", 9, {**asked, "force": True}) == md.FULL
    assert md.primary_verdict("D", 2, 1, None) == md.FULL
    assert md.primary_verdict("D", 2, 1, {"node": "s", "disk": None, "gen": 0}) == md.FULL
    assert md.primary_verdict("D", 2, 1, {"node": "s", "disk": "D", "gen": 1}) == md.INCREMENTAL
    assert md.primary_verdict("D", 2, 1, {"node": "s", "disk": "D", "gen": 3}) == md.SPLIT_BRAIN
    assert md.primary_verdict("D", 2, 1, {"node": "s", "disk": "X", "gen": 1}) == md.FOREIGN
    gens = {md.new_gen() for _ in range(1000)}
    assert len(gens) == 1000 and all(0 < g < 1 << 63 for g in gens)


def test_al_slots_encode_exactly_the_extents_held_and_reuse_freed_slots():
    """The primary's log kept encoded (AlSlots) against a plain set: after any
    sequence of adds and drops the stored bytes decode to the set, and the
    file grows only to the most extents held at once."""
    import random

    rng = random.Random(7)
    slots, model, most = md.AlSlots(22), set(), 0
    assert md.decode_al(slots.encode()) == (22, [])
    for _ in range(3000):
        e = rng.randrange(200)
        if rng.random() < 0.55:
            slots.add(e)
            model.add(e)
        else:
            slots.discard(e)
            model.discard(e)
        most = max(most, len(model))
        data = slots.encode()
        shift, extents = md.decode_al(data)
        assert shift == 22 and sorted(extents) == sorted(model)
    assert len(data) == md.AL_HEADER.size + 8 * most
