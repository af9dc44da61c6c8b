"""The benchmark's arithmetic (tools/benchlib/report.py): CPU time per I/O and
its ratio to QEMU, from fio results shaped like the ones tools/bench records."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))

from benchlib import report  # noqa: E402


def run(iops, ios, fio, **daemons):
    return {"mibs": iops * 4096 / (1 << 20), "iops": iops, "p50_us": 100.0, "p99_us": 200.0,
            "runtime_ms": 3000, "ios": ios, "fio_cpu_s": list(fio),
            "daemon_cpu_s": {k: list(v) for k, v in daemons.items()}}


def results(qemu_runs, rd_runs):
    empty = {"runs": [], "errors": []}
    def target(runs):
        return {io: {wl: (dict(runs=runs, errors=[]) if (io, wl) == ("direct", "randwrite") else empty)
                     for wl in ("seqwrite", "randwrite", "randread", "randwrite4")}
                for io in ("direct", "buffered")}
    return {"fio": {"targets": {"qemu-pri": target(qemu_runs), "rd-async-tcp": target(rd_runs)},
                    "labels": {}}}


def test_cpu_per_io_is_the_median_of_each_process_per_io_in_microseconds():
    runs = [run(10000, 30000, (0.3, 0.6), primary=(3.0, 0.9), secondary=(0.6, 0.6)),
            run(10000, 20000, (0.2, 0.2), primary=(1.8, 0.8), secondary=(0.4, 0.4)),
            run(10000, 10000, (0.1, 0.1), primary=(1.1, 0.3), secondary=(0.2, 0.2))]
    c = report.cpu_per_io(runs)
    # per run, µs per I/O: fio 10+20 / 10+10 / 10+10; primary 100+30 / 90+40 / 110+30
    assert c["parts"]["fio"] == pytest.approx([10, 10])
    assert c["parts"]["primary"] == pytest.approx([100, 30])
    assert c["parts"]["secondary"] == pytest.approx([20, 20])
    # totals per run: 30+130+40=200, 20+130+40=190, 20+140+40=200
    assert (c["total_us"], c["total_min"], c["total_max"]) == pytest.approx((200, 190, 200))


def test_a_process_missing_from_some_runs_is_left_out_of_parts_and_total():
    runs = [run(1, 1000, (0.01, 0.01), primary=(0.1, 0.0), secondary=(0.05, 0.0)),
            run(1, 1000, (0.01, 0.01), primary=(0.1, 0.0))]  # the secondary was gone
    c = report.cpu_per_io(runs)
    assert set(c["parts"]) == {"fio", "primary"}
    assert c["total_us"] == pytest.approx(120)


def test_runs_without_cpu_figures_give_none():
    old = {"mibs": 1.0, "iops": 1.0, "p50_us": 1.0, "p99_us": 1.0, "runtime_ms": 1}
    assert report.cpu_per_io([old]) is None
    assert report.cpu_per_io([dict(old, ios=0, fio_cpu_s=[1, 1])]) is None


def test_rows_carry_cpu_and_its_ratio_to_qemu():
    res = results([run(8000, 24000, (0.48, 0.48), primary=(0.96, 0.96), secondary=(0.96, 0.96))],
                  [run(10000, 30000, (0.6, 0.6), primary=(3.0, 1.2), secondary=(0.6, 0.6))])
    rows = {r["key"]: r for r in report.summarize_all(res)["rows"]
            if r["section"] == "fio" and r["workload"] == "randwrite" and r["io"] == "direct"}
    assert rows["qemu-pri"]["cpu"]["total_us"] == pytest.approx(200)  # 40 + 80 + 80
    assert "xQEMU" not in rows["qemu-pri"]["cpu"]
    assert rows["rd-async-tcp"]["cpu"]["total_us"] == pytest.approx(220)  # 40 + 140 + 40
    assert abs(rows["rd-async-tcp"]["cpu"]["xQEMU"] - 1.1) < 1e-9
    assert abs(rows["rd-async-tcp"]["ratios"]["xQEMU"] - 1.25) < 1e-9
    text = report.table({"meta": {"started": "t", "git": "g", "quick": True, "config": {"reps": 1},
                                  "cpus": 2, "kernel": "k", "qemu": "q", "repdisk": True}},
                        report.summarize_all(res))
    assert "== CPU per I/O ==" in text and "pri 100+40" in text and "xQEMU 1.10" in text


def test_a_run_of_some_workloads_reports_only_those():
    """tools/bench --workloads seqwrite: the results hold that workload alone,
    and the table has rows for it and none (empty) for the others."""
    cell = {"runs": [run(300, 512, (0.1, 0.2), primary=(0.2, 0.3))], "errors": []}
    res = {"fio": {"targets": {key: {io: {"seqwrite": cell} for io in ("direct", "buffered")}
                               for key in ("qemu-pri", "rd-sync-unix")}, "labels": {}}}
    rows = [r for r in report.summarize_all(res)["rows"] if r["section"] == "fio"]
    assert {r["workload"] for r in rows} == {"seqwrite"}
    assert len(rows) == 4  # 2 targets x direct/buffered
    rd = [r for r in rows if r["key"] == "rd-sync-unix"]
    assert all(abs(r["ratios"]["xQEMU"] - 1.0) < 1e-9 for r in rd)


def test_first_touch_fill_writes_the_whole_size_in_mib_pieces(tmp_path):
    import first_touch
    path = tmp_path / "f"
    chunk = memoryview(bytes(range(256)) * 4096)
    first_touch._fill(str(path), 3 << 20, chunk, create=True)
    assert path.stat().st_size == 3 << 20
    assert path.read_bytes()[(2 << 20) : (2 << 20) + 256] == bytes(range(256))
    pieced = tmp_path / "p"  # in 128 KiB pieces, as repdisk writes: the same bytes
    first_touch._fill(str(pieced), 3 << 20, chunk, create=True, piece=128 << 10)
    assert pieced.read_bytes() == path.read_bytes()
    with pytest.raises(FileExistsError):  # a new file is really new: never an overwrite
        first_touch._fill(str(path), 1 << 20, chunk, create=True)


def test_first_touch_probe_measures_four_cases_and_leaves_no_files(tmp_path):
    import first_touch
    r = first_touch.measure(str(tmp_path), size=(8 << 20) + 4096, idle=0)
    assert r["size_mib"] == 8  # whole MiB
    for case in ("cached", "recycled", "idle", "idle_pieces"):
        assert r[case]["wall_ms_per_mib"] > 0
    assert list(tmp_path.iterdir()) == []
    assert isinstance(r["page_reporting"], dict)
    line = report.first_touch_line(r)
    assert f"cached {r['cached']['wall_ms_per_mib']:.2f}" in line
    assert f"after {r['idle_s']:g} s idle" in line
    assert f"idle in 128 KiB pieces as repdisk writes {r['idle_pieces']['wall_ms_per_mib']:.2f}" in line


def test_first_touch_budget_writes_and_removes_its_files(tmp_path):
    import first_touch
    rows = first_touch.budget(str(tmp_path), files=3, file_mib=2)
    assert [r["written_mib"] for r in rows] == [2, 4, 6]
    assert all(r["mib_per_s"] > 0 and r["sys_ms_per_mib"] >= 0 for r in rows)
    assert list(tmp_path.iterdir()) == []


def test_the_table_names_the_machine_first_touch_cost():
    res = results([], [])
    ft = {"size_mib": 8, "idle_s": 5.0, "page_reporting": {"page_reporting_order": 9},
          "reported_mib_while_idle": 504,
          **{k: {"sys_ms_per_mib": v, "wall_ms_per_mib": v} for k, v in
             (("cached", 0.1), ("recycled", 0.33), ("idle", 1.46))}}
    res["meta"] = {"started": "x", "git": "g", "quick": False, "config": {"reps": 3}, "cpus": 2,
                   "kernel": "k", "qemu": "q", "repdisk": True, "first_touch": ft, "reported_mib": 2048}
    text = report.table(res, report.summarize_all(res))
    line = next(ln for ln in text.splitlines() if ln.startswith("machine:"))
    assert "cached 0.10, recycled 0.33, idle 1.46 ms/MiB" in line
    assert "free page reporting on (order 9, 504 MiB reported in the idle wait)" in line
    assert "2,048 MiB of free memory reported to the host during the run" in line


def test_the_table_says_whether_pages_were_released():
    res = results([], [])
    res["meta"] = {"started": "x", "git": "g", "quick": False, "config": {"reps": 3}, "cpus": 2,
                   "kernel": "k", "qemu": "q", "repdisk": True}
    assert not any(ln.startswith("pages:") for ln in report.table(res, report.summarize_all(res)).splitlines())
    for on, words in ((True, "left the page cache"), (False, "depend on its place in the order")):
        res["meta"]["config"]["release_pages"] = on
        line = next(ln for ln in report.table(res, report.summarize_all(res)).splitlines()
                    if ln.startswith("pages:"))
        assert words in line


def test_release_pages_is_the_default_and_can_be_turned_off():
    import bench
    assert bench.Config(False, None).release_pages is True
    parse = bench._parser().parse_args
    assert parse([]).release_pages is True
    assert parse(["--release-pages"]).release_pages is True
    assert parse(["--no-release-pages"]).release_pages is False


def test_the_table_says_how_read_jobs_found_the_page_cache():
    res = results([], [])
    res["meta"] = {"started": "x", "git": "g", "quick": False, "config": {"reps": 3}, "cpus": 2,
                   "kernel": "k", "qemu": "q", "repdisk": True}
    assert not any(ln.startswith("reads:") for ln in report.table(res, report.summarize_all(res)).splitlines())
    for how, words in (("warm", "the data of its target's files in the page cache"), ("cold", "dropped"), ("left", "follows its write rate")):
        res["meta"]["config"]["read_cache"] = how
        line = next(ln for ln in report.table(res, report.summarize_all(res)).splitlines()
                    if ln.startswith("reads:"))
        assert words in line and f"--read-cache {how}" in line


def test_read_jobs_start_warm_by_default():
    import bench
    assert bench.Config(False, None).read_cache == "warm"
    parse = bench._parser().parse_args
    assert parse([]).read_cache == "warm"
    assert parse(["--read-cache", "cold"]).read_cache == "cold"
    with pytest.raises(SystemExit):
        parse(["--read-cache", "hot"])


def test_two_plain_files_bound_a_pairs_seq_write_cells():
    """The seq-write row carries what two plain files made of it (per file):
    xpair on QEMU's and repdisk's primaries, xQEMU on the two files' row, and
    the async check names it; the view, one file, gets no xpair."""
    def cells(mibs):
        c = {"runs": [dict(run(1, 512, (0.1, 0.1)), mibs=mibs)], "errors": []}
        return {io: {"seqwrite": c} for io in ("direct", "buffered")}
    res = {"fio": {"targets": {"plain-pair": cells(210.0), "qemu-pri": cells(140.0),
                               "rd-async-unix": cells(147.0), "qemu-sec": cells(200.0),
                               "rd-sec": cells(220.0)}, "labels": {}}}
    summary = report.summarize_all(res)
    rows = {(r["key"], r["io"]): r for r in summary["rows"] if r["section"] == "fio"}
    assert rows[("plain-pair", "direct")]["ratios"]["xQEMU"] == pytest.approx(1.5)
    assert rows[("qemu-pri", "direct")]["ratios"]["xpair"] == pytest.approx(140 / 210)
    assert rows[("rd-async-unix", "buffered")]["ratios"]["xpair"] == pytest.approx(0.7)
    assert "xpair" not in rows[("rd-sec", "direct")]["ratios"]
    async_checks = [c for c in summary["checks"] if c["target"].startswith("async")]
    assert [c["ok"] for c in async_checks] == [False, False]  # 1.05x
    assert all(c["note"] == "two plain files: 1.50x QEMU" for c in async_checks)
    view = next(c for c in summary["checks"] if c["target"].startswith("secondary view"))
    assert view["note"] == ""


def test_the_log_path_is_compared_with_replica_first_and_has_no_target_of_its_own():
    """rd-sync-unix-norf (--replica-first off) is measured in the same run:
    rd-sync-unix carries xnorf against it, and it gets no target check."""
    def cells(iops):
        return {io: {"randwrite": {"runs": [run(iops, iops * 3, (0.1, 0.1))], "errors": []}}
                for io in ("direct", "buffered")}
    res = {"fio": {"targets": {"qemu-pri": cells(5000), "rd-sync-unix": cells(6000),
                               "rd-sync-unix-norf": cells(4000)}, "labels": {}}}
    summary = report.summarize_all(res)
    rows = {(r["key"], r["io"]): r for r in summary["rows"] if r["section"] == "fio"}
    assert rows[("rd-sync-unix", "direct")]["ratios"]["xnorf"] == pytest.approx(1.5)
    assert rows[("rd-sync-unix-norf", "direct")]["ratios"]["xQEMU"] == pytest.approx(0.8)
    assert "xnorf" not in rows[("rd-sync-unix-norf", "direct")]["ratios"]
    checked = sorted(c["item"].split(":")[0] for c in summary["checks"])
    assert checked == ["rd-sync-unix", "rd-sync-unix"]


def test_write_behind_off_on_an_async_primary_is_a_comparison_without_a_target():
    """rd-async-unix-nowb (--write-behind off on an async primary) carries xwbon
    against rd-async-unix from the same run, and no target check: the
    configuration with targets is the default."""
    def cells(mibs):
        return {io: {"seqwrite": {"runs": [run(mibs, 512, (0.1, 0.1))], "errors": []}}
                for io in ("direct", "buffered")}
    res = {"fio": {"targets": {"qemu-pri": cells(200), "rd-async-unix": cells(300),
                               "rd-async-unix-nowb": cells(360)}, "labels": {}}}
    summary = report.summarize_all(res)
    rows = {(r["key"], r["io"]): r for r in summary["rows"] if r["section"] == "fio"}
    assert rows[("rd-async-unix-nowb", "direct")]["ratios"]["xwbon"] == pytest.approx(1.2)
    assert rows[("rd-async-unix-nowb", "buffered")]["ratios"]["xQEMU"] == pytest.approx(1.8)
    assert "xwbon" not in rows[("rd-async-unix", "direct")]["ratios"]
    checked = sorted(c["item"].split(":")[0] for c in summary["checks"])
    assert checked == ["rd-async-unix", "rd-async-unix"]


def test_targets_without_a_workload_get_no_row_for_it():
    """Two plain files run the seq-write job only: no n/a rows for the rest."""
    seq = {"runs": [run(300, 512, (0.1, 0.2))], "errors": []}
    res = results([run(1, 1, (0, 0))], [run(1, 1, (0, 0))])
    res["fio"]["targets"]["plain-pair"] = {io: {"seqwrite": seq} for io in ("direct", "buffered")}
    rows = [r for r in report.summarize_all(res)["rows"] if r.get("key") == "plain-pair"]
    assert sorted((r["workload"], r["io"]) for r in rows) == [("seqwrite", "buffered"), ("seqwrite", "direct")]


def test_two_plain_files_are_written_at_once_and_reported_per_file(tmp_path):
    """A real fio job through the bench's own path: both files written in
    full by two fio processes, the rate halved to a per-file figure."""
    import bench
    from benchlib.targets import PlainPairTarget
    cfg = bench.Config(quick=True, reps=1)
    cfg.fio_size = 8 << 20
    t = PlainPairTarget(str(tmp_path), cfg.fio_size)
    t.bench_dir = str(tmp_path)  # as section_fio sets it: the release after the 1 MiB job (the default)
    tres: dict = {}
    bench._fio_job(cfg, tres, "plain-pair", t, None, "direct", "seqwrite", everyone=[t])
    cell = tres["direct"]["seqwrite"]
    assert cell["errors"] == []
    (r,) = cell["runs"]
    assert r["ios"] == 2 * 8  # 1 MiB writes, 8 per file
    assert "released_mib" in r  # --release-pages is on by default
    for i in range(2):
        st = os.stat(tmp_path / f"pair.{i}.img")
        assert st.st_size == 8 << 20 and st.st_blocks * 512 >= 8 << 20  # written, not a hole
    per_file = 8 / (r["runtime_ms"] / 1000)  # the group's wall time
    assert r["mibs"] == pytest.approx(per_file, rel=0.5)


def test_a_failed_write_phase_keeps_start_up_and_idle_rss():
    """tools/bench's nodes section: when the 1 GiB of random writes fails (fio
    timed out), the start-up and idle RSS it measured first still get rows,
    and the write rows say why they are missing."""
    MiB = 1 << 20
    idle = {"primary": 60 * MiB, "secondary": 50 * MiB}
    res = {"nodes": {"disk_size": 1 << 40, "write": 1024 * MiB, "systems": {
        "qemu": {"runs": [{"startup": {"primary": 0.2, "secondary": 0.2}, "rss_idle": idle,
                           "rss_after_writes": idle, "write_iops": 1000.0}], "errors": []},
        "repdisk": {"runs": [{"startup": {"primary": 0.5, "secondary": 0.4}, "rss_idle": idle}],
                    "errors": ["fio timed out after 1800s"]}}}}
    rows = [r for r in report.summarize_all(res)["rows"]
            if r["section"] == "nodes" and r["target"] == "repdisk"]
    by = {(r["metric"], r.get("role")): r for r in rows}
    assert by[("startup", "primary")]["median"] == 0.5
    assert by[("rss_idle", "secondary")]["median"] == 50
    assert "timed out" in by[("rss_after_writes", "primary")]["na"]
    assert "timed out" in by[("write_iops", None)]["na"]
    qemu = [r for r in report.summarize_all(res)["rows"]
            if r["section"] == "nodes" and r.get("metric") == "write_iops" and r["target"] == "QEMU"]
    assert qemu[0]["median"] == 1000.0


def test_the_1_tib_write_row_says_what_the_primarys_flushes_did():
    """A failed local fsync changes what the 1 TiB write row measures: the
    row names each run's flushes, repairs (with how long writes waited) and
    a flush broken for good."""
    MiB = 1 << 20
    idle = {"primary": 60 * MiB, "secondary": 50 * MiB}
    base = {"startup": {"primary": 0.5, "secondary": 0.4}, "rss_idle": idle, "rss_after_writes": idle}
    res = {"nodes": {"disk_size": 1 << 40, "write": 1024 * MiB, "systems": {"repdisk": {"runs": [
        {**base, "write_iops": 1300.0, "flushes": {"flushes": 62, "repairs": 0, "flush_broken": None}},
        {**base, "write_iops": 1250.0, "flushes": {"flushes": 60, "repairs": 1, "flush_broken": None,
                                                   "repair": {"writes_held_s": 0.123, "result": "repaired"}}},
        {**base, "write_iops": 800.0, "flushes": {"flushes": 7, "repairs": 0,
                                                  "flush_broken": "flushing pri.raw failed: ENOSPC"}},
        {**base, "write_iops": 790.0, "flushes": {
            "flushes": 9, "repairs": 0, "flush_broken": "flushing pri.raw failed: fsync pri.raw: ENOSPC",
            "repair": {"result": "not possible after fsync pri.raw: ENOSPC: not every write since the last good "
                                 "flush is on this secondary: the primary is degraded, not replicating",
                       "refused": "the primary is degraded, not replicating"},
            "state": "degraded", "writes_marked_dirty": 12}},
        {**base, "write_iops": 1600.0, "flushes": {
            "flushes": 66, "repairs": 0, "flush_broken": None, "state": "replicating", "writes_marked_dirty": 2080,
            "link_lost": ["flush failed: server replied ENOSPC (No space left on device)"]}},
    ], "errors": []}}}}
    res["meta"] = {"started": "x", "git": "g", "quick": False, "config": {"reps": 3}, "cpus": 2,
                   "kernel": "k", "qemu": "q", "repdisk": True}
    text = report.table(res, report.summarize_all(res))
    line = next(ln for ln in text.splitlines() if ln.startswith("rand 4 KiB writes, 1 TiB disk"))
    assert "[62 flushes; 60 flushes, 1 repaired (writes held 0.12 s); 7 flushes, flushing broken: ENOSPC; " \
           "9 flushes, flushing broken (no repair: the primary is degraded, not replicating), " \
           "12 writes only marked for a resync, ended degraded; 66 flushes, 2080 writes only marked for a " \
           "resync (secondary lost: flush failed: server replied ENOSPC (No space left on device))]" in line


def test_link_losses_are_read_from_the_primary_log_each_reason_once():
    log = "\n".join([
        "2026-12-06 10:00:00 INFO connected to secondary nbd+unix:///?socket=/s.sock",
        "2026-12-06 10:00:01 WARNING secondary lost: nbd+unix:///repdisk:disk=ab:gen=cd?socket=/s.sock: flush "
        "failed: server replied ENOSPC (No space left on device); tracking changed blocks from now on",
        "2026-12-06 10:00:09 WARNING secondary lost: nbd+unix:///repdisk:disk=ab:gen=ef?socket=/s.sock: flush "
        "failed: server replied ENOSPC (No space left on device); tracking changed blocks from now on",
        "2026-12-06 10:00:30 WARNING secondary lost: replica link to nbd://127.0.0.1:1: no reply for 30 s "
        "with 4 requests in flight; tracking changed blocks from now on",
    ])
    assert report.link_losses(log) == ["flush failed: server replied ENOSPC (No space left on device)",
                                       "no reply for 30 s with 4 requests in flight"]
    assert report.link_losses("nothing here\n") == []


def test_release_pages_drops_a_targets_files_from_the_page_cache(tmp_path):
    """--release-pages: every regular file under the target's directory
    leaves the page cache with its content intact; a socket there is skipped."""
    import shutil
    import socket
    import subprocess

    import bench
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) is not installed")

    def cached(path) -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip())

    (tmp_path / "sub").mkdir()
    files = [tmp_path / "img", tmp_path / "sub" / "overlay"]
    data = os.urandom(4 << 20)
    for f in files:
        f.write_bytes(data)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "nbd.sock"))
    try:
        assert all(cached(f) > 0 for f in files)
        bench._release_pages(str(tmp_path))
        assert [cached(f) for f in files] == [0, 0]
        assert all(f.read_bytes() == data for f in files)
    finally:
        sock.close()


def test_read_cache_puts_every_file_of_a_target_in_one_state(tmp_path):
    """--read-cache: warm reads the data of every file under the target's
    directory into the page cache (not its holes) and afterwards drops again
    what was not cached before, cold drops them all; the census counts each file of
    1 MiB or more (smaller ones and sockets are left out), and content is
    never touched."""
    import socket

    import bench
    (tmp_path / "sub").mkdir()
    files = {"img": os.urandom(4 << 20), "sub/overlay": os.urandom(2 << 20)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "meta").write_bytes(b"x" * 100)
    with open(tmp_path / "overlay", "wb") as f:  # sparse: 1 MiB of data in 8 MiB
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))
    files["overlay"] = (tmp_path / "overlay").read_bytes()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "nbd.sock"))
    try:
        census = bench._cache_census(str(tmp_path))
        if not census:
            pytest.skip("no cachestat(2) on this kernel")
        assert set(census) == set(files)
        assert bench._prepare_read_cache(str(tmp_path), "cold") is None
        assert bench._cache_census(str(tmp_path)) == {"img": 0.0, "sub/overlay": 0.0, "overlay": 0.0}
        with open(tmp_path / "img", "rb") as f:  # the job before left the start cached
            f.read(1 << 20)
        left = bench._cache_census(str(tmp_path))
        assert 1.0 <= left["img"] < 4.0 and left["sub/overlay"] == left["overlay"] == 0.0
        restore = bench._prepare_read_cache(str(tmp_path), "warm")
        # every byte of data, and none of the holes
        assert bench._cache_census(str(tmp_path)) == {"img": 4.0, "sub/overlay": 2.0, "overlay": 1.0}
        bench._restore_read_cache(restore)  # after the job: as the job before left it
        assert bench._cache_census(str(tmp_path)) == left
        assert all((tmp_path / name).read_bytes() == data for name, data in files.items())
    finally:
        sock.close()
