"""Errors of the block core and the node layer.

Every error carries the errno the edges report: the FUSE adapter raises
FUSEError(e.errno), the NBD server replies with the matching NBD error, the CLI
prints str(e) and exits non-zero.  Anything that is not a RepdiskError is a bug
and is reported as EIO.
"""

import errno as _errno


class RepdiskError(Exception):
    errno = _errno.EIO


class OutOfRange(RepdiskError):
    """I/O that starts or ends past the end of the disk."""

    errno = _errno.ENOSPC

    def __init__(self, offset: int, length: int, size: int):
        super().__init__(f"I/O of {length} bytes at offset {offset} is past the end of the disk ({size} bytes)")
        self.offset, self.length, self.size = offset, length, size


class InvalidArgument(RepdiskError):
    errno = _errno.EINVAL


class UnknownCommand(InvalidArgument):
    pass


class Busy(RepdiskError):
    """A command that is not allowed in the node's current state."""

    errno = _errno.EBUSY


class TryAgain(RepdiskError):
    """A command that will be allowed later (for example checkpoint while syncing)."""

    errno = _errno.EAGAIN


class ImageError(RepdiskError):
    """A disk image that cannot be used as asked (missing, wrong size, unreadable)."""

    errno = _errno.EINVAL


class IOFailure(RepdiskError):
    """An I/O error from a file or a peer, with the failing operation named."""

    def __init__(self, what: str, err: OSError | None = None):
        self.errno = err.errno if err is not None and err.errno else _errno.EIO
        super().__init__(f"{what}: {err.strerror if err is not None and err.strerror else err}")


class ReadOnly(RepdiskError):
    errno = _errno.EROFS


class SplitBrain(RepdiskError):
    """The secondary holds data the primary does not have (or another disk):
    nothing is overwritten until an operator says which side wins."""

    errno = _errno.EPERM
