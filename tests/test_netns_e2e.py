"""Two hosts: the primary and the secondary in two network namespaces joined
by a veth pair, TCP between them.  The link is cut during writes
(`ip link set down`), the writes go on, the link comes back: the primary
reconnects and resyncs exactly the blocks written meanwhile.  The namespaces
are made and removed by the test; skipped where `ip netns` is not permitted."""

import os
import random
import subprocess

import pytest

from nodes import needs_fuse, read_file, wait_until, write_file

pytestmark = needs_fuse

SIZE = 32 << 20


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def two_hosts():
    tag = f"{os.getpid() % 100000}"
    a, b = f"rdA{tag}", f"rdB{tag}"
    try:
        ip("netns", "add", a)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"ip netns not permitted here: {getattr(e, 'stderr', e)}")
    try:
        ip("netns", "add", b)
        ip("link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name", f"vb{tag}", "netns", b)
        ip("-n", a, "addr", "add", "10.213.7.1/24", "dev", f"va{tag}")
        ip("-n", b, "addr", "add", "10.213.7.2/24", "dev", f"vb{tag}")
        for ns, dev in ((a, f"va{tag}"), (b, f"vb{tag}")):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
        yield {"a": a, "b": b, "dev_a": f"va{tag}", "dev_b": f"vb{tag}", "addr_b": "10.213.7.2"}
    finally:
        ip("netns", "del", a, check=False)  # removes the veth pair too
        ip("netns", "del", b, check=False)


def in_ns(ns):
    return ["nsenter", f"--net=/run/netns/{ns}"]  # network namespace only: the mounts stay visible


def make_lossy(h):
    """A slow, lossy link without sch_netem (not in every kernel): nftables
    drops every 50th packet each host sends on the veth (2%; counted, not
    random, so a run that sends few large GSO packets still loses some), and
    tbf limits the primary's side to 40 Mbit/s, so TCP retransmits and
    writes queue up behind the link while the test runs."""
    for ns, dev in ((h["a"], h["dev_a"]), (h["b"], h["dev_b"])):
        rules = (f"table inet rdloss {{\n chain out {{\n type filter hook output priority 0; policy accept;\n"
                 f'  oifname "{dev}" numgen inc mod 50 == 49 counter drop\n }}\n}}\n')
        r = subprocess.run([*in_ns(ns), "nft", "-f", "-"], input=rules, capture_output=True, text=True)
        if r.returncode:
            pytest.fail(f"nft in {ns}: {r.stderr.strip()}")
    ip("netns", "exec", h["a"], "tc", "qdisc", "add", "dev", h["dev_a"], "root", "tbf",
       "rate", "40mbit", "burst", "64kbit", "latency", "200ms")


def dropped_packets(ns) -> int:
    out = subprocess.run([*in_ns(ns), "nft", "list", "table", "inet", "rdloss"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split("counter packets ")[1].split()[0])


@pytest.mark.parametrize("network", ["plain", "lossy"])
def test_link_cut_and_restore_resyncs_only_the_dirty_bytes(nodes, tmp_path, two_hosts, network):
    h = two_hosts
    if network == "lossy":
        make_lossy(h)
    sec = nodes("secondary", "--disk", str(tmp_path / "sec.img"), "--size", str(SIZE),
                "--listen", f"{h['addr_b']}:10809", name="secondary", prefix=in_ns(h["b"]))
    pri = nodes("primary", "--disk", str(tmp_path / "pri.img"), "--size", str(SIZE),
                "--secondary", f"nbd://{h['addr_b']}:10809", "--io-timeout", "2", name="primary",
                prefix=in_ns(h["a"]))
    pri.wait_state("replicating")
    rng = random.Random(5)
    write_file(pri.disk, rng.randbytes(4 << 20), 0)
    pri.command("checkpoint")
    sec.command("checkpoint")

    ip("-n", h["a"], "link", "set", h["dev_a"], "down")
    offsets = rng.sample(range(SIZE // 65536), 12)
    for i in offsets:  # the first blocks until the primary gives the secondary up (--io-timeout)
        write_file(pri.disk, rng.randbytes(65536), i * 65536)
    s = pri.wait_state("degraded")
    assert s["dirty_bytes"] == len(offsets) * 65536
    ip("-n", h["a"], "link", "set", h["dev_a"], "up")
    # The secondary still holds the dead connection until the primary's FIN gets through.
    s = wait_until(lambda: (pri.command_errno("reconnect"), pri.status())[1]["state"] == "replicating"
                   and pri.status(), timeout=90, what="reconnect after the link came back", interval=0.5)
    assert s["resync_kind"] == "incremental"
    assert s["sync"]["total"] == s["sync"]["done"] == len(offsets) * 65536
    pri.command("checkpoint")
    sec.command("checkpoint")
    assert read_file(pri.disk) == read_file(sec.disk)
    if network == "lossy":  # the loss was real: both directions dropped packets
        assert dropped_packets(h["a"]) > 0 and dropped_packets(h["b"]) > 0


def test_secondary_drops_a_primary_whose_host_vanished(nodes, tmp_path, two_hosts):
    """The primary's host dies with the link down (no FIN ever arrives): TCP
    keepalive (10 s idle, 3 probes 5 s apart) ends the connection, so the one
    client slot is free again and a new primary gets in."""
    h = two_hosts
    args = ("--disk", str(tmp_path / "pri.img"), "--size", str(SIZE), "--secondary", f"nbd://{h['addr_b']}:10809",
            "--io-timeout", "2")
    sec = nodes("secondary", "--disk", str(tmp_path / "sec.img"), "--size", str(SIZE),
                "--listen", f"{h['addr_b']}:10809", name="secondary", prefix=in_ns(h["b"]))
    pri = nodes("primary", *args, name="primary", prefix=in_ns(h["a"]))
    pri.wait_state("replicating")
    write_file(pri.disk, b"before the crash" * 4096, 0)
    assert sec.status()["peer"] is not None
    ip("-n", h["a"], "link", "set", h["dev_a"], "down")
    pri.kill()  # its FIN is lost on the dead link
    s = wait_until(lambda: (st := sec.status())["peer"] is None and st, timeout=60, interval=0.5,
                   what="the secondary dropping the vanished primary")
    assert "ended" in s["error"]
    ip("-n", h["a"], "link", "set", h["dev_a"], "up")
    pri2 = nodes("primary", *args, mount=pri.mount, name="primary2", prefix=in_ns(h["a"]))
    pri2.wait_state("replicating", timeout=60)
    pri2.command("checkpoint")
    sec.command("checkpoint")
    assert read_file(pri2.disk) == read_file(sec.disk)
