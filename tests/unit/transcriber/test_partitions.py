"""Partition assignment and lease decisions: balance, stability, determinism. No NATS."""

import random
import subprocess
import sys

from jetscribe.services.transcriber.partitions import (
    Lease,
    Plan,
    assign,
    assigned_to,
    decode_lease,
    decode_member,
    encode_lease,
    encode_member,
    lease_deadline,
    lease_ttl_seconds,
    may_acquire,
    plan,
    pull_window,
    weight,
)

P = 16


def member_sets(count, size, seed=7):
    rng = random.Random(seed)
    return [[f"host{rng.randrange(10**6)}-{rng.randrange(10**5)}" for _ in range(size)] for _ in range(count)]


def loads(owner, members):
    return [sum(1 for m in owner.values() if m == member) for member in members]


def test_every_partition_has_exactly_one_owner_among_the_members():
    members = ["a", "b", "c"]
    owner = assign(P, members)
    assert sorted(owner) == list(range(P))
    assert set(owner.values()) <= set(members)


def test_balance_is_floor_or_ceil_for_any_member_ids():
    for members in member_sets(200, 6):
        for n in range(1, 7):
            counts = loads(assign(P, members[:n]), members[:n])
            assert sum(counts) == P
            assert max(counts) - min(counts) <= 1, (members[:n], counts)


def test_sixteen_over_three_is_six_five_five():
    assert sorted(loads(assign(P, ["w1", "w2", "w3"]), ["w1", "w2", "w3"])) == [5, 5, 6]


def test_a_joiner_takes_its_share_and_few_others_move():
    extra = []
    for members in member_sets(300, 5):
        n = len(members) - 1
        before, after = assign(P, members[:n]), assign(P, members)
        moved = [p for p in range(P) if before[p] != after[p]]
        to_joiner = [p for p in moved if after[p] == members[-1]]
        assert len(to_joiner) in (P // (n + 1), -(-P // (n + 1)))
        extra.append(len(moved) - len(to_joiner))
    # Pure rendezvous would move nothing else; the load bound costs a little.
    assert sum(extra) / len(extra) < 1.5
    assert max(extra) <= 5


def test_a_leaver_gives_up_its_own_and_few_others_move():
    extra = []
    for members in member_sets(300, 4, seed=11):
        before, after = assign(P, members), assign(P, members[1:])
        own = [p for p in range(P) if before[p] == members[0]]
        assert all(after[p] != members[0] for p in own)
        extra.append(sum(1 for p in range(P) if before[p] != after[p] and before[p] != members[0]))
    assert sum(extra) / len(extra) < 1.5
    assert max(extra) <= 5


def test_order_of_members_does_not_matter():
    assert assign(P, ["a", "b", "c"]) == assign(P, ["c", "a", "b"]) == assign(P, {"b": None, "c": None, "a": None})


def test_weights_are_the_same_in_another_process():
    # Python's hash() is salted per process; the assignment must not be.
    code = (
        "from jetscribe.services.transcriber.partitions import assign; "
        "print(sorted(assign(16, ['a', 'b', 'c']).items()))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PYTHONPATH": ":".join(sys.path)},
    ).stdout
    assert other.strip() == str(sorted(assign(P, ["a", "b", "c"]).items()))
    assert weight("a", 1) == weight("a", 1) != weight("a", 2)


def test_static_subsets_are_respected():
    members = {"edge": {0, 1}, "big": None}
    owner = assign(P, members)
    assert sorted(owner) == list(range(P))
    assert {p for p, m in owner.items() if m == "edge"} <= {0, 1}
    # A partition nobody may own is left unowned.
    assert assign(4, {"x": {0}, "y": {1}}) == {0: "x", 1: "y"}


def test_no_members_no_owners():
    assert assign(P, []) == {}
    assert assigned_to("a", P, []) == set()


def test_plan_releases_what_moved_away_and_acquires_what_arrived():
    members = {"a": None, "b": None}
    mine = assigned_to("a", P, members)
    held = set(range(P))  # a was alone; b joined
    step = plan("a", P, members, held)
    assert set(step.release) == held - mine and step.acquire == ()
    assert plan("a", P, members, mine) == Plan(release=(), acquire=())
    assert plan("a", P, {"a": None}, set()).acquire == tuple(range(P))


def test_a_member_missing_from_the_live_set_releases_everything():
    assert plan("a", P, {"b": None}, {1, 2}).release == (1, 2)


def test_leases_are_taken_only_when_free_or_ours():
    assert may_acquire(None, "a")
    assert may_acquire(Lease("a", 7), "a")
    assert not may_acquire(Lease("b", 7), "a")


def test_lease_ttl_is_whole_seconds_rounded_up():
    assert lease_ttl_seconds(5) == 5
    assert lease_ttl_seconds(2.5) == 3
    assert lease_ttl_seconds(0.2) == 1


def test_the_owner_stops_before_the_server_lets_the_lease_go():
    deadline = lease_deadline(sent_at=100.0, ttl_s=5, margin_s=1.0)
    assert deadline == 104.0
    assert pull_window(now=100.0, deadline=deadline, wanted_s=1.0, margin_s=0.5) == 1.0
    assert pull_window(now=103.0, deadline=deadline, wanted_s=1.0, margin_s=0.5) == 0.5
    assert pull_window(now=103.6, deadline=deadline, wanted_s=1.0, margin_s=0.5) == 0.0


def test_values_round_trip():
    assert decode_lease(encode_lease("a", 5, 1.0), 3) == Lease("a", 3)
    assert decode_member(encode_member("a", {2, 1}, 1.0)) == ("a", frozenset({1, 2}))
    assert decode_member(encode_member("a", None, 1.0)) == ("a", None)


def test_spans_write_runs_of_partitions():
    from jetscribe.services.transcriber.partitions import spans

    assert spans([]) == ""
    assert spans([3]) == "3"
    assert spans([7, 0, 1, 2, 3, 5, 8]) == "0-3,5,7-8"


def test_one_holding_line_per_change_not_per_partition():
    from jetscribe.services.transcriber.partitions import holding_line

    assert holding_line(set(), set(range(16))) == "holds partitions 0-15 (+0-15)"
    assert holding_line(set(range(16)), set(range(8))) == "holds partitions 0-7 (-8-15)"
    assert holding_line({0, 1}, {1, 2}) == "holds partitions 1-2 (+2, -0)"
    assert holding_line(set(range(4)), set()) == "holds no partitions (-0-3)"
    assert holding_line({1, 2}, {2, 1}) is None


def test_claims_are_made_again_within_a_quarter_of_their_streams_max_age():
    import json

    from jetscribe.services.transcriber.partitions import Claim, claim_refresh_due, decode_claim_owner, encode_claim

    claim = Claim("TRANSCRIPTS", "claim.transcriber.p3", 17, at=100.0)
    assert not claim_refresh_due(claim, 100.0 + 3600 / 4 - 1, 3600)
    assert claim_refresh_due(claim, 100.0 + 3600 / 4, 3600)
    assert not claim_refresh_due(claim, 1e9, 0)  # a stream without a max age keeps it forever
    value = encode_claim("w1#ab12", 3, 55, 1_700_000_000.0)
    assert decode_claim_owner(value) == "w1#ab12"
    assert json.loads(value)["lease_revision"] == 55
