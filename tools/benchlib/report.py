"""Medians, ratios, the issue's targets, the stdout table and the PNG chart."""
from __future__ import annotations

import statistics

from .fio import DESCRIPTION, IS_WRITE, METRIC, WORKLOADS
from .profile import busy_symbols
from .util import MiB, summarize

FIO_ORDER = ["plain", "plain-pair", "py-floor", "qemu-pri", "qemu-sec", "rd-sync-unix", "rd-async-unix", "rd-sync-tcp",
             "rd-async-tcp", "rd-sync-unix-norf", "rd-sync-unix-dw", "rd-async-unix-nowb", "rd-sec", "rd-sec-dw"]
CKPT_LABEL = {"qemu": "QEMU", "rd-sync": "repdisk sync", "rd-async": "repdisk async"}
# A setting measured next to the default in the same run: variant -> (the
# default's target, its ratio to it).  Variants carry no target check.
AGAINST_DEFAULT = {"rd-sync-unix-dw": ("rd-sync-unix", "xdwoff"), "rd-sec-dw": ("rd-sec", "xdwoff"),
                   "rd-async-unix-nowb": ("rd-async-unix", "xwbon")}


def _qemu_peer(key: str) -> str | None:
    if key.startswith("rd-sec"):
        return "qemu-sec"
    if key.startswith("rd-") or key in ("py-floor", "plain-pair"):
        return "qemu-pri"
    return None


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a["median"] / b["median"]


def _first_error(errors: list[str]) -> str | None:
    return errors[0] if errors else None


def link_losses(primary_log: str) -> list[str]:
    """Why the primary lost its secondary, from its log ("secondary lost:
    URI: reason; tracking ..."), each reason once, in order: the status
    forgets it once the link is back."""
    out: list[str] = []
    for line in primary_log.splitlines():
        _, sep, rest = line.partition("secondary lost: ")
        if not sep:
            continue
        reason = rest.split("; tracking changed blocks", 1)[0]
        if reason.startswith(("nbd", "replica link to ")):  # the URI first
            reason = reason.split(": ", 1)[-1]
        if reason not in out:
            out.append(reason)
    return out


def flush_note(runs: list[dict]) -> str:
    """The primary's flushes in the 1 TiB write runs, per run: how many, and
    any failed local fsync (repaired from the secondary, or for good)."""
    parts = []
    for r in runs:
        f = r.get("flushes")
        if f is None:
            continue
        text = f"{f['flushes']} flushes"
        if f.get("repairs"):
            held = (f.get("repair") or {}).get("writes_held_s")
            text += f", {f['repairs']} repaired" + (f" (writes held {held:.2f} s)" if held is not None else "")
        if f.get("flush_broken"):
            why = (f.get("repair") or {}).get("refused")
            text += ", flushing broken" + (f" (no repair: {why})" if why else
                                           f": {f['flush_broken'].rsplit(': ', 1)[-1]}")
        if f.get("writes_marked_dirty"):
            text += f", {f['writes_marked_dirty']} writes only marked for a resync"
        if f.get("link_lost"):
            text += f" (secondary lost: {'; '.join(f['link_lost'])})"
        if f.get("state") not in (None, "replicating"):
            text += f", ended {f['state']}"
        parts.append(text)
    return "; ".join(parts)


def checkpoint_note(runs: list[dict]) -> str:
    """Of fio runs paused for checkpoints (fio.CHECKPOINT_PERIOD): how many
    checkpoints, and how long fio stood still for each."""
    pauses = sorted(p for r in runs for p in r.get("checkpoints", {}).get("pauses_s", []))
    if not pauses:
        return ""
    return (f"{len(pauses)} checkpoints, fio paused {1000 * statistics.median(pauses):.1f} ms "
            f"at p50, {1000 * pauses[-1]:.1f} ms at most")


def summarize_all(res: dict) -> dict:
    """-> {"rows": [...], "checks": [...]}; each row: section, item, target, unit,
    median/min/max/n (or na with a reason), ratios {name: value}, lower_is_better."""
    rows: list[dict] = []

    def add(section, item, target, unit, summ, errors=(), ratios=None, lower=False, extra=None):
        row = {"section": section, "item": item, "target": target, "unit": unit,
               "lower_is_better": lower, "ratios": {k: v for k, v in (ratios or {}).items()
                                                    if v is not None}}
        if summ:
            row.update({k: summ[k] for k in ("median", "min", "max", "n")})
        else:
            row["na"] = _first_error(list(errors)) or "not measured"
        if extra:
            row.update(extra)
        rows.append(row)
        return row

    fio = res.get("fio", {}).get("targets", {})
    labels = res.get("fio", {}).get("labels", {})
    fio_summ: dict = {}
    ran = {wl for t in fio.values() for cells in t.values() for wl in cells}  # --workloads may pick some
    for wl in [w for w in WORKLOADS if w in ran]:
        for io in ("direct", "buffered"):
            for key in [k for k in FIO_ORDER if k in fio]:
                cell = fio[key].get(io, {}).get(wl)
                if cell is None:  # not a job for this target (two plain files: seqwrite only)
                    continue
                field = "mibs" if METRIC[wl] == "MiB/s" else "iops"
                runs = cell["runs"]
                fio_summ[(wl, io, key)] = {
                    "v": summarize([r[field] for r in runs]),
                    "p50": summarize([r["p50_us"] for r in runs]),
                    "p99": summarize([r["p99_us"] for r in runs]),
                    "cpu": cpu_per_io(runs),
                    "errors": cell["errors"],
                }
    for (wl, io, key), s in fio_summ.items():
        ratios = {}
        peer = _qemu_peer(key)
        if peer and (wl, io, peer) in fio_summ:
            ratios["xQEMU"] = _ratio(s["v"], fio_summ[(wl, io, peer)]["v"])
        if key != "plain" and (wl, io, "plain") in fio_summ:
            ratios["xplain"] = _ratio(s["v"], fio_summ[(wl, io, "plain")]["v"])
        if key.startswith("rd-") and (wl, io, "py-floor") in fio_summ:
            ratios["xfloor"] = _ratio(s["v"], fio_summ[(wl, io, "py-floor")]["v"])
        if (key.startswith("rd-") or key == "qemu-pri") and not key.startswith("rd-sec") and (wl, io, "plain-pair") in fio_summ:
            ratios["xpair"] = _ratio(s["v"], fio_summ[(wl, io, "plain-pair")]["v"])
        if key == "rd-sync-unix" and IS_WRITE[wl] and (wl, io, "rd-sync-unix-norf") in fio_summ:
            # what replica first buys over the activity log path, same run
            ratios["xnorf"] = _ratio(s["v"], fio_summ[(wl, io, "rd-sync-unix-norf")]["v"])
        default, name = AGAINST_DEFAULT.get(key, (None, None))
        if default and (wl, io, default) in fio_summ:
            # what --direct-writes on / --write-behind does against the default, same run
            ratios[name] = _ratio(s["v"], fio_summ[(wl, io, default)]["v"])
        extra = {"workload": wl, "io": io, "key": key}
        note = checkpoint_note(fio[key][io][wl]["runs"])
        if note:
            extra["note"] = note
        if s["p50"]:
            extra["p50_us"] = s["p50"]["median"]
            extra["p99_us"] = s["p99"]["median"]
        if s["cpu"]:
            extra["cpu"] = s["cpu"]
            base = fio_summ.get((wl, io, peer), {}).get("cpu") if peer else None
            if base and base["total_us"]:
                extra["cpu"]["xQEMU"] = s["cpu"]["total_us"] / base["total_us"]
        add("fio", f"{DESCRIPTION[wl]}, {io}", labels.get(key, key), METRIC[wl], s["v"],
            s["errors"], ratios, extra=extra)

    ck = res.get("checkpoint", {})
    systems = ck.get("systems", {})
    fo_amount = ck.get("failover_amount", 0)

    def per_system(item, unit, values, extra=None):
        """One row per checkpoint system, summarizing values(system's results),
        with the ratio to QEMU's row (QEMU comes first)."""
        base = None
        for sysname in ["qemu", "rd-sync", "rd-async"]:
            if sysname not in systems:
                continue
            sres = systems[sysname]
            summ = summarize(values(sres))
            if sysname == "qemu":
                base = summ
            ratios = {"xQEMU": _ratio(summ, base)} if sysname != "qemu" else {}
            add("checkpoint", item, CKPT_LABEL[sysname], unit, summ, sres["errors"], ratios, lower=True,
                extra={"key": sysname, **(extra(sres) if extra else {})})

    def rounds(amount):
        return lambda sres: sres["rounds"].get(str(amount), [])

    for amount in ck.get("amounts", []):
        per_system(f"checkpoint after {amount // MiB} MiB (pri+sec)", "ms",
                   lambda sres, r=rounds(amount): [1000 * x["total_s"] for x in r(sres)],
                   lambda sres, r=rounds(amount), amount=amount: {
                       "amount": amount,
                       "primary_ms": (summarize([1000 * x["primary_s"] for x in r(sres)]) or {}).get("median"),
                       "secondary_ms": (summarize([1000 * x["secondary_s"] for x in r(sres)]) or {}).get("median")})
    for amount in ck.get("amounts", []):
        per_system(f"hidden bytes / primary byte after {amount // MiB} MiB", "x",
                   lambda sres, r=rounds(amount): [x["hidden_per_byte"] for x in r(sres)],
                   lambda sres, amount=amount: {"amount": amount})
    per_system(f"failover commit after {fo_amount // MiB} MiB", "ms",
               lambda sres: [1000 * f["seconds"] for f in sres["failover"]],
               lambda sres: {"amount": fo_amount})
    per_system("  ... until the failover command returns", "ms",
               lambda sres: [1000 * f["command_s"] for f in sres["failover"] if f.get("command_s") is not None],
               lambda sres: {"amount": fo_amount})

    sy = res.get("sync", {})
    if sy.get("runs"):
        size = sy["size"]
        mib = size / MiB
        sums = {k: summarize([mib / r["seconds"] for r in v]) for k, v in sy["runs"].items()}
        errors = sy.get("errors", [])
        for k in sorted(sums, key=lambda k: (not k.startswith("repdisk"), k)):
            ratios = {}
            if k.startswith("repdisk-"):
                peer = "nbdcopy-" + k
                ratios["xnbdcopy"] = _ratio(sums[k], sums.get(peer))
                label = f"repdisk initial sync ({k.split('-')[1]})"
            elif k.startswith("nbdcopy-repdisk"):
                label = f"nbdcopy -> repdisk secondary ({k.split('-')[2]})"
            else:
                label = "nbdcopy -> QEMU secondary (tcp)"
            add("sync", f"initial sync {size // MiB} MiB (half data, half holes)", label,
                "MiB/s", sums[k], [e for e in errors if e.startswith(k)], ratios,
                extra={"key": k})

    no = res.get("nodes", {})
    nsys = no.get("systems", {})
    for metric, unit, label in (("startup", "s", "start-up"), ("rss_idle", "MiB", "RSS idle, 1 TiB disk"),
                                ("rss_after_writes", "MiB",
                                 f"RSS after {no.get('write', 0) // MiB} MiB random writes")):
        for role in ("secondary", "primary"):
            base = None
            for sysname in ["qemu", "repdisk"]:
                if sysname not in nsys:
                    continue
                runs = nsys[sysname]["runs"]
                scale = 1 if unit == "s" else 1 / MiB
                summ = summarize([r[metric][role] * scale for r in runs if role in r.get(metric, {})])
                if sysname == "qemu":
                    base = summ
                ratios = {"xQEMU": _ratio(summ, base)} if sysname != "qemu" else {}
                add("nodes", f"{label}, {role}", "QEMU" if sysname == "qemu" else "repdisk",
                    unit, summ, nsys[sysname]["errors"], ratios, lower=True,
                    extra={"key": sysname, "role": role, "metric": metric})
    # the writes themselves: random 4 KiB over a 1 TiB disk, sync mode (what
    # the primary's activity log costs when nearly every write is in a new extent)
    base = None
    for sysname in [s for s in ("qemu", "repdisk") if s in nsys]:
        summ = summarize([r["write_iops"] for r in nsys[sysname]["runs"] if "write_iops" in r])
        if sysname == "qemu":
            base = summ
        extra = {"key": sysname, "metric": "write_iops"}
        note = flush_note(nsys[sysname]["runs"])
        if note:
            extra["note"] = note
        add("nodes", "rand 4 KiB writes, 1 TiB disk, sync, 2 jobs",
            "QEMU" if sysname == "qemu" else "repdisk", "IOPS", summ, nsys[sysname]["errors"],
            {"xQEMU": _ratio(summ, base)} if sysname != "qemu" else {},
            extra=extra)
    return {"rows": rows, "checks": checks(rows, res)}


def cpu_per_io(runs: list[dict]) -> dict | None:
    """CPU time per I/O of fio runs (medians over the runs, in µs):
    {"parts": {name: [user, system]}, "total_us": ...}, parts being fio (with
    the kernel's side of each request) and each process of the target.  None
    when the runs carry no CPU figures (results from before they were taken)."""
    per_run = []
    for r in runs:
        if not r.get("ios") or "fio_cpu_s" not in r:
            continue
        parts = {"fio": r["fio_cpu_s"], **r.get("daemon_cpu_s", {})}
        per_run.append({k: [1e6 * u / r["ios"], 1e6 * sy / r["ios"]] for k, (u, sy) in parts.items()})
    if not per_run:
        return None
    names = [k for k in per_run[0] if all(k in p for p in per_run)]
    parts = {k: [summarize([p[k][0] for p in per_run])["median"],
                 summarize([p[k][1] for p in per_run])["median"]] for k in names}
    total = summarize([sum(p[k][0] + p[k][1] for k in names) for p in per_run])
    return {"parts": parts, "total_us": total["median"], "total_min": total["min"],
            "total_max": total["max"]}


def checks(rows: list[dict], res: dict) -> list[dict]:
    """The issue's targets, evaluated on this run's medians."""
    out = []

    def check(target, item, value, ok, note=""):
        out.append({"target": target, "item": item, "value": value, "ok": ok, "note": note})

    # Where two plain files were measured, a pair's write cell carries what they
    # made of the same target: a ratio above it asks more of a pair than the disk
    # and memory give with nothing but the two image writes.
    disk = {(r["workload"], r["io"]): r["ratios"]["xQEMU"] for r in rows
            if r["section"] == "fio" and r.get("key") == "plain-pair" and "xQEMU" in r["ratios"]}
    for r in rows:
        if r["section"] != "fio" or not r.get("key", "").startswith("rd-"):
            continue
        x = r["ratios"].get("xQEMU")
        key, wl = r["key"], r["workload"]
        what = f"{r['target']}: {r['item']}"
        if "na" in r or x is None or key.endswith("-norf") or key in AGAINST_DEFAULT:
            continue  # comparisons (the log path, --direct-writes on, write-behind), not the configuration with targets
        d = disk.get((wl, r["io"]))
        note = f"two plain files: {d:.2f}x QEMU" if d is not None and key != "rd-sec" else ""
        if key == "rd-sec":
            check("secondary view >= 1.0x QEMU", what, x, x >= 1.0)
        elif IS_WRITE[wl] and "-sync-" in key:
            check("sync writes >= 1.0x QEMU", what, x, x >= 1.0, note)
        elif IS_WRITE[wl] and "-async-" in key:
            check("async writes >= 1.5x QEMU", what, x, x >= 1.5, note)
        elif not IS_WRITE[wl]:
            check("primary reads >= 1.0x QEMU", what, x, x >= 1.0)
    ck = [r for r in rows if r["section"] == "checkpoint" and "median" in r]
    amounts = res.get("checkpoint", {}).get("amounts", [])
    top = max(amounts) if amounts else None
    for r in ck:
        if r["item"].startswith("checkpoint after") and r.get("amount") == top \
                and r["key"] != "qemu":
            check("checkpoint <= 10 ms at 256 MiB", f"{r['target']}: {r['item']}",
                  r["median"], r["median"] <= 10.0,
                  "" if top == 256 * MiB else f"measured at {top // MiB} MiB")
        if r["item"].startswith("failover") and r["key"] != "qemu" and "xQEMU" in r["ratios"]:
            x = r["ratios"]["xQEMU"]
            check("failover commit >= 2x faster than QEMU", f"{r['target']}: {r['item']}",
                  1 / x if x else None, x <= 0.5, "value = QEMU time / repdisk time")
        if r["item"].startswith("hidden") and r["key"] != "qemu":
            check("hidden overlay <= 1.1x primary bytes", f"{r['target']}: {r['item']}",
                  r["median"], r["median"] <= 1.1)
    for r in rows:
        if r["section"] == "sync" and r.get("key", "").startswith("repdisk-") and "median" in r:
            x = r["ratios"].get("xnbdcopy")
            if x is not None:
                check("initial sync >= 0.8x nbdcopy", r["target"], x, x >= 0.8)
        if r["section"] == "nodes" and r["target"] == "repdisk" and "median" in r:
            if r["metric"] == "rss_idle":
                check("idle RSS <= 150 MiB per node (1 TiB disk)", r["item"], r["median"],
                      r["median"] <= 150)
            if r["metric"] == "startup":
                check("start-up <= 1 s", r["item"], r["median"], r["median"] <= 1.0)
    return out


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "IOPS" or abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"


def first_touch_line(ft: dict) -> str:
    """meta.first_touch (tools/first_touch.py) in a line."""
    costs = ", ".join(f"{k} {ft[k]['wall_ms_per_mib']:.2f}" for k in ("cached", "recycled", "idle") if k in ft)
    line = f"page-cache writes cost {costs} ms/MiB (1 MiB pwrites: cached / just freed / after {ft.get('idle_s', 0):g} s idle)"
    if "idle_pieces" in ft:
        line += (f", idle in {ft.get('piece_kib', 128)} KiB pieces as repdisk writes"
                 f" {ft['idle_pieces']['wall_ms_per_mib']:.2f}")
    pr = ft.get("page_reporting") or {}
    if "page_reporting_order" in pr:
        line += f"; free page reporting on (order {pr['page_reporting_order']}"
        if "reported_mib_while_idle" in ft:
            line += f", {ft['reported_mib_while_idle']:,} MiB reported in the idle wait"
        line += ")"
    return line


def perf_lines(res: dict) -> list[str]:
    """One line per fio cell whose runs carry a perf summary (tools/bench --perf):
    the median idle share and the three symbols with the largest mean share
    over the runs (a symbol out of a run's top list counts 0 there).  Not one
    run's list: the rotation puts each target early in one repetition, when
    page-cache memory is still cheap, and late in another."""
    out = []
    targets = res.get("fio", {}).get("targets", {})
    labels = res.get("fio", {}).get("labels", {})
    for io in ("direct", "buffered"):
        for wl in WORKLOADS:
            for key, tres in targets.items():
                runs = [r["perf"] for r in tres.get(io, {}).get(wl, {}).get("runs", []) if "perf" in r]
                if not runs:
                    continue
                idle = summarize([p["idle_pct"] for p in runs])["median"]
                share: dict[str, float] = {}
                for p in runs:
                    for sym, pct in busy_symbols(p, None):
                        share[sym] = share.get(sym, 0.0) + pct / len(runs)
                top = sorted(share.items(), key=lambda kv: -kv[1])[:3]
                syms = ", ".join(f"{s} {p:.0f}%" for s, p in top)
                item = f"{DESCRIPTION[wl]}, {io}"
                out.append(f"{item[:46]:46} {labels.get(key, key)[:28]:28} idle {idle:3.0f}%  {syms}")
    return out


def table(res: dict, summary: dict) -> str:
    meta = res["meta"]
    lines = [f"repdisk benchmark  {meta['started']}  git {meta['git']}  "
             f"{'quick' if meta['quick'] else 'full'} mode, {meta['config']['reps']} reps, "
             f"{meta['cpus']} CPUs, kernel {meta['kernel']}, {meta['qemu']}",
             "figures: median (min-max) of the repetitions; xQEMU/xplain/xfloor/xpair = repdisk / baseline "
             "(floor: a minimal pyfuse3 passthrough of a raw file; pair: two plain files written at once, "
             "per file, what a pair's two images take of this disk; xnorf: sync unix with replica first "
             "/ the same with --replica-first off; xdwoff: with --direct-writes on / the default (off); xwbon: an async primary with --write-behind off / its default (8M); "
             "for ms, MiB and x rows lower "
             "is better)"]
    ft = meta.get("first_touch")
    if ft:
        line = "machine: " + first_touch_line(ft)
        if "reported_mib" in meta:
            line += f"; {meta['reported_mib']:,} MiB of free memory reported to the host during the run"
        lines.append(line)
    if "release_pages" in meta["config"]:
        lines.append("pages: each target's images left the page cache after its 1 MiB job (--release-pages)"
                     if meta["config"]["release_pages"] else
                     "pages: kept after each 1 MiB job (--no-release-pages): a target's 1 MiB figures depend "
                     "on its place in the order")
    read_cache = meta["config"].get("read_cache")
    if read_cache:
        lines.append({"warm": "reads: each 4 KiB read job started with the data of its target's files in the "
                              "page cache (--read-cache warm): what each system adds to a read",
                      "cold": "reads: each 4 KiB read job started with its target's files dropped from the page "
                              "cache (--read-cache cold): the disk's latency is in every figure",
                      "left": "reads: each 4 KiB read job started with the page cache the write job before it "
                              "left (--read-cache left): a target's read figure follows its write rate"}[read_cache])
    if meta["config"].get("perf_dir"):
        lines.append(f"profiled: perf sampled the whole machine during every fio job "
                     f"({meta['config']['perf_dir']}); the figures carry its cost")
    if not meta.get("repdisk"):
        lines.append(f"repdisk not measured: {meta.get('repdisk_unavailable_reason')}")
    head = f"{'item':46} {'target':28} {'median':>10} {'(min-max)':>21} {'unit':6} " \
           f"{'p50us':>8} {'p99us':>8}  ratios"
    section = None
    for r in summary["rows"]:
        if r["section"] != section:
            section = r["section"]
            lines += ["", f"== {section} ==", head]
        if "na" in r:
            val = f"{'n/a':>10} {'':21}"
            tail = "  " + r["na"][:110]
        else:
            spread = f"({_fmt(r['min'], r['unit'])}-{_fmt(r['max'], r['unit'])})"
            val = f"{_fmt(r['median'], r['unit']):>10} {spread:>21}"
            tail = "  " + "  ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())
        if r.get("note"):
            tail += "  [" + r["note"] + "]"
        p50 = _fmt(r.get("p50_us")) if "p50_us" in r else ""
        p99 = _fmt(r.get("p99_us")) if "p99_us" in r else ""
        lines.append(f"{r['item'][:46]:46} {r['target'][:28]:28} {val} {r['unit']:6} "
                     f"{p50:>8} {p99:>8}{tail}")
    cpu_rows = [r for r in summary["rows"] if r.get("cpu")]
    if cpu_rows:
        lines += ["", "== CPU per I/O ==",
                  "µs of CPU time per I/O (median of the runs): user+system of fio (its system time "
                  "includes the kernel's side of each request) and of each process of the target; "
                  "total (min-max); xQEMU = total / QEMU's total"]
        for r in cpu_rows:
            c = r["cpu"]
            parts = "  ".join(f"{k[:3]} {u:.0f}+{sy:.0f}" for k, (u, sy) in c["parts"].items())
            spread = f"({c['total_min']:.0f}-{c['total_max']:.0f})"
            x = f"  xQEMU {c['xQEMU']:.2f}" if "xQEMU" in c else ""
            lines.append(f"{r['item'][:46]:46} {r['target'][:28]:28} {c['total_us']:8.0f} {spread:>13}  "
                         f"{parts}{x}")
    profiled = perf_lines(res)
    if profiled:
        lines += ["", "== where the time went (perf, all CPUs) ==",
                  "idle: the share of both CPUs' time nothing ran (median of the runs); then the "
                  "symbols with the largest mean share of all samples over the runs"] + profiled
    if summary["checks"]:
        lines += ["", "== the issue's targets on this run =="]
        for c in summary["checks"]:
            v = "-" if c["value"] is None else f"{c['value']:.3g}"
            note = f"  ({c['note']})" if c["note"] else ""
            lines.append(f"{'HOLD' if c['ok'] else 'MISS'}  {c['target']:42} {v:>8}  {c['item']}{note}")
        n_ok = sum(c["ok"] for c in summary["checks"])
        lines.append(f"{n_ok} of {len(summary['checks'])} hold")
    return "\n".join(lines)


def chart(res: dict, summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    panels = 2 * len(WORKLOADS) + 3 + 1 + 3  # fio cells; checkpoint; sync; nodes
    fig, axes = plt.subplots((panels + 3) // 4, 4, figsize=(22, 4.75 * ((panels + 3) // 4)))
    axes = axes.flatten()
    i = 0
    for wl in WORKLOADS:
        for io in ("direct", "buffered"):
            ax = axes[i]
            i += 1
            sel = [r for r in rows if r["section"] == "fio" and r["workload"] == wl and r["io"] == io]
            _bars(ax, sel, f"{DESCRIPTION[wl]}, {io}", METRIC[wl])
    for title, pred, unit in (
            ("checkpoint latency (pri+sec)", lambda r: r["item"].startswith("checkpoint"), "ms"),
            ("hidden bytes per primary byte", lambda r: r["item"].startswith("hidden"), "x"),
            ("failover commit", lambda r: r["item"].startswith("failover"), "ms")):
        sel = [dict(r, target=f"{r['target']} {r.get('amount', 0) // MiB}M") for r in rows
               if r["section"] == "checkpoint" and pred(r)]
        _bars(axes[i], sel, title, unit, log=(unit == "ms"))
        i += 1
    _bars(axes[i], [r for r in rows if r["section"] == "sync"], "initial sync / nbdcopy", "MiB/s")
    i += 1
    for metric, title, unit in (("rss_idle", "RSS idle, 1 TiB disk", "MiB"),
                                ("rss_after_writes", "RSS after random writes", "MiB"),
                                ("startup", "start-up", "s")):
        sel = [dict(r, target=f"{r['target']} {r['role'][:3]}") for r in rows
               if r["section"] == "nodes" and r.get("metric") == metric]
        _bars(axes[i], sel, title, unit)
        i += 1
    for ax in axes[i:]:
        ax.axis("off")
    meta = res["meta"]
    fig.suptitle(f"repdisk benchmark {meta['started']} ({'quick' if meta['quick'] else 'full'}, "
                 f"median of {meta['config']['reps']}, bars min-max)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _bars(ax, sel, title, unit, log=False):
    ax.set_title(title, fontsize=10)
    sel = [r for r in sel if "median" in r]
    if not sel:
        ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        return
    names = [r["target"] for r in sel]
    med = [r["median"] for r in sel]
    err = [[r["median"] - r["min"] for r in sel], [r["max"] - r["median"] for r in sel]]
    colors = ["#888888" if "plain" in n or "passthrough" in n else "#d62728" if "QEMU" in n or "nbdcopy" in n
              else "#1f77b4" for n in names]
    y = range(len(sel))
    ax.barh(list(y), med, xerr=err, color=colors, capsize=3)
    for yy, m in zip(y, med):
        ax.text(m, yy, " " + _fmt(m, unit), va="center", fontsize=7)
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    if log and min(med) > 0:
        ax.set_xscale("log")
