"""A system-wide CPU profile of one benchmark job (tools/bench --perf DIR).

`perf record -e cpu-clock -a -g` runs while the job runs: software clock
samples work without a PMU (this Firecracker guest has none) and cover every
process, fio, the daemons and the kernel's side of each FUSE request alike,
plus idle time (the `swapper` task).  After the job the file is summarized
with `perf report`: the share of samples per command and the top symbols.
A profiled run costs the machine a little (sampling at 1 kHz per CPU), so its
figures are for reading where time goes, not for the table of record.
Reading it: cpu-clock samples come from a timer interrupt, so time spent with
interrupts off is charged to where they come back on
(`_raw_spin_unlock_irqrestore`, `_raw_spin_unlock_irq`, `finish_task_switch`):
those symbols stand for the locked work before them (wake-ups, FUSE queues)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from .util import BenchError

FREQ = 1000  # samples per second per CPU
SEP = "\t"


def available() -> str | None:
    """None when `perf` can record cpu-clock samples here, else why not."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian package linux-perf)"
    r = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return "perf record fails here: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


class Recording:
    """`perf record` of the whole machine into `path` until stop()."""

    def __init__(self, path: str):
        self.path = path
        if os.path.exists(path):  # a rerun into the same DIR: perf would keep it as .old
            os.unlink(path)
        self.proc = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQ), "-a", "-g", "-o", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # perf needs a moment to open its events on every CPU; a job started
        # before would lose its first samples.
        deadline = time.monotonic() + 5
        while not os.path.exists(path) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"perf record exited: {self.proc.communicate()[1].strip()[-300:]}")
            time.sleep(0.02)
        time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise BenchError("perf record did not stop within 60 s") from None
        if self.proc.returncode not in (0, -signal.SIGINT):
            raise BenchError(f"perf record failed ({self.proc.returncode}): {err.strip()[-300:]}")


def parse_report(text: str) -> list[tuple[str, float]]:
    """(name, percent) rows of `perf report --stdio -t TAB` output, in its
    order (largest first); comment and blank lines skipped."""
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pct, _, name = line.partition(SEP)
        pct = pct.strip()
        if not pct.endswith("%"):
            continue
        try:
            rows.append((name.strip(), float(pct[:-1])))
        except ValueError:
            continue
    return rows


def _report(path: str, sort: str) -> list[tuple[str, float]]:
    r = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort", sort, "--stdio",
                        "-g", "none", "-t", SEP], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise BenchError(f"perf report {path}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return parse_report(r.stdout)


def summarize(path: str, top: int = 8) -> dict:
    """{file, idle_pct, commands: [[comm, pct]...], symbols: [[sym, pct]...]} of a
    recording.  idle_pct is the idle task's share (swapper): of all CPUs' time,
    how much nothing ran."""
    commands = _report(path, "comm")
    symbols = _report(path, "sym")
    idle = sum(p for name, p in commands if name == "swapper")
    return {"file": path, "idle_pct": round(idle, 2),
            "commands": [[n, p] for n, p in commands[:top]],
            "symbols": [[n, p] for n, p in symbols[:top]]}


def busy_symbols(summary: dict, n: int | None = 3) -> list[tuple[str, float]]:
    """The top `n` (None: all) symbols of a summary other than the idle
    loop's, without perf's '[k] '/'[.] ' prefix."""
    return [(_bare(s), p) for s, p in summary["symbols"] if not _is_idle_symbol(s)][:n]


def one_line(summary: dict, n: int = 3) -> str:
    """'idle 36%; copy_folio_from_iter_atomic 33%, ...'."""
    return f"idle {summary['idle_pct']:.0f}%; " + ", ".join(f"{s} {p:.0f}%" for s, p in busy_symbols(summary, n))


def _bare(symbol: str) -> str:
    """'[k] copy_folio_from_iter_atomic' -> 'copy_folio_from_iter_atomic'."""
    return symbol.split("] ", 1)[1] if symbol.startswith("[") and "] " in symbol else symbol


def _is_idle_symbol(symbol: str) -> bool:
    s = _bare(symbol)
    return "safe_halt" in s or s in ("default_idle", "cpu_idle_poll", "poll_idle", "acpi_idle_do_entry")
