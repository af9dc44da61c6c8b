"""tools/bench --perf: reading perf's report (tools/benchlib/profile.py) and
the table section it feeds (tools/benchlib/report.py), plus one real
recording where this machine has perf."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))

from benchlib import profile, report  # noqa: E402

# `perf report --no-children --sort sym --stdio -g none -t TAB`, as perf 6.1 prints it
SYMBOLS = """# To display the perf.data header info, please use --header/--header-only options.
#
#
# Total Lost Samples: 0
#
# Samples: 10K of event 'cpu-clock'
# Event count (approx.): 5251500000
#
# Overhead\tSymbol
#
    55.90%\t[k] pv_native_safe_halt
    21.90%\t[k] copy_folio_from_iter_atomic
     2.85%\t[k] __pi_memcpy
     1.89%\t[.] __vdso_clock_gettime

"""


def test_parse_report_reads_rows_in_order_and_skips_comments():
    rows = profile.parse_report(SYMBOLS)
    assert rows == [("[k] pv_native_safe_halt", 55.9), ("[k] copy_folio_from_iter_atomic", 21.9),
                    ("[k] __pi_memcpy", 2.85), ("[.] __vdso_clock_gettime", 1.89)]


def test_busy_symbols_leave_out_the_idle_loop_and_perfs_prefix():
    summary = {"idle_pct": 56.0, "symbols": [list(r) for r in profile.parse_report(SYMBOLS)]}
    assert profile.busy_symbols(summary, 2) == [("copy_folio_from_iter_atomic", 21.9), ("__pi_memcpy", 2.85)]
    assert profile.one_line(summary, 1) == "idle 56%; copy_folio_from_iter_atomic 22%"


def _profiled_results(idles):
    runs = [{"mibs": 100.0, "iops": 100.0, "p50_us": 1.0, "p99_us": 2.0, "runtime_ms": 1000, "ios": 100,
             "fio_cpu_s": [0.1, 0.1], "daemon_cpu_s": {},
             "perf": {"file": f"rep{i}.data", "idle_pct": idle, "commands": [["swapper", idle]],
                      "symbols": [["[k] pv_native_safe_halt", idle], ["[k] copy_folio_from_iter_atomic", 30.0 + i]]}}
            for i, idle in enumerate(idles)]
    empty = {"runs": [], "errors": []}
    target = {io: {wl: empty for wl in ("seqwrite", "randwrite", "randread", "randwrite4")}
              for io in ("direct", "buffered")}
    target["direct"]["seqwrite"] = {"runs": runs, "errors": []}
    res = {"fio": {"targets": {"py-floor": target}, "labels": {"py-floor": "pyfuse3 passthrough"}}}
    res["meta"] = {"started": "x", "git": "g", "quick": False, "config": {"reps": 3, "perf_dir": "/p"},
                   "cpus": 2, "kernel": "k", "qemu": "q", "repdisk": True}
    return res


def test_the_table_of_a_profiled_run_says_so_and_shows_where_the_time_went():
    res = _profiled_results([50.0, 20.0, 36.0])
    text = report.table(res, report.summarize_all(res)).splitlines()
    assert any(ln.startswith("profiled: perf sampled") and "/p" in ln for ln in text)
    i = text.index("== where the time went (perf, all CPUs) ==")
    row = text[i + 2]
    assert row.startswith("seq write 1 MiB, end_fsync, direct")
    assert "pyfuse3 passthrough" in row
    assert "idle  36%" in row  # the median of 50, 20, 36
    assert row.endswith("copy_folio_from_iter_atomic 31%")  # the mean of 30, 31, 32


def test_the_perf_section_ranks_symbols_by_their_mean_over_the_runs():
    res = _profiled_results([40.0, 40.0])
    a, b = (r["perf"] for r in res["fio"]["targets"]["py-floor"]["direct"]["seqwrite"]["runs"])
    a["symbols"] = [["[k] pv_native_safe_halt", 40.0], ["[.] early", 30.0], ["[k] cold", 2.0]]
    b["symbols"] = [["[k] pv_native_safe_halt", 40.0], ["[k] cold", 40.0]]
    row = report.perf_lines(res)[0]
    assert row.endswith("cold 21%, early 15%")  # (2+40)/2, (30+0)/2


def test_an_unprofiled_table_has_no_perf_section():
    res = _profiled_results([10.0])
    res["meta"]["config"]["perf_dir"] = None
    for r in res["fio"]["targets"]["py-floor"]["direct"]["seqwrite"]["runs"]:
        del r["perf"]
    text = report.table(res, report.summarize_all(res))
    assert "profiled:" not in text and "where the time went" not in text


NO_PERF = profile.available()


@pytest.mark.skipif(NO_PERF is not None, reason=f"{NO_PERF}")
def test_a_real_recording_sees_the_process_that_worked(tmp_path):
    rec = profile.Recording(str(tmp_path / "p.data"))
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={tmp_path / 'f'}", "bs=1M", "count=256"],
                       check=True, capture_output=True)
    finally:
        rec.stop()
    summary = profile.summarize(rec.path)
    commands = dict(summary["commands"])
    assert commands.get("dd", 0) > 0
    assert 0 <= summary["idle_pct"] < 100
    assert summary["symbols"] and all(p > 0 for _, p in summary["symbols"])
