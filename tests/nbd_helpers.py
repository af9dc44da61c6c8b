"""Helpers for the NBD server tests: the server in a background thread with
its own trio.run, a raw-socket NBD client for speaking (and breaking) the
protocol by hand, and the `nbd_server` fixture.

Import the fixture into a test module with `from nbd_helpers import nbd_server`.
"""

import dataclasses
import os
import random
import shutil
import socket
import struct
import tempfile
import threading

import pytest
import trio

from repdisk.core.blockdev import FileDevice
from repdisk.core.image import RawImage
from repdisk.edge import nbdwire as w
from repdisk.edge.nbdserver import NbdServer

DEADLINE = 10.0  # seconds any single wait in these tests may take


class ServerThread:
    """Runs `server.serve(listen)` in a thread with its own trio.run.

    `call(fn, ...)` runs a plain function in the server's trio thread (the
    device and the server are not thread-safe: touch them only that way while
    the server runs); `run(afn, ...)` runs an async function there."""

    def __init__(self, server: NbdServer, listen: str):
        self.server = server
        self.listen = listen
        self.address: str | None = None
        self._token = None
        self._scope = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="nbd-server", daemon=True)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as e:  # reported by start()/stop(), not lost in the thread
            while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                e = e.exceptions[0]
            self._error = e
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                self.address = await nursery.start(self.server.serve, self.listen)
                self._ready.set()

    def start(self) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(DEADLINE):
            raise TimeoutError("NBD server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._token is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "NBD server thread did not stop"
        if self._error is not None:
            raise self._error

    def call(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def run(self, afn, *args):
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Events:
    """on_connect/on_disconnect recorder with waits against a deadline."""

    def __init__(self):
        self.cond = threading.Condition()
        self.connected: list[str] = []
        self.disconnected: list[tuple[str, str | None]] = []

    def on_connect(self, peer: str) -> None:
        with self.cond:
            self.connected.append(peer)
            self.cond.notify_all()

    def on_disconnect(self, peer: str, error: str | None) -> None:
        with self.cond:
            self.disconnected.append((peer, error))
            self.cond.notify_all()

    def wait_connects(self, n: int) -> list[str]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.connected) >= n, DEADLINE):
                raise TimeoutError(f"expected {n} connects, got {self.connected}")
            return list(self.connected)

    def wait_disconnects(self, n: int) -> list[tuple[str, str | None]]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.disconnected) >= n, DEADLINE):
                raise TimeoutError(f"expected {n} disconnects, got {self.disconnected}")
            return list(self.disconnected)


def short_tmpdir() -> str:
    """A directory with a short path (unix socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="nbd-", dir="/tmp")


def uri(address: str, export: str = "") -> str:
    """An NBD URI (libnbd and qemu syntax) for an address from NbdServer.serve."""
    if address.startswith("unix:"):
        return f"nbd+unix:///{export}?socket={address[5:]}"
    return f"nbd://{address}/{export}"


@dataclasses.dataclass
class Served:
    """What the `nbd_server` fixture yields."""

    uri: str  # nbd://HOST:PORT/disk or nbd+unix:///disk?socket=PATH
    address: str  # as NbdServer.serve reported it
    path: str  # the backing raw image
    device: FileDevice
    server: NbdServer
    thread: ServerThread
    events: Events

    def backing(self, offset: int = 0, length: int | None = None) -> bytes:
        """The backing file's bytes, read independently of the server."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(-1 if length is None else length)


EXPORT = "disk"
SIZE = 4 << 20


@pytest.fixture(params=["tcp", "unix"])
def nbd_server(request, tmp_path):
    """An NbdServer over a FileDevice (8 MiB raw image with a known pattern)
    in a background thread, over TCP and over a unix socket."""
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(pattern(SIZE))
    image = RawImage.open(path)
    device = FileDevice(image)
    events = Events()
    server = NbdServer(
        device,
        export_name=EXPORT,
        description="repdisk test disk",
        on_connect=events.on_connect,
        on_disconnect=events.on_disconnect,
    )
    sockdir = None
    if request.param == "unix":
        sockdir = short_tmpdir()
        listen = f"unix:{sockdir}/nbd.sock"
    else:
        listen = "127.0.0.1:0"
    thread = ServerThread(server, listen).start()
    try:
        yield Served(uri(thread.address, EXPORT), thread.address, path, device, server, thread, events)
    finally:
        thread.stop()
        image.close()
        if sockdir:
            shutil.rmtree(sockdir, ignore_errors=True)


def pattern(n: int, seed: int = 0) -> bytes:
    """n reproducible random bytes (misplaced or lost data shows)."""
    return random.Random(seed).randbytes(n)


# ---- a raw NBD client ----------------------------------------------------------


class RawClient:
    """Speaks NBD byte by byte: for handshake corner cases and malformed traffic."""

    def __init__(self, address: str):
        if address.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = address[5:]
        else:
            host, _, port = address.rpartition(":")
            self.sock = socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET)
            target = (host.strip("[]"), int(port))
        self.sock.settimeout(DEADLINE)
        self.sock.connect(target)
        self._handle = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def wait_closed(self) -> bool:
        """True once the server has closed the connection (EOF or reset);
        anything the server still sends before that is skipped."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    # handshake

    def greeting(self) -> int:
        magic, opt_magic, flags = w.GREETING.unpack(self.recv_exact(w.GREETING.size))
        assert magic == w.NBDMAGIC and opt_magic == w.IHAVEOPT
        return flags

    def start(self, client_flags: int = w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES) -> None:
        self.greeting()
        self.send(w.CLIENT_FLAGS.pack(client_flags))

    def option(self, option: int, data: bytes = b"") -> None:
        self.send(w.OPTION_HEADER.pack(w.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = w.OPTION_REPLY.unpack(self.recv_exact(w.OPTION_REPLY.size))
        assert magic == w.OPTION_REPLY_MAGIC
        return option, rtype, self.recv_exact(length)

    def info_request(self, option: int, name: str, infos=()) -> list[tuple[int, bytes]]:
        """Send OPT_INFO/OPT_GO; return [(reply type, data)] up to the final reply."""
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)
        self.option(option, data)
        replies = []
        while True:
            opt, rtype, payload = self.option_reply()
            assert opt == option
            replies.append((rtype, payload))
            if rtype != w.REP_INFO:
                return replies

    def go(self, name: str = "disk", infos=()) -> list[tuple[int, bytes]]:
        replies = self.info_request(w.OPT_GO, name, infos)
        assert replies[-1][0] == w.REP_ACK, replies
        return replies

    def connect(self, name: str = "disk") -> None:
        self.start()
        self.go(name)

    # transmission

    def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        self._handle += 1
        self.send(w.REQUEST.pack(w.REQUEST_MAGIC, flags, cmd, self._handle, offset, length) + data)
        return self._handle

    def reply(self, handle: int, length: int = 0) -> tuple[int, bytes]:
        """(error, data) of the simple reply to `handle`; data only on success."""
        magic, error, got = w.SIMPLE_REPLY.unpack(self.recv_exact(w.SIMPLE_REPLY.size))
        assert magic == w.SIMPLE_REPLY_MAGIC and got == handle
        return error, (self.recv_exact(length) if not error and length else b"")

    def read(self, offset: int, length: int, flags: int = 0) -> tuple[int, bytes]:
        return self.reply(self.request(w.CMD_READ, offset, length, flags=flags), length)

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        return self.reply(self.request(w.CMD_WRITE, offset, len(data), data, flags))[0]

    def simple(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0) -> int:
        return self.reply(self.request(cmd, offset, length, flags=flags))[0]

    def disc(self) -> None:
        self.request(w.CMD_DISC)


def wait_for(predicate, what: str = "condition"):
    """Poll `predicate` (cheap, in the test thread) until true or DEADLINE."""
    event = threading.Event()
    deadline = DEADLINE
    step = 0.001
    waited = 0.0
    while not predicate():
        if waited >= deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        event.wait(step)
        waited += step
        step = min(step * 2, 0.05)
    return True


def stats(served: Served) -> dict:
    return served.thread.call(served.server.statistics)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def file_size(path: str) -> int:
    return os.stat(path).st_size


class MemDevice:
    """An in-memory BlockDevice with fault injection: set `fail` to an
    exception and every call raises it."""

    min_block = 1
    preferred_block = 4096

    def __init__(self, size: int):
        self.size = size
        self.data = bytearray(size)
        self.fail: BaseException | None = None
        self.flushes = 0
        self.flush_threads: list[int] = []

    def _check(self, offset: int, length: int) -> None:
        from repdisk.core.errors import OutOfRange

        if self.fail is not None:
            raise self.fail
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(offset, length, self.size)

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.data[offset : offset + length])

    def pwrite(self, buf, offset: int) -> None:
        self._check(offset, len(buf))
        self.data[offset : offset + len(buf)] = buf

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.data[offset : offset + length] = bytes(length)

    trim = zero

    def flush(self) -> None:
        self._check(0, 0)
        self.flushes += 1
        self.flush_threads.append(threading.get_ident())


class serving:
    """`with serving(device) as (thread, events):` an NbdServer (export "disk")
    over `device` in a background thread."""

    def __init__(self, device, listen: str = "127.0.0.1:0", **kwargs):
        self.events = Events()
        kwargs.setdefault("export_name", EXPORT)
        events = self.events
        self.server = NbdServer(device, on_connect=events.on_connect, on_disconnect=events.on_disconnect, **kwargs)
        self.thread = ServerThread(self.server, listen)

    def __enter__(self):
        self.thread.start()
        return self.thread, self.events

    def __exit__(self, *exc) -> None:
        self.thread.stop()
