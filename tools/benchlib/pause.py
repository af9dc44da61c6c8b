"""Checkpoints taken while fio runs, with fio paused around each one.

COLO stops the VM for every checkpoint: no guest I/O is in flight while the
disks' checkpoint runs, and the guest's time stops with it.  Here fio is
the guest: every period its processes get SIGSTOP, and the checkpoint
starts once every one of their threads is stopped, that is once no fio
request is left inside a FUSE export (a thread waiting for a FUSE reply
stops only after the reply).  Then SIGCONT.  fio's rates are wall-clock
rates, so a system's checkpoint time is charged to its I/O rate, as COLO
charges it to the guest."""
from __future__ import annotations

import os
import signal
import threading
import time

from .util import BenchError


def _stat(path: str) -> tuple[str, int] | None:
    """(state, ppid) from a /proc stat file (a process's or a thread's),
    None once it is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and ')'
    return fields[0], int(fields[1])


def tree(root: int) -> list[int]:
    """`root` and every descendant of it alive now."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(f"/proc/{name}/stat")
            if st is not None:
                children.setdefault(st[1], []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _threads_stopped(pid: int) -> bool:
    """Every thread of `pid` stopped (or the process gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        st = _stat(f"/proc/{pid}/task/{tid}/stat")
        if st is not None and st[0] not in "TtZX":
            return False
    return True


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_tree(root: int, timeout: float = 30) -> list[int]:
    """SIGSTOP `root` and its descendants, and wait until every thread of
    them is stopped; returns the pids stopped (SIGCONT them with
    `continue_tree`).  A process forked while the walk ran is caught by the
    next walk: a stopped parent forks no more."""
    stopped: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            new = [p for p in tree(root) if p not in stopped]
            if not new:
                break
            _signal(new, signal.SIGSTOP)
            stopped += new
        while not all(_threads_stopped(p) for p in stopped):
            if time.monotonic() > deadline:
                raise BenchError(f"fio (pid {root}) did not stop within {timeout:.0f} s: "
                                 "a request it sent is not answered")
            time.sleep(0.0002)
    except BaseException:
        continue_tree(stopped)
        raise
    return stopped


def continue_tree(pids) -> None:
    _signal(pids, signal.SIGCONT)


class Checkpointer:
    """While a process (fio) runs: every `period` seconds stop it, call
    `checkpoint()`, let it go on.  Records each pause (SIGSTOP sent until
    SIGCONT sent) and each checkpoint call, in seconds; the first error
    ends the checkpoints and is kept in `error`."""

    def __init__(self, pid: int, checkpoint, period: float):
        self.pid, self.checkpoint, self.period = pid, checkpoint, period
        self.pauses: list[float] = []
        self.checkpoints: list[float] = []
        self.error: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.period):
            t0 = time.monotonic()
            try:
                pids = stop_tree(self.pid)
            except BenchError as e:
                self.error = str(e)
                return
            st = _stat(f"/proc/{self.pid}/stat")
            if self._done.is_set() or st is None or st[0] in "ZX":
                continue_tree(pids)
                return  # fio ended meanwhile: no checkpoint after the job
            try:
                t1 = time.monotonic()
                self.checkpoint()
                self.checkpoints.append(time.monotonic() - t1)
            except Exception as e:
                self.error = f"checkpoint failed: {e}"
                return
            finally:
                continue_tree(pids)
                self.pauses.append(time.monotonic() - t0)

    def summary(self) -> dict:
        return {"period_s": self.period, "count": len(self.checkpoints),
                "pauses_s": self.pauses, "checkpoints_s": self.checkpoints}
