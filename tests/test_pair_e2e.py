"""The replicated pair end to end: both nodes as processes with real mounts,
a seeded random workload checked against the model after every step."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import zlib

import pytest

from model import PairModel
from nodes import lazy_unmount, needs_fuse, read_file, wait_until, write_file

from repdisk.core.image import cachestat

pytestmark = needs_fuse

SIZE = 8 << 20 | 1234  # not a multiple of the block size: the last block is short


def start_pair(nodes, tmp_path, transport="unix", mode="sync", size=SIZE, extra=(), both=(), secondary=()):
    """extra: primary options; both: options for both nodes; secondary: the secondary's."""
    if transport == "unix":
        listen = f"unix:{tmp_path}/sec.sock"
    else:
        listen = "127.0.0.1:0"
    sec = nodes("secondary", "--disk", str(tmp_path / "sec.img"), "--size", str(size), "--listen", listen,
                *both, *secondary, name="secondary")
    addr = sec.status()["listen"]
    uri = f"nbd+unix:///?socket={addr[5:]}" if addr.startswith("unix:") else f"nbd://{addr}"
    pri = nodes("primary", "--disk", str(tmp_path / "pri.img"), "--size", str(size), "--secondary", uri,
                "--mode", mode, *extra, *both, name="primary")
    pri.wait_state("replicating")
    sec.image, pri.image = str(tmp_path / "sec.img"), str(tmp_path / "pri.img")
    return pri, sec


def checkpoint(pri, sec, model):
    pri.command("checkpoint")
    sec.command("checkpoint")
    model.checkpoint()


@pytest.mark.parametrize("transport,mode", [("unix", "sync"), ("tcp", "sync"), ("unix", "async"), ("tcp", "async")])
@pytest.mark.parametrize("ending", ["secondary_failover", "primary_failover", "stop"])
def test_random_workload_matches_model(nodes, tmp_path, transport, mode, ending):
    # str hashes differ per process: a checksum keeps each case's sequence the same on every run
    seed = zlib.crc32(f"{transport}-{mode}-{ending}".encode())
    rng = random.Random(seed)
    pri, sec = start_pair(nodes, tmp_path, transport, mode, both=("--direct-writes", "on"))
    model = PairModel(SIZE)
    epoch = 0
    kinds = ["aligned", "large", "unaligned", "end", "zero", "direct", "secondary", "secondary",
             "secondary-direct", "checkpoint"]
    # every kind at least once (the checks after the loop rely on it), in a seeded order
    plan = rng.sample(kinds, len(kinds)) + [rng.choice(kinds) for _ in range(35)]
    for step, kind in enumerate(plan):
        if kind == "checkpoint":
            checkpoint(pri, sec, model)
            epoch += 1
            assert read_file(sec.disk) == bytes(model.primary), f"seed {seed} step {step}: view != primary after checkpoint"
            continue
        if kind == "aligned":
            off, n = rng.randrange(SIZE // 4096) * 4096, 4096 * rng.randrange(1, 5)
        elif kind == "large":
            off, n = rng.randrange(SIZE - (1 << 20)), 1 << 20
        elif kind == "end":
            n = rng.randrange(1, 10000)
            off = SIZE - n
        elif kind.endswith("direct"):  # O_DIRECT, as a hypervisor's cache=none: aligned, mostly large
            off, n = rng.randrange(SIZE // 4096) * 4096, 4096 * rng.randrange(1, 257)
        else:
            off, n = rng.randrange(SIZE - 1), rng.randrange(1, 20000)
        n = min(n, SIZE - off)
        data = bytes(n) if kind == "zero" else rng.randbytes(n)
        direct = kind.endswith("direct")
        if kind.startswith("secondary"):
            write_file(sec.disk, data, off, direct=direct)
            model.secondary_write(off, data)
        else:
            write_file(pri.disk, data, off, direct=direct)
            model.primary_write(off, data)
        assert read_file(pri.disk) == bytes(model.primary), f"seed {seed} step {step}: primary disk"
        assert read_file(sec.disk) == bytes(model.view), f"seed {seed} step {step}: secondary view"
    s = pri.status()
    assert s["state"] == "replicating" and s["epoch"] == epoch and s["error"] is None
    # the O_DIRECT writes took the image's direct path on both nodes
    assert s["direct_write_bytes"] > 0 and sec.status()["direct_write_bytes"] > 0
    # sync mode: lone writes were answered inline (the front end found its FUSE device),
    # some of them polled for (--reply-poll-us, on by default in sync mode)
    assert (s["link"]["inline_replies"] > 0) == (mode == "sync"), s["link"]
    assert (s["link"]["reply_polls"] > 0) == (mode == "sync"), s["link"]
    if ending == "secondary_failover":
        view = read_file(sec.disk)
        sec.command("failover")
        sec.wait_state("standalone")
        assert read_file(sec.disk) == view == bytes(model.view)
        pri.wait_state("degraded")  # the primary notices its secondary is gone
        write_file(pri.disk, b"alone", 100)
        model.primary_write(100, b"alone", replicate=False)
        assert read_file(pri.disk) == bytes(model.primary)
        assert sec.stop() == 0
        assert read_file(sec.image) == view
    elif ending == "primary_failover":
        pri.command("failover")
        assert pri.status()["state"] == "standalone"
        write_file(pri.disk, b"alone", 100)
        model.primary_write(100, b"alone", replicate=False)
        assert read_file(pri.disk) == bytes(model.primary)
        assert read_file(sec.disk) == bytes(model.view)
        assert pri.stop() == 0
        assert read_file(pri.image) == bytes(model.primary)
    else:
        checkpoint(pri, sec, model)
        assert pri.stop() == 0 and sec.stop() == 0
        assert read_file(pri.image) == read_file(sec.image) == bytes(model.primary)


def test_initial_sync_copies_existing_data(nodes, tmp_path):
    rng = random.Random(7)
    size = 24 << 20
    data = bytearray(size)
    for i in range(0, size, 3 << 20):  # data with holes between
        data[i : i + (1 << 20)] = rng.randbytes(1 << 20)
    (tmp_path / "pri.img").write_bytes(data)
    pri, sec = start_pair(nodes, tmp_path, size=size)
    s = pri.status()
    assert s["sync"]["done"] == s["sync"]["total"] == size
    assert pri.command_errno("checkpoint") == 0
    sec.command("checkpoint")
    assert read_file(sec.disk) == bytes(data)
    # holes went over as WRITE_ZEROES: the replica stays sparse
    assert os.stat(sec.image).st_blocks * 512 < size // 2


def test_secondary_of_another_size_is_refused(nodes, tmp_path):
    sec = nodes("secondary", "--disk", str(tmp_path / "sec.img"), "--size", "4M", "--listen", f"unix:{tmp_path}/s.sock")
    r = subprocess.run([sys.executable, "-m", "repdisk", "primary", "--disk", str(tmp_path / "p.img"), "--size", "8M",
                        "--secondary", f"nbd+unix:///?socket={tmp_path}/s.sock", "--mount", str(tmp_path / "pm")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("repdisk primary: ") and "4194304" in last and "8388608" in last
    assert not os.path.ismount(tmp_path / "pm")
    assert sec.status()["state"] == "waiting"


@pytest.mark.parametrize("option,value", [("--async-batch", "-3"), ("--async-batch", "many"),
                                          ("--async-batch-delay", "nan"), ("--io-timeout", "-1"),
                                          ("--connect-timeout", "0"), ("--al-extents", "1.5"),
                                          ("--reply-poll-us", "-1"), ("--reply-poll-us", "20000"),
                                          ("--fuse-poll-us", "-1"), ("--fuse-poll-us", "20000")])
def test_bad_numbers_are_refused_before_anything_happens(tmp_path, option, value):
    r = subprocess.run([sys.executable, "-m", "repdisk", "primary", "--disk", str(tmp_path / "p.img"), "--size", "1M",
                        "--mount", str(tmp_path / "m"), "--secondary", "nbd://127.0.0.1:1", option, value],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"argument {option}: {value!r} is not" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "p.img").exists() and not (tmp_path / "m").exists()


def test_concurrent_writers_replicate(nodes, tmp_path):
    import threading

    pri, sec = start_pair(nodes, tmp_path, mode="async", extra=("--async-batch", "64"))
    errors = []

    def writer(i):
        try:
            rng = random.Random(i)
            fd = os.open(pri.disk, os.O_WRONLY)
            for _ in range(200):
                if i < 2:  # disjoint halves
                    off = i * (SIZE // 2) + rng.randrange(SIZE // 2 - 65536)
                else:  # everyone's range
                    off = rng.randrange(SIZE - 65536)
                os.pwrite(fd, rng.randbytes(rng.randrange(1, 65536)), off)
            os.close(fd)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    pri.command("checkpoint")
    sec.command("checkpoint")
    assert read_file(sec.disk) == read_file(pri.disk)
    link = pri.status()["link"]
    assert link["batched_requests"] > link["batches"] > 0  # async writes went out in batches (--async-batch 64)


@pytest.mark.parametrize("flag", [False, True])
def test_checkpoint_flushes_only_when_asked(nodes, tmp_path, flag):
    """A checkpoint waits for the secondary's acknowledgements (all COLO needs);
    NBD FLUSH goes out with `checkpoint flush` or --checkpoint-flush only."""
    pri, sec = start_pair(nodes, tmp_path, mode="async", extra=("--checkpoint-flush",) if flag else ())
    model = PairModel(SIZE)
    rng = random.Random(3)

    def flushes():
        return sec.status()["nbd"]["requests"]["flush"]

    for _ in range(20):
        off, data = rng.randrange(SIZE - 8192), rng.randbytes(rng.randrange(1, 8192))
        write_file(pri.disk, data, off)
        model.primary_write(off, data)
    before = flushes()
    checkpoint(pri, sec, model)
    assert flushes() == before + (1 if flag else 0)
    assert read_file(sec.disk) == bytes(model.view) == bytes(model.primary)
    pri.command("checkpoint flush")
    assert flushes() == before + (2 if flag else 1)
    assert pri.command_errno("checkpoint later") == errno.EINVAL
    assert "checkpoint 'later'" in pri.status()["error"]


def cached_pages(path: str) -> int:
    """Pages of `path` in the page cache, by cachestat(2) (Linux 6.5)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = cachestat(fd, 0, 0)  # length 0: to the end
    finally:
        os.close(fd)
    if st is None:
        pytest.skip("no cachestat(2) in this kernel")
    return st[0]


def test_disk_img_is_not_cached_twice(nodes, tmp_path):
    """disk.img is direct I/O on both nodes (as QEMU's FUSE export): buffered
    reads and writes reach repdisk as issued and the data sits in the page
    cache once, as the image file's, not a second time as disk.img's."""
    pri, sec = start_pair(nodes, tmp_path)
    data = random.Random(5).randbytes(4 << 20)
    for node in (pri, sec):
        write_file(node.disk, data, 0)  # buffered: no O_DIRECT
        assert read_file(node.disk, 0, len(data)) == data
        assert cached_pages(node.disk) == 0, node.role
    assert cached_pages(pri.image) >= len(data) // 4096  # where the data is cached
    # No readahead either, so tools are told to read in 1 MiB pieces.
    assert os.stat(pri.disk).st_blksize == 1 << 20
    assert subprocess.run(["cmp", pri.disk, pri.image]).returncode == 0


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def test_write_buffers_reuse_the_heap(nodes, tmp_path):
    """Each 1 MiB write reaches the primary as a new 1 MiB bytes object; the
    node keeps freed heap memory mapped (repdisk.app.keep_heap), so those come
    from pages it faulted in before, not fresh ones.  With glibc's defaults
    the count depends on how many writes are in flight (2-25 faults per MiB
    in this test, ~100 under fio); tests/test_keep_heap.py shows the setting
    itself deterministically."""
    # At most 4 MiB of writes in flight: the heap needs ~6 MiB (1,536 pages) at most.
    pri, _ = start_pair(nodes, tmp_path, size=32 << 20, mode="async", extra=("--async-queue", "4M"))
    chunk = random.Random(6).randbytes(1 << 20)
    fd = os.open(pri.disk, os.O_WRONLY)
    try:
        def write_all():
            for off in range(0, 32 << 20, 1 << 20):
                assert os.pwrite(fd, chunk, off) == len(chunk)

        write_all()  # the heap grows to what the writes need
        before = minor_faults(pri.proc.pid)
        for _ in range(8):  # 256 MiB
            write_all()
        faults = minor_faults(pri.proc.pid) - before
    finally:
        os.close(fd)
    assert faults < 2048, f"{faults / 256:.1f} minor faults per MiB written"
    assert pri.status()["state"] == "replicating"
    assert subprocess.run(["cmp", pri.disk, pri.image]).returncode == 0


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_repdisk_pair_runs_the_main_job_and_stops_on_a_signal(tmp_path, stop):
    """`repdisk pair` (what tools/run starts): both nodes come up under
    ROOT/mount, a write to the primary reaches the secondary's view after a
    checkpoint on both, and SIGINT or SIGTERM stops both nodes and unmounts,
    also when SIGINT came in ignored (a background job of a shell script)."""
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-m", "repdisk", "pair", "--root", str(root), "--size", "16M"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    pri, sec = root / "mount" / "primary", root / "mount" / "secondary"
    try:
        wait_until(lambda: _replicating(pri / "control"), timeout=60, what="the pair to replicate")
        data = random.Random(3).randbytes(1 << 20)
        write_file(str(pri / "disk.img"), data, 5 << 20, fsync=True)
        for mount in (pri, sec):
            with open(mount / "control", "w") as f:
                f.write("checkpoint\n")
        assert read_file(str(sec / "disk.img"), 5 << 20, 1 << 20) == data
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            for mount in (pri, sec):
                lazy_unmount(str(mount))
    assert proc.returncode == 0, out
    assert "pair stopped" in out
    with open("/proc/mounts") as f:
        mounted = f.read()
    assert str(pri) not in mounted and str(sec) not in mounted


def _replicating(control) -> bool:
    try:
        with open(control) as f:
            return json.load(f)["state"] == "replicating"
    except (OSError, ValueError):
        return False


@pytest.mark.skipif(not shutil.which("fincore"), reason="needs fincore (util-linux)")
@pytest.mark.parametrize("setting", ["on", "off"])
def test_o_direct_writers_leave_the_nodes_page_caches_alone(nodes, tmp_path, setting):
    """With --direct-writes on, disk.img opened with O_DIRECT (a hypervisor's
    cache=none): its large aligned writes go past the primary image's page
    cache and, on the secondary's view, past the active overlay's; the
    replica takes the primary's writes through its page cache as always.
    Buffered writers fill the page cache, so the check can tell the two
    apart; with the option off (the default) O_DIRECT writers do too."""
    size = 32 << 20
    pri, sec = start_pair(nodes, tmp_path, size=size, both=("--direct-writes", setting))
    on = setting == "on"
    assert pri.status()["direct_writes"] is on and sec.status()["direct_writes"] is on

    def resident(path):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", path],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    active = sec.image + ".active"
    model = PairModel(size)
    rng = random.Random(11)
    for path, off, n, write in ((pri.disk, 0, 8 << 20, model.primary_write),
                                (sec.disk, 16 << 20, 4 << 20, model.secondary_write)):
        data = rng.randbytes(n)
        write_file(path, data, off, fsync=True, direct=True)
        write(off, data)
    assert pri.status()["direct_write_bytes"] == (8 << 20 if on else 0)
    assert sec.status()["direct_write_bytes"] == (4 << 20 if on else 0)
    if not on:
        assert resident(pri.image) >= 8 << 20 and resident(active) >= 4 << 20
        assert read_file(pri.disk) == bytes(model.primary) and read_file(sec.disk) == bytes(model.view)
        return
    assert resident(pri.image) == 0 and resident(active) == 0
    assert resident(sec.image) >= 8 << 20  # the replicated writes: no O_DIRECT on the wire
    assert read_file(pri.disk) == bytes(model.primary) and read_file(sec.disk) == bytes(model.view)

    data = rng.randbytes(4 << 20)  # the same through the page cache
    write_file(pri.disk, data, 8 << 20)
    model.primary_write(8 << 20, data)
    write_file(sec.disk, data, 24 << 20)
    model.secondary_write(24 << 20, data)
    assert pri.status()["direct_write_bytes"] == 8 << 20 and sec.status()["direct_write_bytes"] == 4 << 20
    assert resident(pri.image) >= 4 << 20 and resident(active) >= 4 << 20
    assert read_file(pri.disk) == bytes(model.primary) and read_file(sec.disk) == bytes(model.view)
    checkpoint(pri, sec, model)
    assert read_file(sec.disk) == read_file(pri.disk) == bytes(model.primary)


@pytest.mark.parametrize("setting", ["2M", "off"])
def test_write_behind_hands_a_streams_writes_to_write_back_on_both_nodes(nodes, tmp_path, setting):
    """--write-behind: a VM writing 8 MiB in 1 MiB writes has them handed to
    write-back as they come, on the primary's image and, as they arrive,
    on the secondary's; the control file says so.  Off: nothing is."""
    size = 32 << 20
    pri, sec = start_pair(nodes, tmp_path, size=size, both=("--write-behind", setting))
    data = random.Random(5).randbytes(8 << 20)
    for i in range(8):  # from page-aligned memory: FUSE hands each over as one 1 MiB write
        write_file(pri.disk, data[i << 20 : (i + 1) << 20], (4 << 20) + (i << 20), direct=True)
    pri.command("checkpoint")
    sec.command("checkpoint")
    if setting == "off":
        assert pri.status()["write_behind"] is None and sec.status()["write_behind"] is None
    else:
        for node in (pri, sec):
            wait_until(lambda: node.status()["write_behind"]["started_bytes"] == 8 << 20,
                       what=f"{node.role}'s write-behind of 8 MiB")
            assert node.status()["write_behind"]["every_bytes"] == 2 << 20
    assert read_file(pri.disk) == read_file(sec.disk)
    assert read_file(pri.disk)[4 << 20 : 12 << 20] == data


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_write_behind_defaults(nodes, tmp_path, mode):
    """8 MiB on the secondary and on the primary in either mode
    (run.write_behind says why an async primary has it too)."""
    pri, sec = start_pair(nodes, tmp_path, mode=mode)
    assert sec.status()["write_behind"]["every_bytes"] == 8 << 20
    assert pri.status()["write_behind"]["every_bytes"] == 8 << 20


def test_large_writes_drop_the_scattered_pages_small_writes_left(nodes, tmp_path):
    """A guest's 4 KiB writes, synced, then 1 MiB writes over the same
    range: on the primary's image, and on the secondary's after failover,
    each 1 MiB write first drops the clean pages the small ones left (see
    RawImage._drop_fragments), and `control` counts it.  Before failover
    the view's writes stay dirty in the active overlay (its fsync has
    nothing to make durable), and dirty pages are never dropped.  The data
    is the model's throughout."""
    size = 24 << 20
    pri, sec = start_pair(nodes, tmp_path, size=size)
    model = PairModel(size)
    rng = random.Random(5)
    region = 4 << 20

    def small_then_large(node, base, write) -> int:
        drops = node.status()["page_cache_drops"]
        fd = os.open(node.disk, os.O_WRONLY)
        try:
            for off in range(base, base + region, 16 << 10):
                data = rng.randbytes(4096)
                os.pwrite(fd, data, off)
                write(off, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        data = rng.randbytes(region)
        write_file(node.disk, data, base, fsync=True)
        write(base, data)
        return node.status()["page_cache_drops"] - drops

    assert small_then_large(pri, 0, model.primary_write) == region >> 20
    assert small_then_large(sec, 8 << 20, model.secondary_write) == 0  # dirty overlay pages
    assert read_file(pri.disk) == bytes(model.primary) and read_file(sec.disk) == bytes(model.view)
    checkpoint(pri, sec, model)
    assert read_file(sec.disk) == read_file(pri.disk) == bytes(model.primary)
    sec.command("failover")
    model.failover()
    fd = os.open(sec.image, os.O_RDONLY)  # the reads above cached it all: as memory pressure would,
    try:                                  # drop that, so the small writes leave it cached in part
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert small_then_large(sec, 16 << 20, model.secondary_write) == region >> 20  # now the image's
    assert read_file(sec.disk) == bytes(model.view)
