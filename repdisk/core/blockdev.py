"""The one block-device interface (nbdkit-like) that the NBD server serves and
the nodes implement.  All methods are synchronous and page-cache fast, except
`flush`, which may block (the edges run it in a thread).  Errors are
RepdiskError subclasses carrying an errno (OutOfRange for I/O past the end)."""

from typing import Protocol

from .geometry import Geometry
from .image import RawImage


class BlockDevice(Protocol):
    size: int
    # The smallest I/O unit the device accepts without read-modify-write on the
    # client's side (NBD_INFO_BLOCK_SIZE minimum) and the preferred one.
    min_block: int
    preferred_block: int

    def pread(self, offset: int, length: int) -> bytes: ...
    def pwrite(self, buf, offset: int) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def trim(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...


class FileDevice:
    """A plain raw image as a block device (for tests and plain serving)."""

    min_block = 1
    preferred_block = 4096

    def __init__(self, image: RawImage):
        self.image = image
        self.size = image.size
        self.geometry = Geometry(image.size, 4096) if image.size else None

    def pread(self, offset: int, length: int) -> bytes:
        self.geometry.check(offset, length)
        return self.image.pread(offset, length)

    def pwrite(self, buf, offset: int) -> None:
        self.geometry.check(offset, len(buf))
        self.image.pwrite(buf, offset)

    def zero(self, offset: int, length: int) -> None:
        self.geometry.check(offset, length)
        self.image.punch(offset, length)

    trim = zero

    def flush(self) -> None:
        self.image.fsync()


class StackReplicaDevice:
    """What the secondary's NBD server serves: the replica side of a
    SecondaryStack (reads from the replica, writes with copy-before-write).
    With a ReceivedMap, every range written is marked in it (before it is
    applied: a write that fails half way counts too) and every NBD FLUSH
    turns its generations (`flush_request`, called by the server in the
    order requests arrive)."""

    min_block = 1

    def __init__(self, stack, received=None):
        self.stack = stack
        self.size = stack.size
        self.preferred_block = stack.geometry.block_size
        self.received = received
        if received is None:
            # pwrite(buf, offset) is the stack's, bound here: the hot call, no layer of its own.
            self.pwrite = stack.primary_write

    def pwrite(self, buf, offset: int) -> None:
        self.received.mark(offset, len(buf))
        self.stack.primary_write(buf, offset)

    def pread(self, offset: int, length: int) -> bytes:
        return self.stack.replica_read(offset, length)

    def write_soon(self, offset: int, length: int) -> None:
        """A write (or zero) of this range is queued: start reading what its
        copy-before-write will copy (the NBD server calls it for the
        requests it has received but not applied yet)."""
        self.stack.protect_soon(offset, length)

    def zero(self, offset: int, length: int) -> None:
        if self.received is not None:
            self.received.mark(offset, length)
        self.stack.primary_zero(offset, length)

    trim = zero

    def flush_request(self) -> None:
        if self.received is not None:
            self.received.flushed()

    def flush(self) -> None:
        self.stack.flush_replica()


class BytesDevice:
    """A read-only device over a bytes object (the received map's side export)."""

    min_block = 1
    preferred_block = 4096

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def flush(self) -> None:
        pass
