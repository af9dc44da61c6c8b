"""A thread that starts the write-back of image ranges as they are handed
over, so that a later fsync finds little left to write.

Two users:
- the failover commit hands it each copied window (SecondaryNode._commit);
- each node's image hands it every `--write-behind` bytes of large writes
  (RawImage.set_write_behind): a VM writing a big file, or the primary's
  writes of it arriving at the secondary.  The VM's fsync after them then
  waits for the rest only, not for the whole stream, and the two nodes'
  disks write while the stream comes instead of all at the end.

The call (sync_file_range WRITE) can block while the disk's queue is full
(up to ~20 ms here); made from the I/O path it held the writes up (README,
*Tried and dropped*), so it is made from this thread, and nothing waits
for it."""

import os
import queue
import threading


class WriteBehind:
    """Starts the write-back of ranges of an image as they are handed over
    (`RawImage.write_back_soon`), in a thread of its own, and never waits
    for it to finish: only a head start for a later fsync, which reports
    any error."""

    def __init__(self, image, idle: bool = False):
        """idle: the thread runs at SCHED_IDLE priority, only on a CPU that
        nothing else wants (the streams' write-behind: see the module doc)."""
        self.image = image
        self.idle = idle
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.started_bytes = 0  # handed to the kernel's write-back (status, tests)
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._thread.start()

    def as_dict(self) -> dict:
        """For the control file."""
        return {"every_bytes": self.image.write_behind_every, "started_bytes": self.started_bytes}

    def add(self, offset: int, length: int) -> None:
        if length and not self._closed:
            self._queue.put((offset, length))

    def close(self, wait: float = 0.0) -> None:
        """Start nothing more (the fsync that follows writes what is left).
        wait: seconds to wait for a call in progress to return, before the
        caller closes the image (its descriptor number could otherwise be
        reused under the call); 0 returns at once."""
        self._closed = True
        self._queue.put(None)
        if wait > 0:
            self._thread.join(wait)

    def _run(self) -> None:
        if self.idle:
            try:  # this thread only (pid 0 is the calling thread on Linux)
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except (AttributeError, OSError):
                pass  # not Linux, or refused: normal priority then
        while (item := self._queue.get()) is not None and not self._closed:
            self.image.write_back_soon(*item)
            self.started_bytes += item[1]
