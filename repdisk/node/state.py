"""The nodes' state machines as pure tables: (state, event) -> (new state, action).

An event missing from a table is not allowed in that state: `transition`
raises Busy (or TryAgain where waiting helps) with a sentence saying why.  The
node performs the action named in the table; the table itself does nothing.
"""

from ..core.errors import Busy, TryAgain

# ---- secondary ---------------------------------------------------------------
S_WAITING, S_REPLICATING, S_FAILOVER, S_STANDALONE, S_SPLIT_BRAIN = (
    "waiting", "replicating", "failover", "standalone", "split-brain")
SECONDARY_STATES = (S_WAITING, S_REPLICATING, S_FAILOVER, S_STANDALONE, S_SPLIT_BRAIN)

SECONDARY = {
    (S_WAITING, "connect"): (S_REPLICATING, "accept"),
    (S_REPLICATING, "disconnect"): (S_WAITING, None),
    (S_WAITING, "checkpoint"): (S_WAITING, "drop_overlays"),
    (S_REPLICATING, "checkpoint"): (S_REPLICATING, "drop_overlays"),
    (S_WAITING, "failover"): (S_FAILOVER, "commit"),
    (S_REPLICATING, "failover"): (S_FAILOVER, "commit"),
    # A commit that failed can be retried with another failover command.
    (S_FAILOVER, "failover"): (S_FAILOVER, "commit"),
    (S_FAILOVER, "commit_done"): (S_STANDALONE, None),
    (S_FAILOVER, "commit_failed"): (S_FAILOVER, None),
    (S_FAILOVER, "disconnect"): (S_FAILOVER, None),
    # A primary was refused: it has not got what this disk holds (split brain) or
    # it is another disk's.  Waiting otherwise: the operator's resolution on the
    # primary (force) or a failover here ends it.
    (S_WAITING, "split_brain"): (S_SPLIT_BRAIN, None),
    (S_SPLIT_BRAIN, "split_brain"): (S_SPLIT_BRAIN, None),
    (S_SPLIT_BRAIN, "connect"): (S_REPLICATING, "accept"),
    (S_SPLIT_BRAIN, "checkpoint"): (S_SPLIT_BRAIN, "drop_overlays"),
    (S_SPLIT_BRAIN, "failover"): (S_FAILOVER, "commit"),
}

# ---- primary -----------------------------------------------------------------
P_CONNECTING, P_SYNCING, P_REPLICATING, P_DEGRADED, P_STANDALONE, P_SPLIT_BRAIN = (
    "connecting", "syncing", "replicating", "degraded", "standalone", "split-brain")
PRIMARY_STATES = (P_CONNECTING, P_SYNCING, P_REPLICATING, P_DEGRADED, P_STANDALONE, P_SPLIT_BRAIN)

PRIMARY = {
    (P_CONNECTING, "connected"): (P_SYNCING, "sync"),
    (P_DEGRADED, "connected"): (P_SYNCING, "sync"),
    (P_CONNECTING, "connect_failed"): (P_DEGRADED, None),
    (P_SYNCING, "sync_done"): (P_REPLICATING, None),
    (P_SYNCING, "link_failed"): (P_DEGRADED, "track"),
    (P_REPLICATING, "link_failed"): (P_DEGRADED, "track"),
    (P_REPLICATING, "checkpoint"): (P_REPLICATING, "drain"),
    (P_CONNECTING, "failover"): (P_STANDALONE, "drop_link"),
    (P_SYNCING, "failover"): (P_STANDALONE, "drop_link"),
    (P_REPLICATING, "failover"): (P_STANDALONE, "drop_link"),
    (P_DEGRADED, "failover"): (P_STANDALONE, "drop_link"),
    (P_DEGRADED, "reconnect"): (P_DEGRADED, "retry_now"),
    (P_CONNECTING, "reconnect"): (P_CONNECTING, "retry_now"),
    (P_DEGRADED, "connect"): (P_DEGRADED, "retarget"),
    (P_STANDALONE, "connect"): (P_DEGRADED, "retarget"),
    # The secondary holds writes we do not have, or another disk: stop trying
    # until an operator decides.  Nothing is sent to it meanwhile.
    (P_CONNECTING, "split_brain"): (P_SPLIT_BRAIN, None),
    (P_DEGRADED, "split_brain"): (P_SPLIT_BRAIN, None),
    (P_SPLIT_BRAIN, "resolve"): (P_DEGRADED, "full_sync"),
    (P_SPLIT_BRAIN, "reconnect"): (P_DEGRADED, "retry_now"),
    (P_SPLIT_BRAIN, "connect"): (P_DEGRADED, "retarget"),
    (P_SPLIT_BRAIN, "failover"): (P_STANDALONE, "drop_link"),
    # Online verify: compare with the replica while replicating.
    (P_REPLICATING, "verify"): (P_REPLICATING, "verify"),
    (P_REPLICATING, "resync"): (P_SYNCING, "sync"),  # verify found differences
}

# Why an event is refused in a state, when the reason is worth a sentence.
SECONDARY_WHY = {
    ("checkpoint", S_FAILOVER): (Busy, "failover is in progress: the secondary no longer takes checkpoints"),
    ("checkpoint", S_STANDALONE): (Busy, "standalone after failover: the secondary no longer takes checkpoints"),
    ("failover", S_STANDALONE): (Busy, "already failed over: the node is standalone"),
    ("connect", S_FAILOVER): (Busy, "this secondary has failed over and accepts no primary"),
    ("connect", S_STANDALONE): (Busy, "this secondary has failed over and accepts no primary"),
    ("connect", S_REPLICATING): (Busy, "another primary is already connected to this secondary"),
}
PRIMARY_WHY = {
    ("checkpoint", P_SYNCING): (TryAgain, "the sync to the secondary is still running; checkpoint when the state is replicating"),
    ("checkpoint", P_CONNECTING): (TryAgain, "not connected to the secondary yet"),
    ("checkpoint", P_DEGRADED): (Busy, "the secondary is lost (degraded): a checkpoint cannot reach it"),
    ("checkpoint", P_STANDALONE): (Busy, "standalone after failover: there is no secondary to checkpoint"),
    ("failover", P_STANDALONE): (Busy, "already failed over: the node is standalone"),
    ("reconnect", P_REPLICATING): (Busy, "already connected to the secondary"),
    ("reconnect", P_SYNCING): (Busy, "already connected to the secondary"),
    ("reconnect", P_STANDALONE): (Busy, "standalone: use 'connect URI' to attach a secondary"),
    ("connect", P_REPLICATING): (Busy, "a secondary is connected: fail over first"),
    ("connect", P_SYNCING): (Busy, "a secondary is connected: fail over first"),
    ("checkpoint", P_SPLIT_BRAIN): (Busy, "split brain: the secondary is not a copy of this disk; see 'resolve discard-secondary'"),
    ("verify", P_SYNCING): (TryAgain, "the sync to the secondary is still running; verify when the state is replicating"),
    ("verify", P_CONNECTING): (TryAgain, "not connected to the secondary yet"),
}
for _s in PRIMARY_STATES:
    if _s != P_SPLIT_BRAIN:
        PRIMARY_WHY[("resolve", _s)] = (Busy, f"nothing to resolve: the node is {_s}, not in split brain")
for _s in (P_DEGRADED, P_STANDALONE, P_SPLIT_BRAIN):
    PRIMARY_WHY.setdefault(("verify", _s), (Busy, f"verify needs a connected secondary (the node is {_s})"))


def transition(table: dict, why: dict, state: str, event: str) -> tuple[str, str | None]:
    """The table's answer, or the error that says why the event is refused."""
    try:
        return table[(state, event)]
    except KeyError:
        cls, text = why.get((event, state), (Busy, f"{event!r} is not allowed in state {state!r}"))
        raise cls(text) from None
