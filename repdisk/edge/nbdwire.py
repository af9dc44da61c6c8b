"""The NBD wire format (fixed newstyle handshake, simple replies): every magic,
flag, type, error number and frame layout in one place.

Source: the NBD protocol, NetworkBlockDevice/nbd doc/proto.md.  All integers
are big-endian ("network byte order").  Only what repdisk's server speaks is
decoded here; the rest is listed so that logs can name what a client sent.

Nothing in this module does I/O: the server reads the bytes, this module says
what they mean.  Bytes that cannot be decoded raise ProtocolError, which ends
that one connection.
"""

import errno
import struct

# ---- limits (ours, not the protocol's) ----------------------------------------

# The largest READ/WRITE/WRITE_ZEROES we announce (NBD_INFO_BLOCK_SIZE maximum).
# The spec asks servers not to treat less than 2^25 as a denial of service;
# a WRITE payload above it closes the connection (we will not buffer it).
MAX_REQUEST = 32 << 20
# The largest option payload we accept during the handshake.  Real options are
# a few hundred bytes (an export name is at most 4096 bytes).
MAX_OPTION = 64 << 10
# Strings we send (descriptions, error texts) are cut to this many bytes; the
# spec says strings MUST NOT be longer than 4096 bytes.
MAX_STRING = 4096

# ---- magics ------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes the server sends
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle marker and option-request magic
OPTION_REPLY_MAGIC = 0x0003E889045565A9  # starts every option reply
REQUEST_MAGIC = 0x25609513  # starts every transmission request
SIMPLE_REPLY_MAGIC = 0x67446698  # starts every simple reply
STRUCTURED_REPLY_MAGIC = 0x668E33EF  # structured reply chunk (we never send one)

# ---- handshake flags (server -> client, 16 bits) ----------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0  # we speak fixed newstyle
FLAG_NO_ZEROES = 1 << 1  # we can omit the 124 zero bytes after NBD_OPT_EXPORT_NAME

# ---- client flags (client -> server, 32 bits) ---------------------------------

FLAG_C_FIXED_NEWSTYLE = 1 << 0  # the client speaks fixed newstyle
FLAG_C_NO_ZEROES = 1 << 1  # the client wants no 124 zero bytes
CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES  # anything else: hang up

# ---- transmission flags (16 bits, sent with the export size) -------------------

FLAG_HAS_FLAGS = 1 << 0  # always set
FLAG_READ_ONLY = 1 << 1  # export is read-only
FLAG_SEND_FLUSH = 1 << 2  # NBD_CMD_FLUSH is understood
FLAG_SEND_FUA = 1 << 3  # NBD_CMD_FLAG_FUA is understood
FLAG_ROTATIONAL = 1 << 4  # seek-bound medium (a hint)
FLAG_SEND_TRIM = 1 << 5  # NBD_CMD_TRIM is understood
FLAG_SEND_WRITE_ZEROES = 1 << 6  # NBD_CMD_WRITE_ZEROES (and NBD_CMD_FLAG_NO_HOLE) understood
FLAG_SEND_DF = 1 << 7  # NBD_CMD_FLAG_DF understood (structured replies only)
FLAG_CAN_MULTI_CONN = 1 << 8  # flushes are visible across connections
FLAG_SEND_RESIZE = 1 << 9  # experimental RESIZE extension
FLAG_SEND_CACHE = 1 << 10  # NBD_CMD_CACHE understood
FLAG_SEND_FAST_ZERO = 1 << 11  # NBD_CMD_FLAG_FAST_ZERO understood

# ---- options (client -> server during the handshake) ------------------------------

OPT_EXPORT_NAME = 1  # choose an export and enter transmission (cannot fail politely)
OPT_ABORT = 2  # client ends the handshake; we reply ACK and close
OPT_LIST = 3  # list exports: NBD_REP_SERVER per export, then ACK
OPT_PEEK_EXPORT = 4  # withdrawn
OPT_STARTTLS = 5  # TLS upgrade (not supported)
OPT_INFO = 6  # describe an export (NBD_REP_INFO replies), stay in the handshake
OPT_GO = 7  # as OPT_INFO, then enter transmission on ACK
OPT_STRUCTURED_REPLY = 8  # structured replies (not supported: simple replies only)
OPT_LIST_META_CONTEXT = 9  # metadata contexts (needs structured replies)
OPT_SET_META_CONTEXT = 10  # metadata contexts (needs structured replies)
OPT_EXTENDED_HEADERS = 11  # 64-bit request/reply headers (not supported)

OPT_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME",
    OPT_ABORT: "ABORT",
    OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT",
    OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO",
    OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# ---- option reply types (server -> client) ---------------------------------------

REP_ACK = 1  # option done (or the end of a list)
REP_SERVER = 2  # one export in an OPT_LIST answer
REP_INFO = 3  # one NBD_INFO_* item in an OPT_INFO/OPT_GO answer
REP_META_CONTEXT = 4  # one metadata context
REP_ERR = 1 << 31  # bit 31 marks an error; its payload is a message for humans
REP_ERR_UNSUP = REP_ERR | 1  # option not known to this server
REP_ERR_POLICY = REP_ERR | 2  # known and valid, but refused by policy
REP_ERR_INVALID = REP_ERR | 3  # known but malformed
REP_ERR_PLATFORM = REP_ERR | 4  # not supported on this platform
REP_ERR_TLS_REQD = REP_ERR | 5  # TLS required first
REP_ERR_UNKNOWN = REP_ERR | 6  # no such export
REP_ERR_SHUTDOWN = REP_ERR | 7  # server is shutting down
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8  # client must ask for NBD_INFO_BLOCK_SIZE
REP_ERR_TOO_BIG = REP_ERR | 9  # request or reply too large

# ---- information types (in NBD_REP_INFO and in OPT_INFO/OPT_GO requests) ---------

INFO_EXPORT = 0  # size and transmission flags (always sent before ACK)
INFO_NAME = 1  # canonical export name
INFO_DESCRIPTION = 2  # human-readable description
INFO_BLOCK_SIZE = 3  # minimum, preferred, maximum block size

# ---- commands (transmission requests) -------------------------------------------

CMD_READ = 0  # reply carries `length` bytes
CMD_WRITE = 1  # request carries `length` bytes
CMD_DISC = 2  # client disconnects; no reply
CMD_FLUSH = 3  # make replied writes durable
CMD_TRIM = 4  # discard a range (we punch holes: it reads as zeros)
CMD_CACHE = 5  # prefetch hint (not advertised)
CMD_WRITE_ZEROES = 6  # write zeros without a payload
CMD_BLOCK_STATUS = 7  # allocation status (needs structured replies)
CMD_RESIZE = 8  # experimental

CMD_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disc",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write_zeroes",
    CMD_BLOCK_STATUS: "block_status",
    CMD_RESIZE: "resize",
}

# ---- command flags (16 bits in every request) ---------------------------------------

CMD_FLAG_FUA = 1 << 0  # reply only once this command's data is durable
CMD_FLAG_NO_HOLE = 1 << 1  # WRITE_ZEROES: do not deallocate (we may ignore it: zeros are zeros)
CMD_FLAG_DF = 1 << 2  # READ: do not fragment (structured replies only)
CMD_FLAG_REQ_ONE = 1 << 3  # BLOCK_STATUS: one extent only
CMD_FLAG_FAST_ZERO = 1 << 4  # WRITE_ZEROES: fail fast unless cheap (not advertised)
CMD_FLAG_PAYLOAD_LEN = 1 << 5  # extended headers only

# The flags each command we serve accepts; any other flag gets EINVAL.  FUA is
# accepted on every command (the spec says servers MUST accept it when
# NBD_FLAG_SEND_FUA was sent, and clients are known to set it everywhere).
CMD_FLAGS_ALLOWED = {
    CMD_READ: CMD_FLAG_FUA,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}

# ---- error numbers in replies (NBD's own numbering) ---------------------------------

NBD_EPERM = 1  # operation not permitted (write to a read-only export)
NBD_EIO = 5  # input/output error (and anything unexpected)
NBD_ENOMEM = 12  # cannot allocate memory (avoid)
NBD_EINVAL = 22  # invalid argument (bad flags, unknown command, read past the end)
NBD_ENOSPC = 28  # no space left (write past the end, EDQUOT, EFBIG)
NBD_EOVERFLOW = 75  # value too large (READ with DF only)
NBD_ENOTSUP = 95  # operation not supported (FAST_ZERO only)
NBD_ESHUTDOWN = 108  # server is shutting down

# The one errno -> NBD error table.  Anything not listed is NBD_EIO.
ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(err: int | None) -> int:
    """The NBD error number for an errno (NBD_EIO for anything unknown)."""
    return ERRNO_TO_NBD.get(err, NBD_EIO)


# ---- frame layouts ----------------------------------------------------------------

# S: greeting: NBDMAGIC (u64), IHAVEOPT (u64), handshake flags (u16).
GREETING = struct.Struct(">QQH")
# C: client flags (u32).
CLIENT_FLAGS = struct.Struct(">I")
# C: option request header: IHAVEOPT (u64), option (u32), data length (u32);
#    `length` bytes of data follow.
OPTION_HEADER = struct.Struct(">QII")
# S: option reply header: OPTION_REPLY_MAGIC (u64), option (u32), reply type
#    (u32), data length (u32); `length` bytes of data follow.
OPTION_REPLY = struct.Struct(">QIII")
# S: answer to OPT_EXPORT_NAME: export size (u64), transmission flags (u16);
#    then 124 zero bytes unless both sides agreed on NO_ZEROES.
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124
# C: OPT_INFO/OPT_GO data: name length (u32), name, then INFO_COUNT.
INFO_NAME_LENGTH = struct.Struct(">I")
# C: number of information requests (u16), then that many INFO_TYPE.
INFO_COUNT = struct.Struct(">H")
INFO_TYPE = struct.Struct(">H")
# S: NBD_REP_INFO payload for INFO_EXPORT: type (u16), size (u64), transmission flags (u16).
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
# S: NBD_REP_INFO payload for INFO_BLOCK_SIZE: type (u16), minimum (u32),
#    preferred (u32), maximum (u32).
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")
# S: NBD_REP_INFO payload for INFO_NAME / INFO_DESCRIPTION: type (u16), then the string.
INFO_STRING_HEADER = struct.Struct(">H")
# S: NBD_REP_SERVER payload: name length (u32), name, then an optional description.
SERVER_NAME_LENGTH = struct.Struct(">I")
# C: request: REQUEST_MAGIC (u32), command flags (u16), type (u16), handle
#    (u64, opaque, echoed in the reply), offset (u64), length (u32); a WRITE
#    carries `length` bytes after it.
REQUEST = struct.Struct(">IHHQQI")
# S: simple reply: SIMPLE_REPLY_MAGIC (u32), error (u32, NBD numbering), handle
#    (u64); a successful READ carries `length` bytes after it.
SIMPLE_REPLY = struct.Struct(">IIQ")


class ProtocolError(Exception):
    """Bytes from a peer that break the protocol: the connection is closed."""


# ---- encoders ---------------------------------------------------------------------


def greeting() -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def wire_string(text: str) -> bytes:
    """UTF-8, cut to MAX_STRING bytes without splitting a character."""
    data = text.encode("utf-8")
    if len(data) > MAX_STRING:
        data = data[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return data


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def option_error(option: int, reply_type: int, message: str) -> bytes:
    return option_reply(option, reply_type, wire_string(message))


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(EXPORT_NAME_PADDING)


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT_PAYLOAD.pack(INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE_PAYLOAD.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_string(info_type: int, text: str) -> bytes:
    return INFO_STRING_HEADER.pack(info_type) + wire_string(text)


def server_entry(name: str, description: str = "") -> bytes:
    raw = wire_string(name)
    return SERVER_NAME_LENGTH.pack(len(raw)) + raw + wire_string(description)


def simple_reply(error: int, handle: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


# ---- decoders ---------------------------------------------------------------------


def parse_option_header(data) -> tuple[int, int]:
    """(option, length) of an option request header; ProtocolError on garbage."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#018x}")
    if length > MAX_OPTION:
        raise ProtocolError(f"option {option_name(option)} of {length} bytes (limit {MAX_OPTION})")
    return option, length


def parse_info_request(data: bytes) -> tuple[str, list[int]] | None:
    """(export name, info types) of OPT_INFO/OPT_GO data, or None when the data
    is malformed (answered with NBD_REP_ERR_INVALID, not a hang-up)."""
    if len(data) < INFO_NAME_LENGTH.size + INFO_COUNT.size:
        return None
    (name_len,) = INFO_NAME_LENGTH.unpack_from(data)
    pos = INFO_NAME_LENGTH.size
    if name_len > len(data) - pos - INFO_COUNT.size:
        return None
    name = decode_name(data[pos : pos + name_len])
    if name is None:
        return None
    pos += name_len
    (count,) = INFO_COUNT.unpack_from(data, pos)
    pos += INFO_COUNT.size
    if len(data) - pos != count * INFO_TYPE.size:
        return None
    types = list(struct.unpack_from(f">{count}H", data, pos))
    return name, types


def decode_name(raw) -> str | None:
    """An export name from the wire, or None if it is not valid UTF-8 / has NUL."""
    try:
        name = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\0" in name:
        return None
    return name


def option_name(option: int) -> str:
    return OPT_NAMES.get(option, str(option))


def command_name(cmd: int) -> str:
    return CMD_NAMES.get(cmd, f"command {cmd}")
