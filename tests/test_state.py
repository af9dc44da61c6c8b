"""The node state machines are pure tables: check every (state, event) pair."""

import errno
import subprocess
import sys

import pytest

from repdisk.core.errors import RepdiskError
from repdisk.node import state as st

SEC_EVENTS = ("connect", "disconnect", "checkpoint", "failover", "commit_done", "commit_failed", "split_brain")
PRI_EVENTS = ("connected", "connect_failed", "sync_done", "link_failed", "checkpoint", "failover", "reconnect", "connect",
              "split_brain", "resolve", "verify", "resync")


@pytest.mark.parametrize("table,why,states,events", [
    (st.SECONDARY, st.SECONDARY_WHY, st.SECONDARY_STATES, SEC_EVENTS),
    (st.PRIMARY, st.PRIMARY_WHY, st.PRIMARY_STATES, PRI_EVENTS),
])
def test_every_pair_is_a_transition_or_a_clear_error(table, why, states, events):
    for state in states:
        for event in events:
            if (state, event) in table:
                new, _ = st.transition(table, why, state, event)
                assert new in states
            else:
                with pytest.raises(RepdiskError) as e:
                    st.transition(table, why, state, event)
                assert e.value.errno in (errno.EBUSY, errno.EAGAIN)
                assert str(e.value)
    # every state in the table is a known state
    for (state, event), (new, _) in table.items():
        assert state in states and new in states and event in events


def test_user_visible_rules():
    T = lambda *a: st.transition(*a)  # noqa: E731
    with pytest.raises(RepdiskError) as e:
        T(st.PRIMARY, st.PRIMARY_WHY, st.P_SYNCING, "checkpoint")
    assert e.value.errno == errno.EAGAIN
    with pytest.raises(RepdiskError) as e:
        T(st.SECONDARY, st.SECONDARY_WHY, st.S_STANDALONE, "checkpoint")
    assert e.value.errno == errno.EBUSY
    assert T(st.SECONDARY, st.SECONDARY_WHY, st.S_REPLICATING, "failover") == (st.S_FAILOVER, "commit")
    assert T(st.PRIMARY, st.PRIMARY_WHY, st.P_REPLICATING, "link_failed")[0] == st.P_DEGRADED


def test_split_brain_rules():
    T = lambda *a: st.transition(st.PRIMARY, st.PRIMARY_WHY, *a)  # noqa: E731
    assert T(st.P_DEGRADED, "split_brain")[0] == st.P_SPLIT_BRAIN
    assert T(st.P_SPLIT_BRAIN, "resolve") == (st.P_DEGRADED, "full_sync")
    for state in (st.P_REPLICATING, st.P_DEGRADED, st.P_STANDALONE):
        with pytest.raises(RepdiskError) as e:
            T(state, "resolve")
        assert e.value.errno == errno.EBUSY and "split brain" in str(e.value)
    with pytest.raises(RepdiskError) as e:
        T(st.P_SPLIT_BRAIN, "checkpoint")
    assert e.value.errno == errno.EBUSY
    # split brain is only ever entered from a state without a connected secondary
    assert {s for (s, ev) in st.PRIMARY if ev == "split_brain"} == {st.P_CONNECTING, st.P_DEGRADED}
    assert T(st.P_REPLICATING, "verify")[1] == "verify"
    S = lambda *a: st.transition(st.SECONDARY, st.SECONDARY_WHY, *a)  # noqa: E731
    assert S(st.S_WAITING, "split_brain")[0] == st.S_SPLIT_BRAIN
    assert S(st.S_SPLIT_BRAIN, "connect") == (st.S_REPLICATING, "accept")  # resolved on the primary
    with pytest.raises(RepdiskError):
        S(st.S_REPLICATING, "split_brain")
    with pytest.raises(RepdiskError) as e:
        T(st.P_SYNCING, "verify")
    assert e.value.errno == errno.EAGAIN


def test_core_imports_no_io_frameworks():
    """The block core stays pure: importing it pulls in no trio, pyfuse3 or nbd."""
    code = ("import sys, repdisk.core.stack, repdisk.core.blockdev, repdisk.core.meta, repdisk.core.bitmap, repdisk.node.state;"
            "bad = [m for m in ('trio', 'pyfuse3', 'nbd') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
