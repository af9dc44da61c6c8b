"""The NBD server against real peers: libnbd's tools (nbdinfo, nbdcopy, nbdsh)
and qemu's client (qemu-img, qemu-io), over TCP and a unix socket.  Data is
checked by reading the backing file, not through the server."""

import json
import os
import random
import subprocess
import sys

import pytest

from nbd_helpers import (
    EXPORT,
    SIZE,
    RawClient,
    nbd_server,  # noqa: F401  (fixture)
    pattern,
    serving,
    stats,
    tool,
    uri,
)
from repdisk.core.blockdev import StackReplicaDevice
from repdisk.core.image import RawImage
from repdisk.core.stack import SecondaryStack

TIMEOUT = 30


def run(*argv, check=True, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    # nbdsh runs "python3 -m nbd": make that our interpreter (the venv sees
    # Debian's python3-libnbd), not whatever python3 comes first in PATH.
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"
    result = subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def test_nbdinfo(nbd_server):
    info = json.loads(run("nbdinfo", "--json", nbd_server.uri).stdout)
    (export,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is False
    assert export["export-name"] == EXPORT
    assert export["description"] == "repdisk test disk"
    assert export["export-size"] == SIZE
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) == (
        1,
        4096,
        32 << 20,
    )
    assert export["can_flush"] and export["can_fua"] and export["can_trim"] and export["can_zero"]
    assert not export["can_multi_conn"] and not export["is_read_only"]


def test_nbdinfo_list(nbd_server):
    listing = json.loads(run("nbdinfo", "--list", "--json", uri(nbd_server.address)).stdout)
    assert [(e["export-name"], e["description"]) for e in listing["exports"]] == [(EXPORT, "repdisk test disk")]


def test_nbdcopy_in_and_out(nbd_server, tmp_path):
    src = tmp_path / "src.raw"
    data = pattern(SIZE, seed=1)
    src.write_bytes(data)
    run("nbdcopy", "--request-size=1048576", str(src), nbd_server.uri)
    assert nbd_server.backing() == data
    out = tmp_path / "out.raw"
    run("nbdcopy", nbd_server.uri, str(out))
    assert out.read_bytes() == data
    assert stats(nbd_server)["protocol_errors"] == 0


NBDSH_SCRIPT = """
import nbd
h.pwrite(b"A" * 5000, 1001)
assert h.pread(5000, 1001) == b"A" * 5000
h.pwrite(b"fua!", 4093, nbd.CMD_FLAG_FUA)
h.flush()
h.trim(3001, 777)
h.zero(7, 12345)
h.zero(3, 20000, nbd.CMD_FLAG_NO_HOLE)
# Let out-of-range requests reach the server instead of libnbd refusing them.
h.set_strict_mode(0)
for name, call in [("read", lambda: h.pread(2, SIZE - 1)), ("write", lambda: h.pwrite(b"xy", SIZE - 1)),
                   ("trim", lambda: h.trim(2, SIZE - 1)), ("zero", lambda: h.zero(2, SIZE - 1))]:
    try:
        call()
    except nbd.Error as e:
        print(name, "past the end:", e.errno)
print("still here:", len(h.pread(1, 0)))
"""


def test_nbdsh_unaligned_requests(nbd_server):
    model = bytearray(nbd_server.backing())
    out = run("nbdsh", "-u", nbd_server.uri, "-c", f"SIZE = {SIZE}", "-c", NBDSH_SCRIPT).stdout
    assert out.splitlines() == [
        "read past the end: EINVAL",
        "write past the end: ENOSPC",
        "trim past the end: EINVAL",
        "zero past the end: ENOSPC",
        "still here: 1",
    ]
    model[1001:6001] = b"A" * 5000
    model[4093:4097] = b"fua!"
    model[777:3778] = bytes(3001)
    model[12345:12352] = bytes(7)
    model[20000:20003] = bytes(3)
    assert nbd_server.backing() == model
    st = stats(nbd_server)
    assert st["requests"]["trim"] == 2 and st["requests"]["write_zeroes"] == 3 and st["requests"]["flush"] == 1
    assert st["error_replies"] == 4 and st["protocol_errors"] == 0


def test_qemu_img_info_compare_convert(nbd_server, tmp_path):
    info = json.loads(run("qemu-img", "info", "--output=json", nbd_server.uri).stdout)
    assert info["virtual-size"] == SIZE
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", nbd_server.path, nbd_server.uri)
    src = tmp_path / "src.raw"
    data = bytearray(pattern(SIZE, seed=2))
    data[1 << 20 : 2 << 20] = bytes(1 << 20)  # a zero run: qemu-img writes zeroes for it
    src.write_bytes(data)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), nbd_server.uri)
    assert nbd_server.backing() == data
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_server.uri, str(out))
    assert out.read_bytes() == data
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_server.uri)


def test_qemu_io(nbd_server):
    model = bytearray(nbd_server.backing())
    commands = [
        "write -P 0xab 1000 5000",
        "read -P 0xab 1000 5000",
        "write -f -P 0xcd 4097 3",  # FUA
        "flush",
        "discard 2000 1000",
        "read -P 0 2000 1000",
        "write -z 7001 123",
        "read -P 0 7001 123",
        f"read {SIZE - 512} 1024",  # past the end: an error, the session goes on
        "read -P 0xcd 4097 3",
    ]
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    result = run(*argv, nbd_server.uri, check=False)
    assert "Pattern verification failed" not in result.stdout + result.stderr
    assert "read 3/3 bytes at offset 4097" in result.stdout
    model[1000:6000] = b"\xab" * 5000
    model[4097:4100] = b"\xcd" * 3
    model[2000:3000] = bytes(1000)
    model[7001:7124] = bytes(123)
    assert nbd_server.backing() == model
    requests = stats(nbd_server)["requests"]
    assert requests["trim"] == 1 and requests["write_zeroes"] == 1


def test_busy_server_refuses_qemu_and_libnbd_with_a_message(nbd_server):
    with RawClient(nbd_server.address) as first:
        first.connect()
        result = run("qemu-img", "info", nbd_server.uri, check=False)
        assert result.returncode != 0
        assert "another NBD client" in result.stderr, result.stderr
        # libnbd 1.14 puts the server's text in its debug output only.
        result = run("nbdinfo", nbd_server.uri, check=False, env={"LIBNBD_DEBUG": "1"})
        assert result.returncode != 0
        assert "server error message: another NBD client" in result.stderr
        assert first.write(0, b"still mine") == 0
    assert nbd_server.backing(0, 10) == b"still mine"


def test_stack_replica_copy_before_write(tmp_path):
    """Served over NBD, a SecondaryStack's replica takes the primary's writes
    while the secondary's view keeps showing what it showed before (copy-
    before-write into the hidden overlay) until the checkpoint."""
    nbd = pytest.importorskip("nbd")
    size = 1 << 20
    original = pattern(size, seed=3)
    (tmp_path / "replica.img").write_bytes(original)
    replica = RawImage.open(str(tmp_path / "replica.img"))
    stack = SecondaryStack(replica, str(tmp_path / "hidden"), str(tmp_path / "active"), 4096)
    try:
        with serving(StackReplicaDevice(stack), export_name="") as (thread, events):
            # The secondary VM wrote a block of its own before.
            thread.call(stack.view_write, b"V" * 100, 50_000)
            view = bytearray(original)
            view[50_000:50_100] = b"V" * 100
            assert thread.call(stack.view_read, 0, size) == view
            h = nbd.NBD()
            h.connect_uri(uri(thread.address))
            assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
            assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
            primary = bytearray(original)
            rnd = random.Random(4)
            for _ in range(50):
                offset, length = rnd.randrange(size - 70_000), rnd.randrange(1, 70_000)
                data = rnd.randbytes(length)
                h.pwrite(data, offset)
                primary[offset : offset + length] = data
            h.zero(5_000, 10_000)
            primary[10_000:15_000] = bytes(5_000)
            h.trim(333, 900_001)
            primary[900_001:900_334] = bytes(333)
            h.flush()
            assert h.pread(size, 0) == bytes(primary)
            # The replica holds the primary's disk; the view did not move.
            assert (tmp_path / "replica.img").read_bytes() == primary
            assert thread.call(stack.view_read, 0, size) == view
            assert thread.call(lambda: stack.hidden.used_bytes) > 0
            # Checkpoint: the view becomes the primary's disk.
            thread.call(stack.checkpoint)
            assert thread.call(stack.view_read, 0, size) == primary
            h.shutdown()
            assert events.wait_disconnects(1)[0][1] is None
    finally:
        stack.close()
