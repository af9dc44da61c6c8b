"""The FUSE front end's one errno boundary (repdisk.edge.fuse.fuse_errors):
each error becomes its errno, and a failing disk is logged as an error while
a caller's own mistake is not."""

import errno
import logging

import pyfuse3
import pytest
import trio

from repdisk.core.errors import IOFailure, OutOfRange
from repdisk.edge.fuse import fuse_errors


def call(exc):
    @fuse_errors
    async def handler():
        raise exc

    async def main():
        with pytest.raises(pyfuse3.FUSEError) as e:
            await handler()
        return e.value.errno

    return trio.run(main)


def test_a_failing_disk_keeps_its_errno_and_is_logged_as_an_error(caplog):
    caplog.set_level(logging.DEBUG, logger="repdisk")
    err = call(IOFailure("fsync /images/pri.raw", OSError(errno.ENOSPC, "No space left on device")))
    assert err == errno.ENOSPC
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "fsync /images/pri.raw: No space left on device" in errors[0].getMessage()


def test_a_range_past_the_end_is_the_callers_error_not_logged_loudly(caplog):
    caplog.set_level(logging.DEBUG, logger="repdisk")
    assert call(OutOfRange(1 << 30, 4096, 1 << 30)) == errno.ENOSPC
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_unexpected_exception_is_eio_with_its_traceback(caplog):
    assert call(ZeroDivisionError()) == errno.EIO
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
