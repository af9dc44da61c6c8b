"""pyfuse3's worker loop, made cheaper per request: the read lock is handed on
only when its holder is about to block.

pyfuse3 runs several worker tasks (`main(min_tasks, max_tasks)`).  One at a
time waits for /dev/fuse to become readable, holding `read_lock` (a
`trio.Lock`); when a request arrives it releases the lock, which wakes the
next worker to take over the waiting, and then handles the request.  That
costs every request a second task step (the next worker's), a lock hand-over
and, in `trio.Lock.acquire`, a yield even when the lock is free.  On the
primary (fio 4 KiB QD1, direct) a single worker (max_tasks=1) saved ~7 us of
CPU per read (34 -> 27) and ~15 us per write, and reads ran ~20% faster.

A single worker would lose what the others are for: while a handler waits
(a sync write's reply, an fsync, a control command) the next request must
still be read.  `ReaderLock` keeps both:

- acquiring a free lock does not yield (the `wait_readable` that follows is
  the checkpoint);
- releasing it while other workers wait does not wake one.  If the releasing
  task comes back for the lock before it blocks anywhere (its handler did not
  wait: a read, an async write, a sync write answered inline), it simply takes
  it again, and no other task runs;
- if instead its task step ends with the lock free (the handler blocks, or
  the task ends), the trio instrument hook `after_task_step` hands the lock to
  the longest-waiting worker right then.  So a request never waits behind a
  blocked handler longer than that handler's current task step.

pyfuse3 reaches trio through its module attribute `pyfuse3.trio` (its asyncio
mode swaps it the same way); `installed()` points it at a namespace that is
trio except for `Lock`, for the duration of `pyfuse3.main()`.

Measured with this lock (tools/run, fio 4 KiB QD1 direct on the primary):
31.9K reads/s (~23K with trio.Lock), and 65 hand-overs in 21,611 sync writes
(nearly all answered inline, so their workers never blocked).
"""

import collections
import contextlib
import types

import pyfuse3
import trio


class ReaderLock(trio.abc.Instrument):
    """An async-with lock for pyfuse3's one reader at a time (module doc)."""

    def __init__(self):
        self._owner = None
        self._waiters = collections.deque()  # parked tasks, oldest first
        self._released_by = None  # released with waiters parked: may take it back until its step ends
        self.handoffs = 0  # times the lock went to a parked worker

    async def __aenter__(self) -> None:
        task = trio.lowlevel.current_task()
        if self._owner is None and (not self._waiters or self._released_by is task):
            self._owner = task
            self._released_by = None
            return
        self._waiters.append(task)

        def abort(_raise_cancel):
            self._waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        # after_task_step made this task the owner before waking it

    async def __aexit__(self, *exc) -> None:
        self._owner = None
        if self._waiters:
            self._released_by = trio.lowlevel.current_task()

    def after_task_step(self, task) -> None:
        if task is self._released_by:
            self._released_by = None
            if self._owner is None and self._waiters:
                self._owner = nxt = self._waiters.popleft()
                self.handoffs += 1
                trio.lowlevel.reschedule(nxt)


class _TrioForPyfuse3(types.SimpleNamespace):
    """trio as pyfuse3 sees it: everything is trio's, but `Lock()` is the one
    ReaderLock (pyfuse3 creates a single lock, its read lock)."""

    def __init__(self, lock: ReaderLock):
        super().__init__(Lock=lambda: lock)

    def __getattr__(self, name):
        return getattr(trio, name)


# pyfuse3 creates its read lock once per process and keeps it across main()
# calls, so there is one ReaderLock per process too.
_LOCK = ReaderLock()


@contextlib.contextmanager
def installed():
    """Run pyfuse3.main() inside this (in the trio run that serves FUSE)."""
    lock = _LOCK
    saved = pyfuse3.trio
    pyfuse3.trio = _TrioForPyfuse3(lock)
    trio.lowlevel.add_instrument(lock)
    try:
        yield lock
    finally:
        trio.lowlevel.remove_instrument(lock)
        pyfuse3.trio = saved


def statistics() -> dict:
    """For the control file: how often a waiting worker had to take over."""
    return {"reader_handoffs": _LOCK.handoffs}
