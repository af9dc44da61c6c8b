"""Command line: arguments -> configuration -> trio.run, with exit codes
0 (clean stop), 1 (runtime failure), 2 (user error: one clear line)."""

import argparse
import fcntl
import logging
import os
import sys

from .core.errors import ImageError, InvalidArgument, RepdiskError
from .core.image import parse_size
from .edge.spin import FUSE_POLL_US, REQUEST_POLL_US

log = logging.getLogger("repdisk")

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with what the user asked for: one line, exit status 2."""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except RepdiskError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _block_size(text: str) -> int:
    n = _size(text)
    if n < 512 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"block size {text} is not a power of two >= 512")
    return n


def _size_or_off(text: str) -> int:
    """A size, or 0 / 'off' for none."""
    if text.strip().lower() in ("0", "off"):
        return 0
    return _size(text)


def _number(convert, low, high, what):
    """An argparse type: `convert` (int or float) the text, within [low, high]."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_MICROSECONDS = _number(int, 0, 10000, "a number of microseconds from 0 to 10000")  # the spins' windows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repdisk", description="Replicated virtual disk (COLO-style block replication) over FUSE and NBD.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = p.add_subparsers(dest="role", required=True, metavar="{secondary,primary,pair,status}")

    def common(sp):
        sp.add_argument("--disk", required=True, help="the raw image (created sparse when missing and --size is given)")
        sp.add_argument("--mount", required=True, help="mount point; shows disk.img and control (created if missing)")
        sp.add_argument("--size", type=_size, help="disk size (e.g. 10G); must match an existing image")
        sp.add_argument("--state-dir", help="where overlays and metadata live (default: beside the image)")
        sp.add_argument("--block-size", type=_block_size, default=4096, help="tracking and copy-before-write grain (default 4096)")
        sp.add_argument("--direct-writes", choices=("on", "off"), default="off", help="on: writes of 64 KiB and more, "
                        "4 KiB aligned, from an O_DIRECT opener of disk.img (a hypervisor's cache=none) go into this "
                        "node's image past its page cache; what they wrote is then read from disk (default off: every "
                        "write goes through the page cache)")
        sp.add_argument("--write-behind", type=_size_or_off, default=None, metavar="SIZE",
                        help="after each SIZE written to this node's image in writes of 64 KiB and more (a VM "
                        "writing a big file, the primary's writes of it on the secondary), start writing them "
                        "to disk in the background, so that the VM's next fsync has only the rest to wait for "
                        "(0 or off: leave it all to the kernel and that fsync; default 8M on every node)")

        sp.add_argument("--fuse-poll-us", type=_MICROSECONDS,
                        default=FUSE_POLL_US, help="microseconds the FUSE loop may poll for the next request "
                        "before sleeping, while at least a quarter of requests come that fast (default "
                        f"{FUSE_POLL_US}; 0: always sleep; costs up to that much CPU per request)")

    s = sub.add_parser("secondary", help="run a secondary node: NBD server for the primary + FUSE view")
    common(s)
    s.add_argument("--listen", required=True, help="HOST:PORT or unix:PATH for the primary's NBD connection")
    s.add_argument("--request-poll-us", type=_MICROSECONDS,
                   default=REQUEST_POLL_US, help="microseconds the NBD server may poll for the primary's next "
                   "request before sleeping, while at least a quarter of requests come that fast and the view "
                   f"is idle (default {REQUEST_POLL_US}; 0: always sleep; costs up to that much CPU per request)")

    pr = sub.add_parser("primary", help="run a primary node: FUSE disk replicated over NBD")
    common(pr)
    pr.add_argument("--secondary", required=True, help="NBD URI of the secondary, e.g. nbd://127.0.0.1:10809 or 'nbd+unix:///?socket=/run/x.sock'")
    pr.add_argument("--mode", choices=("sync", "async"), default="sync", help="sync: a write returns after the secondary has it (default); async: after the local write")
    pr.add_argument("--async-queue", type=_size, default=64 << 20, help="async mode: bytes replication may trail behind (default 64M)")
    pr.add_argument("--async-batch", type=_number(int, 0, 4096, "a batch size from 0 to 4096"), default=1, help="async mode: small writes sent to the secondary "
                    "together, up to this many (default 1: each at once, 0 too; batches cost more than they save "
                    "while both nodes poll for their next request)")
    pr.add_argument("--async-batch-delay", type=_number(float, 0, 1000, "a delay from 0 to 1000 ms"), default=5.0, help="async mode: milliseconds the first write "
                    "of a batch may wait for others (default 5; 0: no batching); a checkpoint or flush sends at once")
    pr.add_argument("--reply-poll-us", type=_MICROSECONDS, default=200,
                    help="sync mode: microseconds a write may poll for the secondary's reply before sleeping, "
                    "while at least a quarter of replies come that fast (default 200; 0: always sleep; costs up to that much CPU per write)")
    pr.add_argument("--assume-synced", action="store_true", help="skip the initial full sync (the images are known identical)")
    pr.add_argument("--connect-timeout", type=_number(float, 0.001, 86400, "a number of seconds from 0.001 to 86400"), default=10.0, help="seconds to wait for the secondary at start (default 10)")
    pr.add_argument("--io-timeout", type=_number(float, 0, 86400, "a number of seconds from 0 to 86400"), default=10.0, help="seconds without any reply from the secondary, "
                    "requests in flight, before it is declared lost (default 10; 0: never)")
    pr.add_argument("--resync-rate", type=_size, default=0, help="bytes per second for (re)sync, e.g. 100M "
                    "(default: unlimited), so that a resync does not starve the VM")
    pr.add_argument("--al-extents", type=_number(int, 0, 1 << 20, "a number of extents from 0 to 1048576"), default=1024, help="activity log: 4 MiB extents kept active; a crash "
                    "costs at most this many x 4 MiB of resync (default 1024 = 4 GiB; 0: no log, a crash costs a full sync)")
    pr.add_argument("--al-durability", choices=("host", "process"), default="host", help="host (default): the log "
                    "is flushed before a write enters a new extent, so a host crash too costs at most the log's "
                    "extents of resync; process: the log stays in the page cache, much faster for writes spread "
                    "over a large disk; a crash of repdisk costs the same, a crash of the host a full sync")
    pr.add_argument("--replica-first", choices=("on", "off"), default="on", help="sync mode with --al-durability "
                    "host: a write into an extent the log does not hold yet goes to the secondary first and to this "
                    "disk once the secondary answered, so it does not wait for the log's flush; the secondary keeps "
                    "a map of such writes until both sides flushed, which a crashed primary reads back (default on; "
                    "off: every such write waits for the log's flush)")
    pr.add_argument("--flush-interval", type=_number(float, 0, 3600, "a number of seconds from 0 to 3600"), default=30.0,
                    help="while replica-first writes are unflushed, both disks are flushed this many seconds after "
                    "the last flush, or sooner once such writes touched 256 MiB: bounds what a crash of this host "
                    "resyncs (default 30; 0: only when the VM flushes)")

    pr.add_argument("--checkpoint-flush", action="store_true", help="every checkpoint also sends NBD FLUSH, so the "
                    "replica is durable up to the last checkpoint (default: a checkpoint waits for the secondary's "
                    "acknowledgements only, which is all COLO needs; 'checkpoint flush' does it once)")

    pa = sub.add_parser("pair", help="run a primary and a secondary on this machine (tools/run)")
    pa.add_argument("--root", default=".", help="folder holding state/ and mount/ (default: current)")
    pa.add_argument("--size", default="1G", help="disk size of new images (default 1G)")
    pa.add_argument("--mode", choices=("sync", "async"), default="sync")
    pa.add_argument("--direct-writes", choices=("on", "off"), default="off", help="as for each node (default off)")
    pa.add_argument("--write-behind", type=_size_or_off, default=None, metavar="SIZE",
                    help="as for each node (default: each node's)")

    st = sub.add_parser("status", help="print a node's status (the control file) and exit")
    st.add_argument("mount", help="the node's mount point")
    return p


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format=f"repdisk-{args.role} %(levelname)s: %(message)s")


def lock_image(path: str):
    """Hold an exclusive lock on the image so a second node cannot use it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{path}: image is in use by another repdisk node") from None
    return fd


def state_paths(args) -> tuple[str, str]:
    """(directory, file prefix) for a node's overlays and metadata."""
    disk = os.path.abspath(args.disk)
    d = os.path.abspath(args.state_dir) if args.state_dir else os.path.dirname(disk)
    os.makedirs(d, exist_ok=True)
    return d, os.path.join(d, os.path.basename(disk))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        if args.role == "status":
            with open(os.path.join(args.mount, "control")) as f:
                sys.stdout.write(f.read())
            return 0
        if args.role == "pair":
            from .pair import run_pair

            return run_pair(args)
        if args.role == "secondary":
            from .run import run_secondary

            return run_secondary(args)
        if args.role == "primary":
            from .run import run_primary

            return run_primary(args)
    except (UserError, RepdiskError) as e:
        print(f"repdisk {args.role}: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (UserError, ImageError, InvalidArgument)) else 1
    except OSError as e:
        print(f"repdisk {args.role}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 1
