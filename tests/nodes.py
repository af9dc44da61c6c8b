"""Run repdisk nodes as real processes with real FUSE mounts, for tests.

Every node is stopped (SIGTERM, then SIGKILL) and its mount lazily unmounted
in teardown, whatever the test did."""

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import time

import pytest

HAVE_FUSE = os.path.exists("/dev/fuse") and os.geteuid() == 0
needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and root for FUSE mounts")


def wait_until(predicate, timeout: float = 20.0, what: str = "condition", interval: float = 0.02):
    """Poll `predicate` until it returns a truthy value; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def lazy_unmount(path: str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    subprocess.run(["umount", "-l", path], capture_output=True)


class Node:
    def __init__(self, role: str, args: list[str], mount: str, log_path: str, prefix=()):
        self.role, self.args, self.mount, self.log_path = role, args, mount, log_path
        self.prefix = list(prefix)  # e.g. nsenter --net=...: run the node in another network namespace
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def disk(self) -> str:
        return os.path.join(self.mount, "disk.img")

    @property
    def control(self) -> str:
        return os.path.join(self.mount, "control")

    def start(self, wait: bool = True) -> "Node":
        if self._log is not None and not self._log.closed:
            self._log.close()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "repdisk", self.role, *self.args],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 30.0) -> dict:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.role} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.status()
            except (OSError, ValueError):
                return None

        return wait_until(ready, timeout, f"{self.role} to mount {self.mount}")

    def status(self) -> dict:
        with open(self.control) as f:
            return json.load(f)

    def command(self, text: str) -> None:
        """Write a command to the control file; raises OSError on refusal."""
        fd = os.open(self.control, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)

    def command_errno(self, text: str) -> int:
        try:
            self.command(text)
        except OSError as e:
            return e.errno
        return 0

    def wait_state(self, *states: str, timeout: float = 30.0) -> dict:
        return wait_until(lambda: (s := self.status())["state"] in states and s, timeout,
                          f"{self.role} state in {states} (log: {self.log_path})")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        lazy_unmount(self.mount)
        if self._log is not None and not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash); the node can be started again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        lazy_unmount(self.mount)
        if self._log is not None and not self._log.closed:
            self._log.close()


def read_file(path: str, offset: int = 0, length: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        if length is None:
            length = os.fstat(fd).st_size - offset
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes, offset: int, fsync: bool = False, direct: bool = False) -> None:
    """pwrite `data` at `offset`; direct=True opens with O_DIRECT (as a
    hypervisor's cache=none does), any offset and length."""
    fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    try:
        if direct and data:  # from page-aligned memory, as such a writer's buffers are
            buf = mmap.mmap(-1, len(data))
            buf.write(data)
            data = memoryview(buf)
        assert os.pwrite(fd, data, offset) == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def errno_of(fn) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0


__all__ = ["Node", "needs_fuse", "wait_until", "read_file", "write_file", "errno_of", "errno", "HAVE_FUSE"]
