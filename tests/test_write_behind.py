"""Write-behind (--write-behind): an image hands the span of each N bytes of
large writes to a thread that starts their write-back, so that an fsync after
a stream of writes has only its tail left to write."""

import os

import pytest
from nodes import wait_until

from repdisk.core.image import WRITE_BEHIND_MIN, RawImage, cachestat
from repdisk.node.writebehind import WriteBehind

MiB = 1 << 20


def test_large_writes_are_handed_over_every_n_bytes_with_their_span(tmp_path):
    img = RawImage.open(str(tmp_path / "d.img"), 64 * MiB)
    spans = []
    img.set_write_behind(4 * MiB, lambda off, n: spans.append((off, n)))
    data = os.urandom(MiB)
    for i in range(3):  # 3 MiB: not yet
        img.pwrite(data, 10 * MiB + i * MiB)
    assert spans == []
    img.pwrite(data, 2 * MiB)  # the 4th MiB, below the others: the span reaches down to it
    assert spans == [(2 * MiB, 11 * MiB)]
    for i in range(4):  # the next 4 MiB, counted afresh
        img.pwrite(data, 20 * MiB + i * MiB)
    assert spans[1:] == [(20 * MiB, 4 * MiB)]
    assert img.write_behind_every == 4 * MiB
    img.close()


def test_small_and_direct_writes_are_not_handed_over(tmp_path):
    img = RawImage.open(str(tmp_path / "d.img"), 64 * MiB)
    spans = []
    img.set_write_behind(WRITE_BEHIND_MIN, lambda off, n: spans.append((off, n)))
    small = os.urandom(WRITE_BEHIND_MIN - 4096)
    for i in range(8):  # random 4-60 KiB writes stay in the page cache for the flush
        img.pwrite(small, i * MiB)
    assert spans == []
    img.pwrite(os.urandom(WRITE_BEHIND_MIN), 32 * MiB, direct=True)  # O_DIRECT: nothing cached
    if img.direct_bytes:  # the file system took O_DIRECT (not tmpfs)
        assert spans == []
    img.pwrite(os.urandom(WRITE_BEHIND_MIN), 40 * MiB)
    assert spans[-1] == (40 * MiB, WRITE_BEHIND_MIN)
    handed = len(spans)
    img.set_write_behind(0, spans.append)  # off
    img.pwrite(os.urandom(2 * WRITE_BEHIND_MIN), 48 * MiB)
    assert img.write_behind_every == 0 and len(spans) == handed
    img.close()


def test_the_thread_gets_the_pages_written_back_before_any_fsync(tmp_path):
    """The real effect: the pages of a stream leave the dirty state without
    an fsync; without write-behind they stay dirty (the kernel waits up to
    30 s, or for the fsync)."""
    data = os.urandom(MiB)

    def stream(on: bool):
        img = RawImage.open(str(tmp_path / f"d{on}.img"), 64 * MiB)
        if cachestat(img.fd, 0, 0) is None:
            img.close()
            pytest.skip("no cachestat(2) in this kernel")
        behind = WriteBehind(img) if on else None
        if on:
            img.set_write_behind(8 * MiB, behind.add)
        for i in range(16):
            img.pwrite(data, i * MiB)
        return img, behind

    def dirty_pages(img) -> int:
        return cachestat(img.fd, 0, 16 * MiB)[1]

    img, _ = stream(False)
    dirty = dirty_pages(img)
    img.fsync()
    img.close()
    if dirty == 0:
        pytest.skip("this file system keeps no dirty pages (tmpfs?)")
    assert dirty >= 15 * MiB // 4096  # the stream waits for the fsync

    img, behind = stream(True)
    # at least the first 8 MiB go to disk with no fsync
    wait_until(lambda: behind.started_bytes == 16 * MiB and dirty_pages(img) <= 8 * MiB // 4096,
               timeout=10, what="the stream's write-back")
    assert behind.as_dict() == {"every_bytes": 8 * MiB, "started_bytes": 16 * MiB}
    behind.close()
    img.fsync()
    img.close()


def test_the_streams_thread_runs_at_idle_priority(tmp_path):
    """idle=True (the nodes' write-behind): the thread takes only CPU time
    nothing else wants; the failover commit's (idle=False) runs as usual."""
    img = RawImage.open(str(tmp_path / "d.img"), MiB)
    for idle, policy in ((True, os.SCHED_IDLE), (False, os.SCHED_OTHER)):
        behind = WriteBehind(img, idle=idle)
        behind.add(0, 4096)  # processed after the thread set its priority
        wait_until(lambda: behind.started_bytes == 4096, timeout=10, what="the thread's first range")
        assert os.sched_getscheduler(behind._thread.native_id) == policy
        behind.close(wait=5.0)
        assert not behind._thread.is_alive()  # the image may be closed now
    img.close()
