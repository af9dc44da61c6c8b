"""The systems under test: a plain file, QEMU's block replication pair, a repdisk pair.

Each pair has the same small interface, used by the sections in bench.py:
  start()                 set up both nodes (records startup seconds per node)
  pri_view / sec_view     the files fio works on
  checkpoint()            -> (primary seconds, secondary seconds)
  hidden_bytes()          bytes held in the secondary's hidden overlay
  failover()              -> seconds until the secondary is standalone
  pids                    {"primary": pid, "secondary": pid}
  quiesce()               wait until no replication is outstanding (repdisk's
                          async mode runs ahead of the secondary; QEMU's pair
                          and the single-process targets have nothing pending)
  stop_primary(), stop()  idempotent; stop() always unmounts and reaps
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

from .qmp import QMP, QMPError
from .util import (BenchError, Proc, allocated_bytes, copy_image, free_tcp_port,
                   lazy_unmount, make_sparse, wait_for)

QEMU = "qemu-system-x86_64"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _images(dirpath: str, size: int, image: str | None, names: tuple[str, ...]) -> None:
    for n in names:
        p = os.path.join(dirpath, n)
        if image:
            copy_image(image, p)
        else:
            make_sparse(p, size)


class PlainTarget:
    label = "plain file"

    def __init__(self, dirpath: str, size: int, image: str | None = None):
        self.dir = dirpath
        os.makedirs(dirpath, exist_ok=True)
        self.path = os.path.join(dirpath, "plain.img")
        _images(dirpath, size, image, ("plain.img",))

    def stop(self):
        pass


class PlainPairTarget:
    """What a replicating pair does to this machine's disk and memory, and
    nothing else: two fresh image files, written at once by two fio
    processes and each fsynced at the end.  Buffered in both of the bench's
    rows: whatever the VM asks for, both repdisk nodes (and QEMU's) write
    their images through the page cache, so a pair's 1 MiB job puts 2 x 512
    MiB into new page-cache memory and then onto the one disk.  No FUSE, no
    network, no copy-before-write: the most a pair can deliver here.  fio
    reports both files together; the bench records the rate per file."""

    label = "two plain files (a pair's disk)"
    workloads = ("seqwrite",)  # the one job whose data must reach the disk within it
    files = 2

    def __init__(self, dirpath: str, size: int):
        self.dir = dirpath
        os.makedirs(dirpath, exist_ok=True)
        _images(dirpath, size, None, tuple(f"pair.{i}.img" for i in range(self.files)))

    def fio_options(self, options: dict) -> dict:
        return options | {"numjobs": self.files, "group_reporting": 1, "directory": self.dir,
                          "filename_format": "pair.$jobnum.img"}

    def stop(self):
        pass


class PassthroughTarget:
    """The Python FUSE floor: tools/benchlib/passthrough.py over a raw file."""

    label = "pyfuse3 passthrough"

    def __init__(self, dirpath: str, size: int):
        self.dir = dirpath
        os.makedirs(dirpath, exist_ok=True)
        self.image = os.path.join(dirpath, "floor.img")
        self.mount = os.path.join(dirpath, "mnt")
        os.makedirs(self.mount, exist_ok=True)
        self.path = os.path.join(self.mount, "disk.img")
        _images(dirpath, size, None, ("floor.img",))
        self.procs: dict[str, Proc] = {}

    def start(self):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "passthrough.py")
        self.procs["floor"] = Proc("floor", [sys.executable, script, self.image, self.mount], self.dir)
        wait_for(lambda: self.procs["floor"].check_alive() or os.path.exists(self.path),
                 timeout=30, what="the pyfuse3 passthrough mount")

    def stop(self):
        for p in self.procs.values():
            p.stop()
        lazy_unmount(self.mount)


class QemuPair:
    """Two `qemu-system-x86_64 -M none` processes wired up as in the issue's recipe."""

    label = "QEMU"

    def __init__(self, dirpath: str, size: int, image: str | None = None,
                 sec_image: str | None = None, disks: tuple[str, str] | None = None):
        """image/sec_image: copied into fresh pri/sec raw files (default sparse);
        disks: (primary, secondary) raw files used in place instead."""
        self.dir, self.size = dirpath, size
        os.makedirs(dirpath, exist_ok=True)
        self.image, self.sec_image = image, sec_image or image
        self.in_place = disks is not None
        self.pri_raw, self.sec_raw = disks or (os.path.join(dirpath, "pri.raw"),
                                               os.path.join(dirpath, "sec.raw"))
        self.hidden = os.path.join(dirpath, "hidden.qcow2")
        self.active = os.path.join(dirpath, "active.qcow2")
        self.sec_view = os.path.join(dirpath, "sec-view")
        self.pri_view = os.path.join(dirpath, "pri-view")
        self.port = None
        self.procs: dict[str, Proc] = {}
        self.qmp: dict[str, QMP] = {}
        self.startup: dict[str, float] = {}
        self.hidden_base = 0
        self.failed_over = False
        self.failover_command_s: float | None = None

    @property
    def pids(self):
        return {role: p.pid for role, p in self.procs.items() if p.alive()}

    def prepare(self):
        if not self.in_place:
            _images(self.dir, self.size, self.image, ("pri.raw",))
            _images(self.dir, self.size, self.sec_image, ("sec.raw",))
        for q in (self.hidden, self.active):
            r = os.spawnvp(os.P_WAIT, "qemu-img", ["qemu-img", "create", "-q", "-f", "qcow2",
                                                   q, str(self.size)])
            if r != 0:
                raise BenchError(f"qemu-img create {q} failed")
        for v in (self.sec_view, self.pri_view):
            open(v, "w").close()

    def _spawn(self, role: str) -> QMP:
        sock = os.path.join(self.dir, f"{role}.qmp")
        if os.path.exists(sock):
            os.unlink(sock)
        p = Proc(f"qemu-{role}", [QEMU, "-M", "none", "-nodefaults", "-display", "none",
                                  "-qmp", f"unix:{sock},server=on,wait=off"], self.dir)
        self.procs[role] = p
        wait_for(lambda: os.path.exists(sock) or p.check_alive(), 20, f"{role} QMP socket")
        q = QMP(sock)
        self.qmp[role] = q
        return q

    def start(self, prepare: bool = True):
        if prepare:
            self.prepare()
        self.start_secondary()
        self.start_primary()

    def start_secondary(self):
        t0 = time.monotonic()
        s = self._spawn("secondary")
        s.cmd("blockdev-add", driver="raw", **{"node-name": "sec-disk"},
              file={"driver": "file", "filename": self.sec_raw})
        s.cmd("blockdev-add", driver="qcow2", **{"node-name": "hidden"},
              file={"driver": "file", "filename": self.hidden}, backing="sec-disk")
        s.cmd("blockdev-add", driver="qcow2", **{"node-name": "active"},
              file={"driver": "file", "filename": self.active}, backing="hidden")
        s.cmd("blockdev-add", driver="replication", **{"node-name": "sec-top", "top-id": "sec-top"},
              mode="secondary", file="active")
        self.port = free_tcp_port()
        s.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1",
                                                                  "port": str(self.port)}})
        s.cmd("block-export-add", type="nbd", id="nbd-sec", **{"node-name": "sec-disk"},
              writable=True, name="sec-disk")
        s.cmd("block-export-add", type="fuse", id="fuse-sec", **{"node-name": "sec-top"},
              mountpoint=self.sec_view, writable=True)
        s.cmd("xen-set-replication", enable=True, primary=False)
        self.startup["secondary"] = time.monotonic() - t0
        self.hidden_base = allocated_bytes(self.hidden)

    def start_primary(self):
        t0 = time.monotonic()
        p = self._spawn("primary")
        p.cmd("blockdev-add", driver="raw", **{"node-name": "pri-disk"},
              file={"driver": "file", "filename": self.pri_raw})
        p.cmd("blockdev-add", driver="quorum", children=["pri-disk"],
              **{"node-name": "colo-disk", "vote-threshold": 1, "read-pattern": "fifo"})
        p.cmd("blockdev-add", driver="replication", **{"node-name": "rep-pri"}, mode="primary",
              file={"driver": "nbd", "export": "sec-disk",
                    "server": {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}})
        p.cmd("x-blockdev-change", parent="colo-disk", node="rep-pri")
        p.cmd("xen-set-replication", enable=True, primary=True)
        p.cmd("block-export-add", type="fuse", id="fuse-pri", **{"node-name": "colo-disk"},
              mountpoint=self.pri_view, writable=True)
        self.startup["primary"] = time.monotonic() - t0

    def nbd_uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/sec-disk"

    def checkpoint(self) -> tuple[float, float]:
        t0 = time.monotonic()
        self.qmp["primary"].cmd("xen-colo-do-checkpoint")
        t1 = time.monotonic()
        self.qmp["secondary"].cmd("xen-colo-do-checkpoint")
        t2 = time.monotonic()
        self.hidden_base = allocated_bytes(self.hidden)
        return t1 - t0, t2 - t1

    def hidden_bytes(self) -> int:
        return allocated_bytes(self.hidden) - self.hidden_base

    def overlay_bytes(self) -> dict:
        return {"hidden_file_allocated": allocated_bytes(self.hidden),
                "active_file_allocated": allocated_bytes(self.active)}

    def _sec_top_file(self) -> str | None:
        """The node under sec-top's "file" edge: `active` while replicating, a commit
        filter while the failover commit runs, `sec-disk` once it is done."""
        g = self.qmp["secondary"].cmd("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in g["nodes"]}
        for e in g["edges"]:
            if names.get(e["parent"]) == "sec-top" and e["name"] == "file":
                return names.get(e["child"])
        return None

    def failover(self, timeout: float = 600) -> float:
        s = self.qmp["secondary"]
        before = self._sec_top_file()
        if before != "active":
            raise BenchError(f"sec-top's file is {before!r} before failover, not 'active'")
        t0 = time.monotonic()
        s.cmd("nbd-server-stop")
        s.cmd("xen-set-replication", enable=False, primary=False, failover=True)
        wait_for(lambda: self._sec_top_file() == "sec-disk", timeout,
                 "QEMU secondary failover (sec-top's file -> sec-disk)", interval=0.001)
        self.failed_over = True
        self.failover_command_s = time.monotonic() - t0
        return self.failover_command_s

    def stop_primary(self):
        self._stop_role("primary", self.pri_view)

    def _stop_role(self, role, view):
        q = self.qmp.pop(role, None)
        if q:
            try:
                q.cmd("quit")
            except (QMPError, OSError):
                pass
            q.close()
        p = self.procs.get(role)
        if p:
            p.stop()
        lazy_unmount(view)

    def stop(self):
        try:
            self._stop_role("primary", self.pri_view)
        finally:
            self._stop_role("secondary", self.sec_view)


class RepdiskPair:
    """`repdisk secondary` + `repdisk primary`, over a unix socket or TCP loopback."""

    label = "repdisk"

    def __init__(self, dirpath: str, size: int, mode: str = "sync", transport: str = "unix",
                 image: str | None = None, sec_image: str | None = None,
                 assume_synced: bool = True, extra_primary: list[str] | None = None,
                 disks: tuple[str, str] | None = None, extra_secondary: list[str] | None = None):
        self.dir, self.size, self.mode, self.transport = dirpath, size, mode, transport
        os.makedirs(dirpath, exist_ok=True)
        self.image, self.sec_image = image, (sec_image if sec_image is not None else image)
        self.assume_synced = assume_synced
        self.extra_primary = extra_primary or []
        self.extra_secondary = extra_secondary or []
        self.in_place = disks is not None
        self.pri_disk, self.sec_disk = disks or (os.path.join(dirpath, "pri.raw"),
                                                 os.path.join(dirpath, "sec.raw"))
        self.sec_mnt = os.path.join(dirpath, "sec-mnt")
        self.pri_mnt = os.path.join(dirpath, "pri-mnt")
        self.sec_view = os.path.join(self.sec_mnt, "disk.img")
        self.pri_view = os.path.join(self.pri_mnt, "disk.img")
        self.procs: dict[str, Proc] = {}
        self.startup: dict[str, float] = {}
        self.failover_command_s: float | None = None
        if transport == "unix":
            sock = os.path.join(dirpath, "nbd.sock")
            self.listen, self.uri = f"unix:{sock}", f"nbd+unix:///?socket={sock}"
        else:
            self.listen = self.uri = None

    @property
    def pids(self):
        return {role: p.pid for role, p in self.procs.items() if p.alive()}

    def prepare(self):
        if not self.in_place:
            for path, image in ((self.pri_disk, self.image), (self.sec_disk, self.sec_image)):
                if image:
                    copy_image(image, path)
                else:
                    make_sparse(path, self.size)
        for d in (self.sec_mnt, self.pri_mnt, os.path.join(self.dir, "sec-state"),
                  os.path.join(self.dir, "pri-state")):
            os.makedirs(d, exist_ok=True)

    def _argv(self, role: str) -> list[str]:
        return [sys.executable, "-m", "repdisk", role]

    def control_path(self, role: str) -> str:
        return os.path.join(self.pri_mnt if role == "primary" else self.sec_mnt, "control")

    def status(self, role: str) -> dict:
        with open(self.control_path(role), "rb") as f:
            return json.loads(f.read())

    def _try_status(self, role: str):
        self.procs[role].check_alive()
        try:
            return self.status(role)
        except (OSError, ValueError):
            return None

    def command(self, role: str, cmd: str) -> float:
        t0 = time.monotonic()
        fd = os.open(self.control_path(role), os.O_WRONLY)
        try:
            os.write(fd, (cmd + "\n").encode())
        except OSError as e:
            raise BenchError(f"{role}: '{cmd}' failed: {e}; status "
                             f"{self._try_status(role)}") from None
        finally:
            os.close(fd)
        return time.monotonic() - t0

    def start(self, prepare: bool = True, wait_replicating: bool = True):
        if prepare:
            self.prepare()
        self.start_secondary()
        self.start_primary(wait_replicating=wait_replicating)

    def start_secondary(self):
        if self.transport == "tcp":
            port = free_tcp_port()
            self.listen, self.uri = f"127.0.0.1:{port}", f"nbd://127.0.0.1:{port}"
        argv = self._argv("secondary") + [
            "--disk", self.sec_disk, "--listen", self.listen, "--mount", self.sec_mnt,
            "--size", str(self.size), "--state-dir", os.path.join(self.dir, "sec-state")] + self.extra_secondary
        p = Proc("repdisk-secondary", argv, self.dir)
        self.procs["secondary"] = p
        wait_for(lambda: self._try_status("secondary"), 60, "the secondary's control file")
        self.startup["secondary"] = time.monotonic() - p.t_start

    def start_primary(self, wait_replicating: bool = True):
        argv = self._argv("primary") + [
            "--disk", self.pri_disk, "--secondary", self.uri, "--mount", self.pri_mnt,
            "--size", str(self.size), "--mode", self.mode,
            "--state-dir", os.path.join(self.dir, "pri-state")] + self.extra_primary
        if self.assume_synced:
            argv.append("--assume-synced")
        p = Proc("repdisk-primary", argv, self.dir)
        self.procs["primary"] = p
        st = wait_for(lambda: self._try_status("primary"), 60, "the primary's control file")
        self.startup["primary_control"] = time.monotonic() - p.t_start
        if wait_replicating:
            self.wait_state("primary", "replicating", timeout=600)
        self.startup["primary"] = time.monotonic() - p.t_start
        return st

    def wait_state(self, role: str, state: str, timeout: float, interval: float = 0.002) -> dict:
        return self._wait_status(role, lambda st: st.get("state") == state, f"state {state}",
                                 timeout, interval, failed={"degraded", "standalone"} - {state})

    def _wait_status(self, role: str, ok, what: str, timeout: float, interval: float,
                     failed=frozenset(("degraded", "standalone"))) -> dict:
        """Poll `role`'s status until ok(status); a state in `failed` ends the wait."""
        def check():
            st = self._try_status(role)
            if st and st.get("state") in failed:
                raise BenchError(f"{role} went {st.get('state')} waiting for {what}: "
                                 f"{st.get('error')}")
            return st if st and ok(st) else None
        return wait_for(check, timeout, f"{role} {what}", interval)

    def checkpoint(self) -> tuple[float, float]:
        return self.command("primary", "checkpoint"), self.command("secondary", "checkpoint")

    def __str__(self) -> str:
        return f"repdisk {self.mode} {self.transport} pair"

    def quiesce(self, timeout: float = 300) -> None:
        """Wait until the primary has no request to the secondary outstanding,
        so that the next measurement does not pay for the last one's tail."""
        self._wait_status("primary", lambda st: st.get("inflight_requests") == 0,
                          "replication to go idle", timeout, interval=0.01)

    def hidden_bytes(self) -> int:
        return int(self.status("secondary")["hidden_bytes"])

    def overlay_bytes(self) -> dict:
        st = self.status("secondary")
        return {"hidden_bytes": st.get("hidden_bytes"), "active_bytes": st.get("active_bytes")}

    def failover(self, timeout: float = 600) -> float:
        """Seconds from `echo failover` until the status says standalone.  The command
        is written from a thread: it may return later than the state changes (the
        time it took is kept in self.failover_command_s)."""
        result: dict = {}

        def send():
            try:
                result["seconds"] = self.command("secondary", "failover")
            except BaseException as e:  # reported by the poll loop below
                result["error"] = e

        th = threading.Thread(target=send, name="failover-command", daemon=True)
        t0 = time.monotonic()
        th.start()

        def done():
            if "error" in result:
                raise result["error"]
            st = self._try_status("secondary")
            return st if st and st.get("state") == "standalone" else None
        wait_for(done, timeout, "secondary state standalone", interval=0.001)
        elapsed = time.monotonic() - t0
        th.join(timeout)
        if "error" in result:
            raise result["error"]
        self.failover_command_s = result.get("seconds")
        return elapsed

    def stop_primary(self):
        p = self.procs.get("primary")
        if p:
            p.stop()
        lazy_unmount(self.pri_mnt)

    def stop(self):
        try:
            self.stop_primary()
        finally:
            p = self.procs.get("secondary")
            if p:
                p.stop()
            lazy_unmount(self.sec_mnt)
