"""`PresenceIndex`: who is connected where, from the presence bucket's changes."""

from __future__ import annotations

from shared import subjects
from shared.messages.sdk_presence import ReplicaAlive, SocketPresence, replica_key, socket_key
from shared.presence import PresenceIndex


def socket(user: str, conversation: str, replica: str) -> SocketPresence:
    return SocketPresence(app_id="a", user_id=user, client_id="c", conversation_id=conversation,
                          integration_id="i", channel="web", replica_id=replica, written_at=0.0)


def test_a_socket_counts_only_while_its_replica_beats() -> None:
    clock = [1000.0]
    index = PresenceIndex(clock=lambda: clock[0])
    index.apply(socket_key("r1", "s1"), socket("u1", "c1", "r1"))
    assert not index.connected("u1", "c1")  # no heartbeat from r1 yet
    index.apply(replica_key("r1"), ReplicaAlive(replica_id="r1", updated_at=1000.0))
    assert index.connected("u1", "c1")
    assert not index.connected("u1", "c2") and not index.connected("u2", "c1")
    clock[0] += subjects.SDK_REPLICA_DEAD_SECONDS + 1  # r1 died: its sockets stop counting
    assert not index.connected("u1", "c1")
    index.apply(replica_key("r1"), ReplicaAlive(replica_id="r1", updated_at=clock[0]))
    assert index.connected("u1", "c1")
    index.apply(replica_key("r1"), None)  # deleted on stop
    assert not index.connected("u1", "c1")


def test_closing_one_of_two_sockets_keeps_the_customer_connected() -> None:
    index = PresenceIndex(clock=lambda: 10.0)
    index.apply(replica_key("r1"), ReplicaAlive(replica_id="r1", updated_at=10.0))
    index.apply(replica_key("r2"), ReplicaAlive(replica_id="r2", updated_at=10.0))
    index.apply(socket_key("r1", "s1"), socket("u1", "c1", "r1"))
    index.apply(socket_key("r2", "s2"), socket("u1", "c1", "r2"))
    index.apply(socket_key("r1", "s1"), None)
    assert index.connected("u1", "c1")
    index.apply(socket_key("r2", "s2"), None)
    assert not index.connected("u1", "c1")
    assert index.by_conversation == {} and index.sockets == {}
