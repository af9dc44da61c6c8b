"""Catch-up and crash safety with real node processes: a secondary killed and
restarted, a primary killed during writes, split brain, foreign and damaged
metadata, online verify.  Every test asserts how many bytes were resynced."""

import errno
import os
import random
import threading

import pytest

from nodes import needs_fuse, read_file, wait_until, write_file
from test_pair_e2e import start_pair

pytestmark = needs_fuse

SIZE = 64 << 20
AL_EXTENT = 4 << 20


def reconnect(pri) -> None:
    """Ask the primary to reconnect now.  EBUSY ("already connected") means its
    own retry, every 0.5 s at first, got there first: fine."""
    err = pri.command_errno("reconnect")
    assert err in (0, errno.EBUSY), os.strerror(err)


def restart(node):
    node.kill()
    node.start()
    return node


def same_images(pri, sec):
    pri.command("checkpoint")
    sec.command("checkpoint")
    return read_file(pri.disk) == read_file(sec.disk)


def test_secondary_killed_and_restarted_resyncs_only_what_changed(nodes, tmp_path):
    pri, sec = start_pair(nodes, tmp_path, size=SIZE)
    rng = random.Random(1)
    write_file(pri.disk, rng.randbytes(4 << 20), 8 << 20)
    assert same_images(pri, sec)
    write_file(sec.disk, b"secondary VM write", 0)  # into the active overlay
    sec.kill()  # kill -9: the replica keeps what it acknowledged (page cache)
    pri.wait_state("degraded")
    changed = [(rng.randrange(SIZE // 65536) * 65536, rng.randbytes(65536)) for _ in range(5)]
    for off, data in changed:
        write_file(pri.disk, data, off)
    sec.start()
    s = sec.status()
    # The secondary VM's write went with the process (the primary may already
    # be back and syncing into the hidden overlay: its retry runs every 0.5 s).
    assert s["state"] in ("waiting", "replicating") and s["active_bytes"] == 0, s
    reconnect(pri)
    st = pri.wait_state("replicating")
    assert st["resync_kind"] == "incremental"
    assert 0 < st["sync"]["total"] <= 5 * 65536 + 4 * 4096, st["sync"]
    assert same_images(pri, sec)


@pytest.mark.parametrize("durability", ["host", "process"])
def test_primary_killed_during_writes_resyncs_a_bounded_set(nodes, tmp_path, durability):
    """kill -9 keeps the page cache: with either --al-durability the log
    bounds the resync."""
    pri, sec = start_pair(nodes, tmp_path, size=SIZE, mode="async", extra=("--al-durability", durability))
    assert pri.status()["activity_log"]["durability"] == durability
    acked = []  # (offset, data) of writes whose pwrite returned
    pending = []  # the write in progress when the primary was killed: may or may not have landed
    stop = threading.Event()

    def writer():
        rng = random.Random(2)
        fd = os.open(pri.disk, os.O_WRONLY)
        try:
            while not stop.is_set():
                off = rng.randrange(4 << 20, 16 << 20)  # three activity-log extents (4 MiB each)
                data = rng.randbytes(rng.randrange(1, 65536))
                off = min(off, (16 << 20) - len(data))
                pending[:] = [(off, data)]
                n = os.pwrite(fd, data, off)
                acked.append((off, data[:n]))  # a short write: the primary died in between
                if n < len(data):
                    return
                pending.clear()
        except OSError:
            pass  # the primary died under us
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    t = threading.Thread(target=writer)
    t.start()
    wait_until(lambda: len(acked) > 300, what="writes before the kill")
    pri.kill()
    stop.set()
    t.join()
    expected = bytearray(read_file(pri.image))
    pri.start()
    s = pri.wait_state("replicating")
    assert s["resync_kind"] == "incremental"
    # Only the extents of the activity log were resynced, not the 64 MiB disk.
    assert 0 < s["sync"]["total"] <= 4 * AL_EXTENT, s["sync"]
    model = bytearray(SIZE)
    for off, data in acked:
        model[off : off + len(data)] = data
    if pending:  # not acknowledged: either content is fine there
        off, data = pending[0]
        for i in range(len(data)):  # it may have landed in part
            model[off + i] = expected[off + i] if expected[off + i] == data[i] else model[off + i]
    assert bytes(expected) == bytes(model), "an acknowledged write is missing from the primary image"
    assert same_images(pri, sec)
    assert read_file(sec.disk) == bytes(model)


def test_split_brain_is_refused_on_both_sides_then_resolved(nodes, tmp_path):
    pri, sec = start_pair(nodes, tmp_path, size=SIZE)
    write_file(pri.disk, b"A" * 8192, 0)
    assert same_images(pri, sec)
    sec.command("failover")
    sec.wait_state("standalone")
    pri.wait_state("degraded")
    write_file(sec.disk, b"written on the secondary after failover", 1 << 20)
    write_file(pri.disk, b"written on the primary while degraded", 2 << 20)
    sec.stop()
    sec_image = read_file(sec.image)
    sec.start()  # back as a secondary, with the generation it took over
    pri.command("reconnect")
    s = pri.wait_state("split-brain")
    assert "split brain" in s["error"] and "nothing was overwritten" in s["error"]
    refused = sec.status()["nbd"]["refused"]
    pri.command("reconnect")  # the secondary refuses too (the first attempt may have met the old process)
    wait_until(lambda: sec.status()["nbd"]["refused"] > refused, what="the secondary's refusal")
    assert "split brain" in sec.status()["error"]
    assert sec.status()["state"] == "split-brain"
    pri.wait_state("split-brain")
    assert read_file(sec.image) == sec_image  # nothing overwritten
    assert pri.command_errno("checkpoint") == 16  # EBUSY
    assert pri.command_errno("resolve keep-both") == 22  # EINVAL
    pri.command("resolve discard-secondary")
    s = pri.wait_state("replicating")
    assert s["resync_kind"] == "full" and s["sync"]["done"] == SIZE
    assert same_images(pri, sec)
    assert read_file(sec.disk, 2 << 20, 9) == b"written o"


def test_secondary_of_another_pair_and_damaged_metadata(nodes, tmp_path):
    pri, sec = start_pair(nodes, tmp_path, size=SIZE)
    assert same_images(pri, sec)
    pri.stop()
    # Another primary (own image, own state dir): the secondary belongs to disk A.
    addr = sec.status()["listen"]
    other = nodes("primary", "--disk", str(tmp_path / "other.img"), "--size", str(SIZE), "--state-dir",
                  str(tmp_path / "other-state"), "--secondary", f"nbd+unix:///?socket={addr[5:]}", name="other")
    s = other.wait_state("split-brain")
    assert "another pair" in s["error"] and s["disk_id"] not in s["error"].split("holds disk")[1][:20]
    other.stop()
    # The first primary again, with its metadata file damaged: a clear line and a full sync.
    meta = tmp_path / "pri.img.meta"
    data = bytearray(meta.read_bytes())
    data[-1] ^= 0xFF
    meta.write_bytes(data)
    pri.start()
    s = pri.status()
    assert "checksum" in (s["metadata_problem"] or "")
    assert "checksum mismatch" in pri.log()
    # A new lineage for the primary: the secondary (disk A) is foreign to it now.
    s = pri.wait_state("split-brain", "replicating")
    if s["state"] == "split-brain":
        pri.command("resolve discard-secondary")
        s = pri.wait_state("replicating")
    assert s["sync"]["done"] == SIZE
    assert same_images(pri, sec)


def test_verify_finds_and_repairs_a_difference(nodes, tmp_path):
    pri, sec = start_pair(nodes, tmp_path, size=SIZE)
    write_file(pri.disk, random.Random(3).randbytes(8 << 20), 0)
    assert same_images(pri, sec)
    pri.command("verify")
    s = wait_until(lambda: (v := pri.status().get("verify")) and not v["running"] and v, what="verify")
    assert s["result"] == "identical" and s["done"] == SIZE
    # Behind the pair's back: the secondary holds the replica open; write through a second fd.
    write_file(sec.image, b"\xee" * 100, (5 << 20) + 10, fsync=True)
    write_file(sec.image, b"\xee", (40 << 20), fsync=True)
    pri.command("verify")
    s = wait_until(lambda: (v := pri.status().get("verify")) and not v["running"] and v, what="verify")
    assert s["ranges"] == [[5 << 20, (5 << 20) + 4096], [40 << 20, (40 << 20) + 4096]]
    assert s["differing_bytes"] == 8192
    pri.command("verify resync")
    wait_until(lambda: (v := pri.status().get("verify")) and not v["running"], what="verify resync")
    s = pri.wait_state("replicating")
    assert s["sync"]["total"] == 8192
    pri.command("verify")
    s = wait_until(lambda: (v := pri.status().get("verify")) and not v["running"] and v, what="verify")
    assert s["result"] == "identical"
    assert same_images(pri, sec)


def test_secondary_host_crash_means_full_sync(nodes, tmp_path):
    """A kill -9 keeps the replica's page cache; a host crash does not.  A
    secondary that finds its metadata unclean and from another boot forgets
    its lineage, so the primary sends everything."""
    from repdisk.core import meta as md

    pri, sec = start_pair(nodes, tmp_path, size=SIZE)
    write_file(pri.disk, b"x" * 4096, 0)
    sec.kill()
    path = str(tmp_path / "sec.img.meta")
    m = md.load_meta(path)
    assert not m.clean and m.disk == pri.status()["disk_id"]
    m.boot = "another-boot"  # as if the host had restarted
    md.save_meta(path, m)
    sec.start()
    assert sec.status()["disk_id"] is None
    assert "host restarted" in sec.log()
    reconnect(pri)
    s = pri.wait_state("replicating")
    assert s["resync_kind"] == "full" and s["sync"]["done"] == SIZE
    assert same_images(pri, sec)


@pytest.mark.parametrize("durability", ["host", "process"])
def test_primary_host_crash_costs_the_log_only_if_it_was_flushed(nodes, tmp_path, durability):
    """After an unclean stop across a reboot the primary trusts its activity
    log only if the log was kept durable (--al-durability host); a log kept in
    the page cache (process) may have lost extents: everything is resynced."""
    from repdisk.core import meta as md

    pri, sec = start_pair(nodes, tmp_path, size=SIZE, extra=("--al-durability", durability))
    for e in range(3):
        write_file(pri.disk, b"w" * 4096, e * AL_EXTENT + 512)
    pri.kill()
    path = str(tmp_path / "pri.img.meta")
    m = md.load_meta(path)
    assert not m.clean and m.al_host == (durability == "host") and m.boot == md.boot_id()
    m.boot = "another-boot"  # as if the host had restarted
    md.save_meta(path, m)
    pri.start()
    s = pri.wait_state("replicating")
    assert s["resync_kind"] == "incremental"
    if durability == "host":
        # The three extents, or less: replica first, the writes did not wait
        # for the log; what the log may lack, the secondary's received map has.
        assert 3 * 4096 <= s["sync"]["total"] <= 3 * AL_EXTENT, s["sync"]
    else:
        assert s["sync"]["total"] == SIZE, s["sync"]
        assert "full sync" in pri.log()
    assert same_images(pri, sec)


@pytest.mark.parametrize("seed", range(8))
def test_random_kills_of_either_node(nodes, tmp_path, seed):
    """A random workload; kill -9 of the primary or the secondary at random
    steps, restart, catch up: no acknowledged write lost, identical disks."""
    rng = random.Random(seed)
    size = 16 << 20 | 777
    pri, sec = start_pair(nodes, tmp_path, size=size, mode=rng.choice(["sync", "async"]))
    model = bytearray(size)
    kills = sorted(rng.sample(range(1, 40), 3))
    for step in range(40):
        if step in kills:
            victim = rng.choice([pri, sec])
            victim.kill()
            if victim is sec:
                for _ in range(3):  # the primary keeps writing alone
                    off = rng.randrange(size - 1)
                    data = rng.randbytes(min(rng.randrange(1, 70000), size - off))
                    write_file(pri.disk, data, off)
                    model[off : off + len(data)] = data
                pri.wait_state("degraded")
            victim.start()
            if victim is sec:
                reconnect(pri)
            s = pri.wait_state("replicating")
            assert s["resync_kind"] == "incremental", (seed, step, s)
            assert read_file(pri.disk) == bytes(model), f"seed {seed} step {step}: acknowledged write lost"
        off = rng.randrange(size - 1)
        data = bytes(rng.randrange(1, 9000)) if rng.random() < 0.1 else rng.randbytes(rng.randrange(1, 70000))
        data = data[: size - off]
        write_file(pri.disk, data, off)
        model[off : off + len(data)] = data
    assert same_images(pri, sec)
    assert read_file(sec.disk) == bytes(model)
