"""fio workloads and their JSON results."""
from __future__ import annotations

import contextlib
import json
import resource
import subprocess

from .pause import Checkpointer
from .util import BenchError, MiB

# name -> (description, fio options, metric); sizes/runtimes are filled in by make_jobs.
WORKLOADS = ("seqwrite", "randwrite", "randread", "randwrite4", "ckptwrite")
DESCRIPTION = {
    "seqwrite": "seq write 1 MiB, end_fsync",
    "randwrite": "rand write 4 KiB QD1",
    "randread": "rand read 4 KiB QD1",
    "randwrite4": "rand write 4 KiB x4 jobs",
    "ckptwrite": "rand write 4 KiB QD1, checkpoint/s",
}
METRIC = {"seqwrite": "MiB/s", "randwrite": "IOPS", "randread": "IOPS", "randwrite4": "IOPS",
          "ckptwrite": "IOPS"}
IS_WRITE = {"seqwrite": True, "randwrite": True, "randread": False, "randwrite4": True,
            "ckptwrite": True}
# Workloads run on a pair (its primary, or the secondary's view) with fio
# paused for a checkpoint of both nodes every so many seconds
# (pause.Checkpointer): COLO's steady state, where each checkpoint empties the
# secondary's overlays, the primary's writes after it copy before they write
# and the secondary guest's writes start a new active overlay.
CHECKPOINT_PERIOD = {"ckptwrite": 1.0}


def job_options(workload: str, size: int, runtime: int) -> dict:
    base = {"ioengine": "psync", "iodepth": 1, "size": size, "fallocate": "none",
            "allow_file_create": 0}
    if workload == "seqwrite":
        return base | {"rw": "write", "bs": "1M", "end_fsync": 1}
    timed = {"time_based": 1, "runtime": runtime, "norandommap": 1, "bs": "4k"}
    if workload in ("randwrite", "ckptwrite"):
        return base | timed | {"rw": "randwrite"}
    if workload == "randread":
        return base | timed | {"rw": "randread"}
    if workload == "randwrite4":
        return base | timed | {"rw": "randwrite", "numjobs": 4, "group_reporting": 1}
    raise ValueError(workload)


def run_fio(filename: str | None, options: dict, direct: bool, timeout: float = 600,
            checkpoint=None, period: float = 1.0) -> dict:
    """Run one fio job on `filename` (None: the options name the files);
    return {mibs, iops, p50_us, p99_us, p999_us, runtime_ms, ios, fio_cpu_s}: `ios` the
    I/Os done, `fio_cpu_s` [user, system] CPU seconds of fio and its job
    processes (the system part includes the kernel's side of each request,
    FUSE's included).  With `checkpoint` (a callable), fio is paused for a
    call of it every `period` seconds, and the result has "checkpoints"
    (pause.Checkpointer.summary); a failed checkpoint fails the job."""
    argv = ["fio", "--name=bench", "--output-format=json", f"--direct={1 if direct else 0}"]
    if filename is not None:
        argv.append(f"--filename={filename}")
    argv += [f"--{k}={v}" for k, v in options.items()]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as r:
        ckpt = Checkpointer(r.pid, checkpoint, period) if checkpoint is not None else None
        with ckpt or contextlib.nullcontext():
            try:
                out, err_text = r.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                r.kill()
                r.communicate()
                raise BenchError(f"fio timed out after {timeout:.0f}s") from None
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if ckpt is not None and ckpt.error:
        raise BenchError(ckpt.error)
    try:
        data = json.loads(out[out.index("{"):])
    except ValueError:
        data = None
    if r.returncode != 0 or not data or data["jobs"][0].get("error"):
        err = (err_text.strip() or out.strip()).splitlines()
        msg = "; ".join(line for line in err if line.strip())[-300:]
        if data and data["jobs"][0].get("error"):
            msg = f"fio error {data['jobs'][0]['error']}: {msg}"
        raise BenchError(msg or f"fio exited {r.returncode}")
    job = data["jobs"][0]
    write = options["rw"] in ("write", "randwrite")
    side = job["write"] if write else job["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    result = {
        "mibs": side["bw_bytes"] / MiB,
        "iops": side["iops"],
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "p999_us": pct.get("99.900000", 0) / 1000,
        # The group's wall time: job_runtime sums the jobs' (numjobs > 1).
        "runtime_ms": side.get("runtime") or job.get("job_runtime"),
        "ios": side.get("total_ios", 0),
        "fio_cpu_s": [ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime],
    }
    if ckpt is not None:
        result["checkpoints"] = ckpt.summary()
    return result


def write_random(filename: str, amount: int, region: int, jobs: int = 2, direct: bool = False,
                 offset: int = 0, seed: int = 0, timeout: float = 600) -> dict:
    """Write `amount` bytes as distinct random 4 KiB blocks into [offset, offset+region),
    split over `jobs` processes each owning a slice (so no block is written twice)."""
    per_region = region // jobs // 4096 * 4096
    per_amount = amount // jobs // 4096 * 4096
    opts = {"ioengine": "psync", "iodepth": 1, "rw": "randwrite", "bs": "4k",
            "fallocate": "none", "allow_file_create": 0, "numjobs": jobs,
            "group_reporting": 1, "size": per_region, "io_size": per_amount,
            "offset": offset, "offset_increment": per_region,
            "randseed": 1000 + seed}
    return run_fio(filename, opts, direct, timeout=timeout)
