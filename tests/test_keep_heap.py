"""repdisk.app.keep_heap: buffers of a node's writes are reused heap memory,
not fresh pages every time.  Measured in a fresh interpreter (malloc settings
are per process), with the allocation pattern of async replication: several
1 MiB buffers alive at once, then freed."""

import subprocess
import sys

PROGRAM = r"""
import resource, sys
from repdisk.app import keep_heap
if sys.argv[1] == "keep":
    assert keep_heap()
def burst():
    held = [b"\x01" * (1 << 20) for _ in range(8)]  # malloc, every page written
    held.clear()
burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_freed_write_buffers_stay_mapped():
    kept = faults("keep")
    default = faults("default")
    # 20 bursts of 8 MiB: with glibc's defaults most of every burst is fresh
    # pages (up to 40,960 faults); kept, the first burst's pages are reused.
    assert kept < 256, kept
    assert default > 10 * 256, f"glibc's defaults reused the heap too ({default} faults): the test shows nothing"
