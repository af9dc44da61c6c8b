"""`repdisk pair`: a primary and a secondary on this machine over a unix
socket, as child processes; Ctrl-C stops both (primary first) and unmounts."""

import json
import os
import signal
import subprocess
import sys
import time

from .cli import UserError


def _wait_control(proc, mount: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    path = os.path.join(mount, "control")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the node for {mount} exited with status {proc.returncode}; see its messages above")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            time.sleep(0.05)
    raise UserError(f"{mount}: the node did not come up within {timeout:.0f} s")


def run_pair(args) -> int:
    root = os.path.abspath(args.root)
    state = os.path.join(root, "state")
    mounts = os.path.join(root, "mount")
    os.makedirs(state, exist_ok=True)
    sock = os.path.join(state, "secondary.sock")
    pri_mount, sec_mount = os.path.join(mounts, "primary"), os.path.join(mounts, "secondary")
    exe = [sys.executable, "-m", "repdisk"]
    size = ["--size", args.size, "--direct-writes", args.direct_writes]
    if args.write_behind is not None:
        size += ["--write-behind", str(args.write_behind)]
    procs = []
    # Ctrl-C and SIGTERM stop the pair, even when SIGINT came in ignored (a
    # shell starts background jobs with SIGINT ignored, and Python keeps that).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        sec = subprocess.Popen(exe + ["secondary", "--disk", os.path.join(state, "secondary.img"), *size,
                                      "--listen", f"unix:{sock}", "--mount", sec_mount],
                               start_new_session=True)  # Ctrl-C reaches only us: we stop them in order
        procs.append(sec)
        _wait_control(sec, sec_mount)
        pri = subprocess.Popen(exe + ["primary", "--disk", os.path.join(state, "primary.img"), *size,
                                      "--secondary", f"nbd+unix:///?socket={sock}", "--mount", pri_mount,
                                      "--mode", args.mode], start_new_session=True)
        procs.append(pri)
        _wait_control(pri, pri_mount)
        rel = lambda p: os.path.relpath(p)  # noqa: E731
        print(f"""
repdisk pair is running ({args.mode} mode, {args.size}).
  primary disk    {rel(pri_mount)}/disk.img   (the primary VM's disk)
  secondary view  {rel(sec_mount)}/disk.img   (the secondary VM's disk)
Try:
  dd if=/dev/urandom of={rel(pri_mount)}/disk.img bs=1M count=16 conv=notrunc,fsync
  cat {rel(pri_mount)}/control                      # state, sync progress, dirty bytes
  echo checkpoint > {rel(pri_mount)}/control && echo checkpoint > {rel(sec_mount)}/control
  cmp {rel(pri_mount)}/disk.img {rel(sec_mount)}/disk.img && echo identical
  echo failover > {rel(sec_mount)}/control          # the secondary takes over
Ctrl-C stops both nodes and unmounts.
""", flush=True)
        while all(p.poll() is None for p in procs):
            signal.pause()  # SIGINT raises KeyboardInterrupt, SIGTERM too (below), SIGCHLD wakes us
        print("a node exited; stopping the pair", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):  # primary first: it drains into the secondary
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    print("pair stopped", file=sys.stderr)
    return 0
