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

Polling for the next request
----------------------------
After a reply, a guest at queue depth 1 sends its next request within tens
of microseconds; a daemon asleep in epoll_wait by then is woken by the kernel,
which on a virtual machine whose idle vCPU halts is an interprocessor
interrupt and a host reschedule, the largest single cost of a FUSE round trip
here.  So the reader's wait_readable on /dev/fuse first polls it without
sleeping (poll with timeout 0) for up to `poll_s`, between trio checkpoints so
that the node's other tasks (the replica link's replies, the NBD server, the
control file) keep running, and sleeps only if no request came by then.  The
spin adapts as the replica link's does (edge/spin.py): while fewer than a
quarter of spins catch a request, only one wait in 16 spins.  An idle node
never spins, and neither does a reader whose process has another spinning
thread with input (the secondary's NBD request thread while replicating):
they share the GIL (edge/spin.py).  pyfuse3.terminate() (notify_closing, through the same
namespace) ends a spin at once.

Measured with tools/option_ab.py (a fresh pair per run, fio 4 KiB QD1 direct
on the primary, 2 rounds): async unix writes 10,815 -> 14,823 IOPS (x1.37)
with 0 -> 50 us, and the primary's CPU per write 66 -> 61 us (a spin that
catches its request is cheaper than a sleep and a wake-up).  By the same
measure, reads 16,242 -> 27,160, sync TCP writes 9,100 -> 10,644, 4 jobs
sync unix 10,051 -> 11,090.
"""

import collections
import contextlib
import select
import types
from time import perf_counter as _now

import pyfuse3
import trio

from . import spin
from .spin import SpinPolicy


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


class _Lowlevel(types.SimpleNamespace):
    """trio.lowlevel as pyfuse3 sees it: wait_readable spins first (module
    doc, "Polling for the next request"); everything else is trio's."""

    def __init__(self, poll_s: float):
        super().__init__()
        self.policy = spin.policy(poll_s)
        self.closing = False  # notify_closing() was called: no more waiting
        self._poll = None
        self._poll_fd = -1

    def __getattr__(self, name):
        return getattr(trio.lowlevel, name)

    def notify_closing(self, fd) -> None:
        self.closing = True
        trio.lowlevel.notify_closing(fd)

    async def wait_readable(self, fd) -> None:
        policy = self.policy
        window = policy.window() if policy is not None else 0.0
        if window:
            if fd != self._poll_fd:
                self._poll = select.poll()
                self._poll.register(fd, select.POLLIN)
                self._poll_fd = fd
            poll = self._poll.poll
            end = _now() + window
            yielded = False
            while not poll(0):
                if self.closing:
                    raise trio.ClosedResourceError("the FUSE session is ending")
                if _now() >= end:
                    policy.record(False)
                    break
                await trio.lowlevel.cancel_shielded_checkpoint()  # the node's other tasks run
                yielded = True
            else:
                policy.record(True)
                SpinPolicy.arrived()
                # Still a checkpoint, as trio's wait_readable: with requests
                # always queued, the loop would otherwise never let the
                # other tasks run.
                if yielded:
                    await trio.lowlevel.checkpoint_if_cancelled()
                else:
                    await trio.lowlevel.checkpoint()
                return
        await trio.lowlevel.wait_readable(fd)
        SpinPolicy.arrived()  # also with no poll here: the other spinning threads hold theirs

    def statistics(self) -> dict:
        return spin.statistics(self.policy, "poll", "requests")


class _TrioForPyfuse3(types.SimpleNamespace):
    """trio as pyfuse3 sees it: everything is trio's, but `Lock()` is the one
    ReaderLock (pyfuse3 creates a single lock, its read lock) and `lowlevel`
    the polling one."""

    def __init__(self, lock: ReaderLock, lowlevel: _Lowlevel):
        super().__init__(Lock=lambda: lock, lowlevel=lowlevel)

    def __getattr__(self, name):
        return getattr(trio, name)


# pyfuse3 creates its read lock once per process and keeps it across main()
# calls, so there is one ReaderLock per process too.
_LOCK = ReaderLock()
_LOWLEVEL = _Lowlevel(0.0)  # the last installed(): what statistics() reports


@contextlib.contextmanager
def installed(poll_s: float = 0.0):
    """Run pyfuse3.main() inside this (in the trio run that serves FUSE);
    `poll_s`: how long the reader polls /dev/fuse before it sleeps (0: never)."""
    global _LOWLEVEL
    lock = _LOCK
    _LOWLEVEL = lowlevel = _Lowlevel(poll_s)
    saved = pyfuse3.trio
    pyfuse3.trio = _TrioForPyfuse3(lock, lowlevel)
    trio.lowlevel.add_instrument(lock)
    try:
        yield lock
    finally:
        trio.lowlevel.remove_instrument(lock)
        pyfuse3.trio = saved


def statistics() -> dict:
    """For the control file: how often a waiting worker had to take over, and
    how the poll for the next request fares."""
    return {"reader_handoffs": _LOCK.handoffs, **_LOWLEVEL.statistics()}
