"""The benchmark's checkpointed fio job (tools/benchlib/pause.py): fio stands
still for every checkpoint, nothing of it left inside the FUSE export, and
goes on after; the job runs on pairs only (primary or view), and its row carries the
checkpoints and the issue's write targets."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from nodes import needs_fuse, read_file, wait_until
from test_pair_e2e import start_pair

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))

from benchlib import pause, report  # noqa: E402
from benchlib.fio import CHECKPOINT_PERIOD, IS_WRITE, job_options, run_fio  # noqa: E402
from benchlib.util import BenchError  # noqa: E402

FORKER = textwrap.dedent("""
    import os, sys, time
    name = sys.argv[1] + (".child" if os.fork() == 0 else ".parent")
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    while True:
        os.write(fd, b"x")
        time.sleep(0.001)
""")


def test_stop_tree_stops_a_process_and_its_children_until_continued(tmp_path):
    base = str(tmp_path / "count")
    proc = subprocess.Popen([sys.executable, "-c", FORKER, base])
    files = [base + ".parent", base + ".child"]

    def sizes():
        return [os.path.getsize(f) for f in files]
    try:
        wait_until(lambda: all(os.path.exists(f) and os.path.getsize(f) > 10 for f in files),
                   what="both processes writing")
        pids = pause.stop_tree(proc.pid)
        assert len(pids) == 2 and pids[0] == proc.pid
        for pid in pids:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    text = f.read()
                assert text[text.rindex(")") + 2] == "T"
        before = sizes()
        time.sleep(0.3)
        assert sizes() == before, "a stopped process went on writing"
        pause.continue_tree(pids)
        wait_until(lambda: all(a > b for a, b in zip(sizes(), before)), what="both writing again")
    finally:
        for pid in pause.tree(proc.pid):
            os.kill(pid, 9)
        proc.wait()


@needs_fuse
@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
@pytest.mark.parametrize("mode,direct", [("sync", True), ("async", False)])
def test_a_checkpointed_job_checkpoints_both_nodes_with_fio_still(nodes, tmp_path, mode, direct):
    """At every checkpoint, the secondary's view equals the primary's disk and
    the primary forwards nothing more: fio is still, and no write of it is
    half done.  Without the pause, fio's writes land between the two reads."""
    pri, sec = start_pair(nodes, tmp_path, mode=mode, size=8 << 20)
    seen = []

    def checkpoint():
        pri.command("checkpoint")
        sec.command("checkpoint")
        forwarded = pri.status()["writes_forwarded"]
        assert sec.status()["hidden_bytes"] == 0
        assert read_file(sec.disk) == read_file(pri.disk), "the view differs from the primary at a checkpoint"
        time.sleep(0.05)
        assert pri.status()["writes_forwarded"] == forwarded, "fio wrote during the checkpoint"
        seen.append(forwarded)

    epochs = (pri.status()["epoch"], sec.status()["epoch"])
    options = job_options("ckptwrite", 8 << 20, 3)
    r = run_fio(pri.disk, options, direct=direct, checkpoint=checkpoint, period=0.5)
    ck = r["checkpoints"]
    assert ck["count"] == len(seen) >= 3
    assert len(ck["pauses_s"]) == ck["count"] and min(ck["pauses_s"]) > 0
    assert seen == sorted(seen) and seen[-1] > seen[0], "fio made no progress between checkpoints"
    assert r["ios"] > 0 and r["iops"] > 0
    assert (pri.status()["epoch"], sec.status()["epoch"]) == (epochs[0] + ck["count"], epochs[1] + ck["count"])
    checkpoint()  # and after the job, what it wrote last is on both


@needs_fuse
@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_a_checkpointed_job_on_the_view_has_each_checkpoint_drop_what_it_wrote(nodes, tmp_path):
    """The secondary's guest: between checkpoints its writes fill the active
    overlay; each checkpoint, with fio still, empties it and the view shows
    the primary's disk again."""
    pri, sec = start_pair(nodes, tmp_path, size=8 << 20)
    held = []

    def checkpoint():
        held.append(sec.status()["active_bytes"])
        pri.command("checkpoint")
        sec.command("checkpoint")
        assert sec.status()["active_bytes"] == 0
        assert read_file(sec.disk) == read_file(pri.disk), "the view kept a write across a checkpoint"

    r = run_fio(sec.disk, job_options("ckptwrite", 8 << 20, 3), direct=True, checkpoint=checkpoint, period=0.5)
    assert r["checkpoints"]["count"] == len(held) >= 3
    assert min(held) > 0, "fio wrote nothing to the view in some epoch"
    assert pri.status()["writes_forwarded"] == 0


def test_a_failed_checkpoint_fails_the_job(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"\0" * (1 << 20))

    def checkpoint():
        raise RuntimeError("secondary gone")
    with pytest.raises(BenchError, match="checkpoint failed: secondary gone"):
        run_fio(str(path), job_options("ckptwrite", 1 << 20, 2), direct=False, checkpoint=checkpoint,
                period=0.2)


def test_the_checkpointed_job_runs_on_pairs_only():
    import bench

    class Pair:
        def checkpoint(self):
            pass

    class Plain:
        pass
    assert "ckptwrite" in CHECKPOINT_PERIOD and IS_WRITE["ckptwrite"]
    assert bench._runs_on("qemu-pri", Pair(), "ckptwrite")
    assert bench._runs_on("rd-async-tcp", Pair(), "ckptwrite")
    assert bench._runs_on("qemu-sec", Pair(), "ckptwrite")
    assert bench._runs_on("rd-sec", Pair(), "ckptwrite")
    assert not bench._runs_on("plain", Plain(), "ckptwrite")
    assert bench._runs_on("plain", Plain(), "randwrite")


def test_the_checkpointed_row_names_its_checkpoints_and_carries_the_write_targets():
    def cell(iops, pauses):
        runs = [{"mibs": iops / 256, "iops": iops, "p50_us": 100.0, "p99_us": 300.0,
                 "checkpoints": {"period_s": 1.0, "count": len(pauses), "pauses_s": pauses,
                                 "checkpoints_s": pauses}}] * 3
        return {io: {"ckptwrite": {"runs": runs, "errors": []}} for io in ("direct", "buffered")}
    res = {"fio": {"targets": {"qemu-pri": cell(1000, [0.2, 0.3]), "rd-sync-unix": cell(1500, [0.002, 0.004]),
                               "rd-async-unix": cell(1400, [0.003, 0.003])}, "labels": {}}}
    summary = report.summarize_all(res)
    rows = {(r["key"], r["io"]): r for r in summary["rows"] if r["section"] == "fio"}
    assert rows[("qemu-pri", "direct")]["note"] == "6 checkpoints, fio paused 250.0 ms at p50, 300.0 ms at most"
    assert rows[("rd-sync-unix", "direct")]["ratios"]["xQEMU"] == pytest.approx(1.5)
    checks = {(c["target"], c["item"]): c["ok"] for c in summary["checks"]}
    item = "rd-sync-unix: rand write 4 KiB QD1, checkpoint/s, direct"
    assert checks[("sync writes >= 1.0x QEMU", item)] is True
    assert checks[("async writes >= 1.5x QEMU", "rd-async-unix: rand write 4 KiB QD1, checkpoint/s, buffered")] \
        is False


def test_the_chart_has_a_panel_for_every_workload(tmp_path):
    pytest.importorskip("matplotlib")
    cell = {io: {wl: {"runs": [{"mibs": 10.0, "iops": 2560.0, "p50_us": 100.0, "p99_us": 300.0}], "errors": []}
                 for wl in report.WORKLOADS} for io in ("direct", "buffered")}
    res = {"fio": {"targets": {"qemu-pri": cell, "rd-sync-unix": cell}, "labels": {}},
           "meta": {"started": "now", "quick": True, "config": {"reps": 1}}}
    path = tmp_path / "chart.png"
    report.chart(res, report.summarize_all(res), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
