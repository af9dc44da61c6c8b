"""A node's persistent metadata and the identity the two nodes exchange.

Pure: no trio, pyfuse3 or nbd.  Everything here is either a file format or a
string format, each versioned.

The metadata file (`<state dir>/<image>.meta`), replaced atomically (write a
temporary file, fsync it, rename it over the old one, fsync the directory):

    HEADER  magic, version, crc32 of what follows, json length, bitmap length
    JSON    {"node": ..., "disk": ..., "gen": ..., "peer_gen": ..., "epoch": ...,
             "clean": ..., "nbits": ...}
    BITMAP  the primary's dirty bitmap, or nothing: bitarray's sparse
            compression (bitarray.util.sc_encode), so that the mostly clean
            bitmap of a 1 TiB disk is kilobytes, not 32 MiB written and fsynced
            at every state change (version 1 stored the raw bytes; still read)

Generations (`gen`) are random 63-bit numbers, not counters, so that two nodes
that each start a new generation on their own (a degraded primary and a
secondary that failed over) can never pick the same one.  A node starts a new
generation whenever its disk starts taking writes its peer does not get.

The activity log (`<state dir>/<image>.al`): the extents of the disk that may
hold writes the secondary has not acknowledged, written (fsync) before a write
touches an extent not in it.  Fixed size, rewritten in place as one sector:

    AL_HEADER  magic, version, crc32 of the slots, extent shift, slot count
    SLOTS      slot count x u64 extent number (EMPTY for an unused slot)
"""

import json
import os
import struct
import zlib
from dataclasses import dataclass, field

from bitarray import bitarray
from bitarray.util import sc_decode, sc_encode

from .bitmap import Bitmap

# ---- the metadata file ------------------------------------------------------------------------
META_MAGIC = b"RDMETA\r\n"  # \r\n catches text-mode mangling
META_VERSION = 2
META_VERSIONS = (1, 2)  # versions this code reads (1: raw bitmap bytes)
META_HEADER = struct.Struct(
    "<8s"  # magic
    "I"  # version
    "I"  # crc32 of the JSON and bitmap bytes
    "I"  # JSON length
    "Q"  # bitmap length in bytes (0: none stored)
)
MAX_JSON = 1 << 20


class MetaError(Exception):
    """A metadata or activity-log file that cannot be trusted (missing, corrupt, other version)."""


@dataclass
class Meta:
    node: str  # this node's id (hex), fixed for the life of its state dir
    disk: str | None = None  # the lineage: id of the replicated disk; None: not part of one yet
    gen: int = 0  # data generation of this node's disk
    peer_gen: int = 0  # primary: the generation the secondary is known to hold (0: unknown)
    epoch: int = 0  # checkpoints done
    clean: bool = False  # True only when written by a clean stop
    nbits: int = 0  # bits in `bitmap`
    boot: str = ""  # the kernel's boot id when the node last started: tells a host crash from a process crash
    al_host: bool = True  # primary: its activity log was kept durable (fdatasync), so it survives a host crash
    # primary: the secondary run (process) that took replica-first writes and
    # keeps a map of what our disk may have lost in a host crash ("": none)
    peer_run: str = ""
    bitmap: bitarray | None = field(default=None, repr=False)  # primary: blocks not on the secondary (nbits)


def boot_id() -> str:
    """This boot of the host (Linux); "" when unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def new_id() -> str:
    return os.urandom(8).hex()


def new_gen() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1 or 1


def encode_meta(m: Meta) -> bytes:
    doc = {"node": m.node, "disk": m.disk, "gen": m.gen, "peer_gen": m.peer_gen, "epoch": m.epoch,
           "clean": m.clean, "nbits": m.nbits if m.bitmap is not None else 0, "boot": m.boot,
           "al_host": m.al_host, "peer_run": m.peer_run}
    js = json.dumps(doc, sort_keys=True).encode()
    bm = b"" if m.bitmap is None else sc_encode(m.bitmap)
    crc = zlib.crc32(bm, zlib.crc32(js))
    return META_HEADER.pack(META_MAGIC, META_VERSION, crc, len(js), len(bm)) + js + bm


def decode_meta(data: bytes) -> Meta:
    if len(data) < META_HEADER.size:
        raise MetaError(f"truncated ({len(data)} bytes)")
    magic, version, crc, jlen, blen = META_HEADER.unpack_from(data)
    if magic != META_MAGIC:
        raise MetaError("not a repdisk metadata file (bad magic)")
    if version not in META_VERSIONS:
        raise MetaError(f"metadata version {version} is not supported (this repdisk reads versions "
                        f"{', '.join(map(str, META_VERSIONS))})")
    if jlen > MAX_JSON or META_HEADER.size + jlen + blen != len(data):
        raise MetaError(f"lengths do not match the file ({jlen} + {blen} + header != {len(data)} bytes)")
    js = data[META_HEADER.size : META_HEADER.size + jlen]
    bm = data[META_HEADER.size + jlen :]
    if zlib.crc32(bm, zlib.crc32(js)) != crc:
        raise MetaError("checksum mismatch")
    try:
        doc = json.loads(js)
        m = Meta(node=str(doc["node"]), disk=doc["disk"], gen=int(doc["gen"]), peer_gen=int(doc["peer_gen"]),
                 epoch=int(doc["epoch"]), clean=bool(doc["clean"]), nbits=int(doc["nbits"]),
                 boot=str(doc.get("boot", "")), al_host=bool(doc.get("al_host", True)),
                 peer_run=str(doc.get("peer_run", "")))
    except (ValueError, KeyError, TypeError) as e:
        raise MetaError(f"bad content: {e}") from None
    if blen:
        try:
            m.bitmap = sc_decode(bm) if version >= 2 else Bitmap.from_bytes(bm, m.nbits).bits
        except (ValueError, TypeError) as e:
            raise MetaError(f"bad bitmap: {e}") from None
        if len(m.bitmap) != m.nbits:
            raise MetaError(f"bitmap of {len(m.bitmap)} bits, {m.nbits} expected")
    return m


def atomic_write(path: str, data: bytes) -> None:
    """Replace `path` by `data`: never a half-written file, whatever crashes when."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_meta(path: str, m: Meta) -> None:
    atomic_write(path, encode_meta(m))


def load_meta(path: str) -> Meta:
    """The metadata at `path`; MetaError (with the path) when missing or untrustworthy."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise MetaError(f"{path}: no metadata file") from None
    except OSError as e:
        raise MetaError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return decode_meta(data)
    except MetaError as e:
        raise MetaError(f"{path}: {e}") from None


# ---- the activity log -------------------------------------------------------------------------
AL_MAGIC = b"RDAL\r\n\x00\x01"
AL_VERSION = 1
AL_HEADER = struct.Struct(
    "<8s"  # magic
    "I"  # version
    "I"  # crc32 of the slot array
    "I"  # extent shift (log2 of the extent size in bytes)
    "I"  # slot count
)
AL_EMPTY = (1 << 64) - 1


class AlSlots:
    """The activity log as it is stored, kept encoded: adding or dropping an
    extent changes one 8-byte slot (a dropped one becomes AL_EMPTY and is
    reused), so a store writes the array as it stands instead of rebuilding
    and packing every extent (with 1024 extents that took a third of the
    primary's time on writes to new extents)."""

    def __init__(self, shift: int):
        self.shift = shift
        self._slot: dict[int, int] = {}  # extent -> slot
        self._free: list[int] = []
        self._body = bytearray()

    def add(self, e: int) -> None:
        if e in self._slot:
            return
        if self._free:
            i = self._free.pop()
        else:
            i = len(self._body) // 8
            self._body += b"\0" * 8
        struct.pack_into("<Q", self._body, 8 * i, e)
        self._slot[e] = i

    def discard(self, e: int) -> None:
        i = self._slot.pop(e, None)
        if i is not None:
            struct.pack_into("<Q", self._body, 8 * i, AL_EMPTY)
            self._free.append(i)

    def encode(self) -> bytes:
        """The file's bytes now (a copy: the caller may write it from a thread)."""
        body = bytes(self._body)
        return AL_HEADER.pack(AL_MAGIC, AL_VERSION, zlib.crc32(body), self.shift, len(body) // 8) + body


def decode_al(data: bytes) -> tuple[int, list[int]]:
    """(extent shift, [extent numbers]) of an activity log; MetaError when not valid."""
    if len(data) < AL_HEADER.size:
        raise MetaError(f"activity log truncated ({len(data)} bytes)")
    magic, version, crc, shift, n = AL_HEADER.unpack_from(data)
    if magic != AL_MAGIC or version != AL_VERSION:
        raise MetaError("not a repdisk activity log (bad magic or version)")
    body = data[AL_HEADER.size : AL_HEADER.size + 8 * n]
    if len(body) != 8 * n or zlib.crc32(body) != crc or not 9 <= shift <= 40:
        raise MetaError("activity log checksum or length mismatch")
    return shift, [e for e in struct.unpack(f"<{n}Q", body) if e != AL_EMPTY]


# ---- identity in the NBD handshake ------------------------------------------------------------
# The secondary's export description:  "repdisk/1 node=<id> disk=<id|-> gen=<hex> epoch=<n>"
# The export name the primary asks for: "repdisk:disk=<id>:gen=<hex>:peer=<hex>[:force=1]"
# A plain NBD client asks for "" and gets the export with no identity check.
IDENTITY_PREFIX = "repdisk/1"
EXPORT_PREFIX = "repdisk:"


# The secondary's export that serves its received map (repdisk.core.recvmap)
# to the primary after a crash: read-only, the bitmap's bytes; its description
# says which run of the secondary it belongs to.
RECEIVED_EXPORT = "repdisk-received"


def format_identity(node: str, disk: str | None, gen: int, epoch: int, run: str = "") -> str:
    text = f"{IDENTITY_PREFIX} node={node} disk={disk or '-'} gen={gen:x} epoch={epoch}"
    return f"{text} run={run}" if run else text


def format_received(run: str, shift: int, nbits: int) -> str:
    return f"{IDENTITY_PREFIX} received run={run} shift={shift} bits={nbits}"


def parse_received(text: str | None) -> dict | None:
    """{'run', 'shift', 'bits'} from the received map export's description."""
    words = (text or "").split()
    if len(words) < 2 or words[:2] != [IDENTITY_PREFIX, "received"]:
        return None
    f = _fields(words[2:])
    try:
        return {"run": f["run"], "shift": int(f["shift"]), "bits": int(f["bits"])}
    except (TypeError, KeyError, ValueError):
        return None


def _fields(words) -> dict | None:
    out = {}
    for w in words:
        k, sep, v = w.partition("=")
        if not sep or not k:
            return None
        out[k] = v
    return out


def parse_identity(text: str | None) -> dict | None:
    """{'node', 'disk' (None if '-'), 'gen' (int), 'run' ('' from a secondary
    without a received map)} from a description, or None for anything else (a
    plain NBD server, a garbled string)."""
    if not text:
        return None
    words = text.split()
    if not words or words[0] != IDENTITY_PREFIX:
        return None
    f = _fields(words[1:])
    try:
        return {"node": f["node"], "disk": None if f["disk"] == "-" else f["disk"], "gen": int(f["gen"], 16),
                "run": f.get("run", "")}
    except (TypeError, KeyError, ValueError):
        return None


def format_export_name(disk: str, gen: int, peer_gen: int, force: bool = False) -> str:
    name = f"{EXPORT_PREFIX}disk={disk}:gen={gen:x}:peer={peer_gen:x}"
    return name + ":force=1" if force else name


def parse_export_name(name: str) -> dict | None:
    """{'disk', 'gen', 'peer', 'force'} from a repdisk export name; None if
    it is not one (or is malformed)."""
    if not name.startswith(EXPORT_PREFIX):
        return None
    f = _fields(name[len(EXPORT_PREFIX) :].split(":"))
    try:
        return {"disk": f["disk"], "gen": int(f["gen"], 16), "peer": int(f["peer"], 16), "force": f.get("force") == "1"}
    except (TypeError, KeyError, ValueError):
        return None


# ---- decisions --------------------------------------------------------------------------------
FULL, INCREMENTAL, SPLIT_BRAIN, FOREIGN = "full", "incremental", "split-brain", "foreign"


def secondary_verdict(my_disk: str | None, my_gen: int, asked: dict) -> str:
    """What a secondary whose disk is (my_disk, my_gen) does with a primary
    that asks for `asked` (parse_export_name): FULL (accept; content unknown),
    INCREMENTAL (accept; the primary's bitmap covers the difference),
    SPLIT_BRAIN or FOREIGN (refuse)."""
    if asked["force"] or my_disk is None:
        return FULL
    if my_disk != asked["disk"]:
        return FOREIGN
    if my_gen and my_gen in (asked["gen"], asked["peer"]):
        return INCREMENTAL
    return SPLIT_BRAIN


def primary_verdict(disk: str, gen: int, peer_gen: int, identity: dict | None) -> str:
    """What a primary does with a secondary that described itself as
    `identity` (parse_identity; None for a plain server)."""
    if identity is None or identity["disk"] is None:
        return FULL
    if identity["disk"] != disk:
        return FOREIGN
    if identity["gen"] and identity["gen"] in (gen, peer_gen):
        return INCREMENTAL
    return SPLIT_BRAIN
