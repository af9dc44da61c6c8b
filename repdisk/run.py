"""Assemble a node from parsed arguments and run it (trio.run)."""

import functools
import logging
import os

import trio

from .app import serve_node
from .cli import lock_image, state_paths
from .core.errors import ImageError
from .core.image import RawImage

log = logging.getLogger("repdisk")


def secondary_server(node, request_poll_us: int = 0):
    """The secondary's NBD server: the replica side of its stack (with the
    received map), its identity checks and side exports; `request_poll_us`:
    --request-poll-us (edge/spin.py)."""
    from .core.blockdev import StackReplicaDevice
    from .edge.nbdserver import NbdServer

    server = NbdServer(
        StackReplicaDevice(node.stack, node.received),
        export_name="",
        description=node.description,
        on_connect=node.on_connect,
        on_disconnect=node.on_disconnect,
        check_export=node.check_export,
        lock=node.io_lock,
        side_export=node.side_export,
        request_poll_s=request_poll_us / 1e6,
    )
    node.server = server
    return server


WRITE_BEHIND_DEFAULT = 8 << 20


def write_behind(image, every: int | None):
    """--write-behind: a WriteBehind thread fed by the image's large writes,
    or None when it is off.  every=None: WRITE_BEHIND_DEFAULT, on every node.

    An async primary had it off until stop 40: its stream then waited for
    activity-log stores (each an fdatasync, 5-20 ms while the disks write
    back) more often than log-ahead covered.  With LOG_AHEAD at 32 extents
    (repdisk.node.primary) that is gone, and without write-behind the
    VM's fsync after a 512 MiB stream wrote all of it at the end: 250-266
    ms of a ~690 ms job (README, *What bounds the cells it misses*)."""
    if every is None:
        every = WRITE_BEHIND_DEFAULT
    if not every:
        return None
    from .node.writebehind import WriteBehind

    behind = WriteBehind(image, idle=True)
    image.set_write_behind(every, behind.add)
    return behind


def run_secondary(args) -> int:
    from .core.stack import SecondaryStack
    from .edge.fuse import invalidate_disk
    from .node.secondary import SecondaryNode

    image = RawImage.open(args.disk, args.size)
    lock = lock_image(args.disk)
    _, prefix = state_paths(args)
    stack = SecondaryStack(image, f"{prefix}.hidden", f"{prefix}.active", args.block_size)
    node = SecondaryNode(stack, listen=args.listen, invalidate=invalidate_disk, meta_path=f"{prefix}.meta")
    node.write_behind = write_behind(image, args.write_behind)
    server = secondary_server(node, args.request_poll_us)

    async def shutdown():
        await trio.to_thread.run_sync(stack.flush_replica)
        node.meta.clean = True
        await trio.to_thread.run_sync(node._save)

    def ready():
        log.info("secondary ready: %s (%d bytes) at %s, NBD on %s", args.disk, image.size, args.mount, node.listen)

    async def nbd_service(task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            node.listen = await nursery.start(server.serve, args.listen)  # the bound address
            task_status.started()

    try:
        trio.run(functools.partial(
            serve_node, node, args.mount, "repdisk-secondary",
            services=[nbd_service], on_ready=ready, shutdown=shutdown,
            direct_writes=args.direct_writes == "on", fuse_poll_us=args.fuse_poll_us))
    finally:
        if node.write_behind is not None:
            node.write_behind.close(wait=5.0)
        stack.close()
        os.close(lock)
    return 0


def run_primary(args) -> int:
    from .core.errors import RepdiskError, SplitBrain
    from .node.primary import PrimaryNode

    image = RawImage.open(args.disk, args.size)
    lock = lock_image(args.disk)
    _, prefix = state_paths(args)
    node = PrimaryNode(image, uri=args.secondary, mode=args.mode, block_size=args.block_size,
                       async_queue=args.async_queue, assume_synced=args.assume_synced,
                       connect_timeout=args.connect_timeout, meta_path=f"{prefix}.meta",
                       al_path=f"{prefix}.al" if args.al_extents > 0 else None, al_extents=args.al_extents,
                       io_timeout=args.io_timeout, resync_rate=args.resync_rate,
                       checkpoint_flush=args.checkpoint_flush, batch=args.async_batch,
                       batch_delay=args.async_batch_delay / 1000, reply_poll_us=args.reply_poll_us,
                       al_durability=args.al_durability, replica_first=args.replica_first == "on",
                       flush_interval=args.flush_interval)
    node.write_behind = write_behind(image, args.write_behind)

    async def main():
        # Connect before mounting, so that a secondary of the wrong size is
        # refused with exit status 2 and nothing mounted.
        first = None
        try:
            with trio.fail_after(args.connect_timeout):
                first = await node.connect()
        except ImageError:
            raise
        except SplitBrain as e:
            node.split_brain(str(e))
        except (RepdiskError, trio.TooSlowError) as e:
            reason = e if not isinstance(e, trio.TooSlowError) else f"no answer within {args.connect_timeout} s"
            node.connect_failed(f"cannot connect to secondary {args.secondary}: {reason}")

        def ready():
            log.info("primary ready: %s (%d bytes) at %s, replicating to %s (%s mode)",
                     args.disk, image.size, args.mount, args.secondary, args.mode)

        await serve_node(node, args.mount, "repdisk-primary",
                         services=[functools.partial(node.supervise, first)],
                         on_ready=ready, shutdown=node.shutdown,
                         direct_writes=args.direct_writes == "on", fuse_poll_us=args.fuse_poll_us)

    try:
        trio.run(main)
    finally:
        if node.write_behind is not None:
            node.write_behind.close(wait=5.0)
        image.close()
        os.close(lock)
    return 0
