"""When to poll without sleeping, and when that stopped paying: the one
policy behind the node's spins (the replica link's wait for a sync write's
reply, edge/replica.py; the FUSE loop's wait for the next request,
edge/fuseloop.py; the NBD server's wait for the primary's next request,
edge/nbdserver.py).

A process asleep in poll/epoll is woken by the kernel when its input arrives;
on a virtual machine whose idle vCPU halts, that wake-up is an interprocessor
interrupt and a host reschedule, tens of microseconds on the critical path of
every request.  Polling with timeout 0 for a short window first avoids it when
the input comes within the window (QEMU's IOThreads do the same: poll-max-ns).
The spin costs CPU, so it adapts: SpinPolicy keeps the share of recent spins
that caught their input and spins only while at least a quarter do; otherwise
only every 16th wait spins, to notice when input is fast again.  (Input comes
sooner while the process spins than while it sleeps, so waits measured asleep
cannot tell what a spin would catch.)  When input is slow, spinning stops
within a few dozen waits and then costs at most one window per 16 waits; an
idle node does not spin at all, as every spin starts with a wait.

Spinners in one process share its GIL.  A thread spinning in Python takes the
GIL back after every poll, and another thread of the process that has work
(the secondary's NBD request thread while its FUSE loop spins, or the other
way round) waits for it: with both busy, spinning made both slower.  So a
spinner that calls arrived() for its input spins only while no other such
thread had input within the last QUIET_S; the threads then sleep between
inputs as they did without spinning."""

import threading
from time import perf_counter as _now

QUIET_S = 0.002  # another spinning thread's input this recent: do not spin
_last_input: dict[int, float] = {}  # thread id -> when its last input came (spinners that call arrived())

FUSE_POLL_US = 50  # default: how long the FUSE reader polls for the next request (edge/fuseloop.py)
REQUEST_POLL_US = 200  # default: how long the secondary's NBD server polls for the next request (edge/nbdserver.py)


class SpinPolicy:
    """Pure bookkeeping: ask window() at the start of each wait; after a wait
    that spun, record() whether the input came during the spin (a wait given
    up for another reason records nothing)."""

    MIN_SHARE = 0.25  # keep spinning while at least this share of recent spins caught their input
    WEIGHT = 1 / 16  # of the newest spin in the running share (~16 spins of memory)
    PROBE_EVERY = 16  # while not spinning, one wait in this many spins anyway

    def __init__(self, max_s: float):
        self.max_s = max_s
        self.share = 1.0  # of recent spins that caught their input; starts hopeful
        self.caught = 0  # waits whose input came while spinning
        self.spins = 0
        self.deferred = 0  # waits that did not spin: another thread of the process had input
        self._skipped = 0

    @property
    def spinning(self) -> bool:
        return self.share >= self.MIN_SHARE

    def window(self) -> float:
        """Seconds the next wait spins before it sleeps (0: none)."""
        if len(_last_input) > 1 and _others_busy():
            self.deferred += 1
            return 0.0
        if self.share < self.MIN_SHARE:
            self._skipped += 1
            if self._skipped < self.PROBE_EVERY:
                return 0.0
            self._skipped = 0
        self.spins += 1
        return self.max_s

    def record(self, caught: bool) -> None:
        self.caught += caught
        self.share += (caught - self.share) * self.WEIGHT

    @staticmethod
    def arrived() -> None:
        """This thread's wait got its input (spinning or not): the other
        spinning threads of the process hold their spins for QUIET_S."""
        _last_input[threading.get_ident()] = _now()


def policy(max_s: float) -> SpinPolicy | None:
    """A policy spinning up to `max_s` seconds, or None for 0 (never)."""
    return SpinPolicy(max_s) if max_s > 0 else None


def statistics(policy: SpinPolicy | None, prefix: str, what: str) -> dict:
    """For the status: `{prefix}_us` (the spin in effect now, 0 while it does
    not pay or with no policy), `{prefix}s`, `polled_{what}`, `{prefix}_share`
    (None with no policy), `{prefix}s_deferred`."""
    if policy is None:
        return {f"{prefix}_us": 0, f"{prefix}s": 0, f"polled_{what}": 0, f"{prefix}_share": None,
                f"{prefix}s_deferred": 0}
    return {f"{prefix}_us": round(policy.max_s * 1e6) if policy.spinning else 0, f"{prefix}s": policy.spins,
            f"polled_{what}": policy.caught, f"{prefix}_share": round(policy.share, 3),
            f"{prefix}s_deferred": policy.deferred}


def _others_busy() -> bool:
    """Another spinning thread of this process had input within QUIET_S."""
    me, since = threading.get_ident(), _now() - QUIET_S
    return any(tid != me and t > since for tid, t in tuple(_last_input.items()))
