"""The primary against other NBD servers (plain mirrors), under faults, and
under a hypervisor's block layer (qemu-img, qemu-io, fio)."""

import errno
import mmap
import os
import random
import shutil
import signal
import subprocess
import threading

import pytest

from nodes import needs_fuse, read_file, wait_until, write_file

pytestmark = needs_fuse

SIZE = 16 << 20


def server(cmd, sock):
    log = sock + ".log"
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)
    wait_until(lambda: os.path.exists(sock) or p.poll() is not None, 20, f"{cmd[0]} socket")
    assert p.poll() is None, open(log).read()
    return p


def stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(2)  # nbdkit waits for its client (the primary, still running) to leave
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start_primary(nodes, tmp_path, uri, *extra, size=SIZE):
    pri = nodes("primary", "--disk", str(tmp_path / "pri.img"), "--size", str(size), "--secondary", uri, *extra,
                name="primary")
    pri.image = str(tmp_path / "pri.img")
    return pri


def random_writes(path, rng, count, size=SIZE):
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(count):
            n = rng.choice([1, 511, 4096, 65536, 1 << 20, rng.randrange(1, 100000)])
            off = rng.randrange(size - n)
            os.pwrite(fd, rng.randbytes(n), off)
    finally:
        os.close(fd)


def nbd_read_all(uri, size):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    out = bytearray()
    for off in range(0, size, 4 << 20):
        out += h.pread(min(4 << 20, size - off), off)
    h.shutdown()
    return bytes(out)


@pytest.mark.parametrize("target", ["qemu-nbd", "nbdkit"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_plain_mirror(nodes, tmp_path, target, mode):
    sock = str(tmp_path / "t.sock")
    if target == "qemu-nbd":
        img = tmp_path / "target.img"
        img.write_bytes(b"\xff" * SIZE)  # stale content the sync must replace
        srv = server(["qemu-nbd", "-f", "raw", "-k", sock, "--persistent", "--shared=4", "--cache=writeback", str(img)], sock)
    else:
        srv = server(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "memory", str(SIZE)], sock)
    try:
        uri = f"nbd+unix:///?socket={sock}"
        pri = start_primary(nodes, tmp_path, uri, "--mode", mode)
        pri.wait_state("replicating")
        random_writes(pri.disk, random.Random(3), 120)
        write_file(pri.disk, bytes(300000), 5000)  # an all-zero write goes as WRITE_ZEROES
        pri.command("checkpoint")
        assert pri.status()["epoch"] == 1
        assert nbd_read_all(uri, SIZE) == read_file(pri.disk)
    finally:
        stop(srv)


@pytest.mark.parametrize("fault", ["error-filter", "kill"])
def test_secondary_failure_degrades_without_failing_writes(nodes, tmp_path, fault):
    sock = str(tmp_path / "t.sock")
    trigger = tmp_path / "fail-now"
    srv = server(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "--filter=error", "memory", str(SIZE),
                  "error-pwrite=EIO", "error-pwrite-rate=100%", f"error-pwrite-file={trigger}",
                  "error-zero=EIO", "error-zero-rate=100%", f"error-zero-file={trigger}"], sock)
    try:
        pri = start_primary(nodes, tmp_path, f"nbd+unix:///?socket={sock}")
        pri.wait_state("replicating")
        rng = random.Random(5)
        random_writes(pri.disk, rng, 30)
        if fault == "kill":
            srv.kill()
            srv.wait()
        else:
            trigger.touch()
        expected = bytearray(read_file(pri.disk))
        fd = os.open(pri.disk, os.O_WRONLY)
        for i in range(50):  # every write succeeds for the VM
            off, data = rng.randrange(SIZE - 70000), rng.randbytes(rng.randrange(1, 70000))
            assert os.pwrite(fd, data, off) == len(data)
            expected[off : off + len(data)] = data
        os.fsync(fd)
        os.close(fd)
        s = pri.wait_state("degraded")
        assert s["error"] and ("lost" in s["error"])
        assert s["dirty_bytes"] > 0
        assert read_file(pri.disk) == bytes(expected)
        assert pri.command_errno("checkpoint") == errno.EBUSY
        assert pri.stop() == 0
        assert read_file(pri.image) == bytes(expected)
    finally:
        stop(srv)


def test_a_waiting_sync_write_holds_up_no_other_request(nodes, tmp_path):
    """While a sync write waits for a secondary that does not answer (stopped
    with SIGSTOP), a direct read of disk.img and the control file are still
    served: the FUSE worker blocked in the write handed the reading of
    requests to another one (fuse.reader_handoffs counts that)."""
    sock = str(tmp_path / "t.sock")
    srv = server(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "memory", str(SIZE)], sock)
    try:
        pri = start_primary(nodes, tmp_path, f"nbd+unix:///?socket={sock}", "--mode", "sync")
        pri.wait_state("replicating")
        write_file(pri.disk, b"a" * 4096, 0)
        handoffs = pri.status()["fuse"]["reader_handoffs"]
        written = threading.Event()

        def write():
            write_file(pri.disk, b"b" * 4096, 1 << 20)
            written.set()

        seen = {}

        def probe():  # what must not wait behind the write
            wait_until(lambda: pri.status()["inflight_requests"] == 1, 10, "the write to wait for its reply")
            buf = mmap.mmap(-1, 4096)
            fd = os.open(pri.disk, os.O_RDONLY | os.O_DIRECT)
            try:
                os.preadv(fd, [buf], 0)
            finally:
                os.close(fd)
            seen["read"] = bytes(buf)
            seen["write done"] = written.is_set()
            seen["handoffs"] = pri.status()["fuse"]["reader_handoffs"]

        writer = threading.Thread(target=write)
        prober = threading.Thread(target=probe, daemon=True)  # if it hangs, the test fails instead
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            writer.start()
            prober.start()
            prober.join(20)
            assert not prober.is_alive(), "the control file or a direct read waited behind the sync write"
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        assert seen["read"] == b"a" * 4096
        assert not seen["write done"]  # served while the write still waited
        assert seen["handoffs"] > handoffs
        writer.join(20)
        assert written.is_set()
        pri.command("checkpoint")
        assert nbd_read_all(f"nbd+unix:///?socket={sock}", SIZE) == read_file(pri.disk)
    finally:
        stop(srv)


def test_hypervisor_block_layer(nodes, tmp_path):
    """qemu-img and qemu-io (O_DIRECT and buffered) and fio on disk.img, replicated."""
    from test_pair_e2e import start_pair

    pri, sec = start_pair(nodes, tmp_path, size=SIZE)
    info = subprocess.run(["qemu-img", "info", "--output=json", "-f", "raw", pri.disk], capture_output=True, text=True)
    assert info.returncode == 0 and f'"virtual-size": {SIZE}' in info.stdout
    for cache in ("none", "writeback"):
        r = subprocess.run(["qemu-io", "-f", "raw", "-t", cache, "-c", "write -P 0xab 4096 65536",
                            "-c", "write -P 0xcd 1048576 1048576", "-c", "flush",
                            "-c", "read -P 0xab 4096 65536", "-c", "read -P 0xcd 1048576 1048576", pri.disk],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    if shutil.which("fio"):
        r = subprocess.run(["fio", "--name=v", f"--filename={pri.disk}", "--direct=1", "--rw=randwrite", "--bs=4k",
                            "--size=4M", "--offset=8M", "--verify=crc32c", "--do_verify=1", "--ioengine=psync",
                            "--output-format=terse"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    pri.command("checkpoint")
    sec.command("checkpoint")
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", pri.disk, sec.disk], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_file(sec.disk) == read_file(pri.disk)
