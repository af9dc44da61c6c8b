"""The root of a node's process: one nursery owns the FUSE loop, the NBD
server or replica link, and the signal watcher; shutdown runs in one order:
stop taking I/O, flush, unmount, close."""

import ctypes
import ctypes.util
import logging
import signal

import pyfuse3
import trio

from .edge import fuseloop
from .edge.fuse import DiskFS, fuse_device_fd, mount_options, prepare_mountpoint
from .edge.spin import FUSE_POLL_US

log = logging.getLogger(__name__)

# pyfuse3 worker tasks: a few waiting for requests, more while handlers wait
# (sync replication, fsync).  tools/benchlib/passthrough.py uses the same.
FUSE_MIN_TASKS, FUSE_MAX_TASKS = 4, 64

# glibc malloc: allocations below MALLOC_MMAP_MAX come from the heap, and up to
# MALLOC_KEEP_FREE bytes freed at its top stay mapped.  pyfuse3 hands every
# write over as a new bytes object (up to 1 MiB), held until the replica
# acknowledges it; with glibc's defaults (a dynamic mmap threshold, a trim
# threshold of twice that) about half of those came from fresh pages: ~100
# minor faults per MiB written on the primary, and a fault costs a lot on a
# VM whose balloon reports free pages to the host.  Kept, the heap is reused:
# ~3 faults per MiB, ~18% more 1 MiB async writes (see the closing note of
# stop 16 on issue 4).  The price: up to MALLOC_KEEP_FREE of freed memory
# stays in the node's RSS after a burst.
MALLOC_MMAP_MAX = 4 << 20
MALLOC_KEEP_FREE = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_heap() -> bool:
    """Apply the malloc settings above to this process.  False where the C
    library has no mallopt (not glibc) or refuses a setting: the process
    then runs with the C library's defaults."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_MAX) and mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_FREE))


async def serve_node(node, mountpoint: str, fsname: str, services=(), on_ready=None, shutdown=None,
                     direct_writes: bool = False, fuse_poll_us: int = FUSE_POLL_US) -> None:
    """Mount `node` at `mountpoint` and run until SIGINT/SIGTERM or an external
    unmount.  `services` are async callables `f(task_status=...)` started
    (and waited ready) before the mount; `shutdown` is an async callable run
    before unmounting; `on_ready` a plain callable run once mounted;
    `direct_writes`: see DiskFS; `fuse_poll_us`: see edge/fuseloop.py."""
    prepare_mountpoint(mountpoint)
    if not keep_heap():
        log.info("malloc settings not applied (no glibc mallopt): write buffers may come from fresh pages")
    ops = DiskFS(node, direct_writes=direct_writes)
    async with trio.open_nursery() as nursery:
        for service in services:
            await nursery.start(service)
        pyfuse3.init(ops, mountpoint, mount_options(fsname))
        if hasattr(node, "fuse_fd"):
            node.fuse_fd = fuse_device_fd()
        stop = _Stop()
        unmounted = False
        try:
            nursery.start_soon(_watch_signals, stop)
            nursery.start_soon(_raise_max_background, mountpoint)
            if on_ready is not None:
                on_ready()
            # main() returns after pyfuse3.terminate() (a signal) or when the
            # file system was unmounted from outside.
            with fuseloop.installed(fuse_poll_us / 1e6):
                await pyfuse3.main(min_tasks=FUSE_MIN_TASKS, max_tasks=FUSE_MAX_TASKS)
            unmounted = not stop.requested
            if unmounted:
                log.warning("%s was unmounted from outside; stopping", mountpoint)
        finally:
            # Order: no more I/O (the loop has ended), unmount, then drain and
            # flush while the services still run, then stop them.
            with trio.CancelScope(shield=True):
                pyfuse3.close(unmount=not unmounted)
                if shutdown is not None:
                    try:
                        await shutdown()
                    except Exception:
                        log.exception("error while shutting down")
            nursery.cancel_scope.cancel()


class _Stop:
    requested = False


async def _watch_signals(stop: _Stop) -> None:
    """SIGINT/SIGTERM end the FUSE loop; the services (NBD server, replica
    link) keep running until the node's shutdown has drained them."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("got %s: stopping", signal.Signals(signum).name)
            stop.requested = True
            pyfuse3.terminate()
            return


async def _raise_max_background(mountpoint: str, value: int = 64) -> None:
    """Let the kernel keep more than 12 background requests in flight to us
    (best effort: needs fusectl mounted at /sys/fs/fuse/connections and root).
    The stat runs in a thread: it is answered by our own FUSE loop."""
    import os

    try:
        dev = (await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev
        with open(f"/sys/fs/fuse/connections/{os.minor(dev)}/max_background", "w") as f:
            f.write(str(value))
    except OSError as e:
        log.debug("cannot raise max_background: %s", e)
