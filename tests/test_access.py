"""The allowlist as pure data: parsing, the default, and the laws of ``decide`` (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from punchgate.access import (
    ANY_PEER,
    NOT_ALLOWED,
    AccessPolicy,
    AllowError,
    changes,
    decide,
    merge,
    parse_allow_file,
    parse_allow_spec,
)

PEERS = [ID.from_pubkey(create_new_key_pair().public_key).to_base58() for _ in range(6)]
SERVICES = ["ssh", "web", "db", "git.internal", "a_b-c", "x"]

peers = st.sampled_from(PEERS)
services = st.sampled_from(SERVICES)
peer_sets = st.frozensets(st.sampled_from([*PEERS, ANY_PEER]), min_size=1, max_size=4)
rule_sets = st.dictionaries(services, peer_sets, max_size=5)
exposed_sets = st.frozensets(services, max_size=6)
policies = st.one_of(st.just(AccessPolicy.open()), rule_sets.map(AccessPolicy.enforce))
FAST = settings(max_examples=300, deadline=None)


def answer(policy, peer, service, exposed):
    """What the peer is told (``detail`` stays in our own log)."""
    decision = decide(policy, peer, service, exposed)
    return decision.allowed, decision.reason


# --- parsing -----------------------------------------------------------------------------


def test_allow_spec_parses_one_or_more_peers_and_star():
    assert parse_allow_spec(f"ssh={PEERS[0]}") == ("ssh", frozenset({PEERS[0]}))
    assert parse_allow_spec(f"web={PEERS[0]}, {PEERS[1]}") == ("web", frozenset(PEERS[:2]))
    assert parse_allow_spec("web=*") == ("web", frozenset({ANY_PEER}))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("ssh", "no '='"),
        ("ssh=", "no peer ID"),
        (f"ssh={PEERS[0]},,{PEERS[1]}", "empty peer ID"),
        ("ssh=not-a-peer", "is not a peer ID"),
        (f"-bad={PEERS[0]}", "service name"),
        ("ssh=QmXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "is not a peer ID"),  # base58, but too short a multihash
    ],
)
def test_bad_allow_specs_say_what_is_wrong(text, needle):
    with pytest.raises(AllowError, match=needle):
        parse_allow_spec(text)


def test_allow_file_comments_blank_lines_and_repeats():
    text = f"""
# who may reach what
ssh {PEERS[0]}   # laptop
ssh {PEERS[1]}
\tweb\t*
ssh {PEERS[0]}
"""
    assert parse_allow_file(text) == {"ssh": frozenset(PEERS[:2]), "web": frozenset({ANY_PEER})}
    assert parse_allow_file("") == {} and parse_allow_file("# nothing\n\n") == {}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (f"ssh {PEERS[0]}\nssh\n", "line 2: expected 'SERVICE PEER_ID', got 1 fields"),
        (f"ssh {PEERS[0]} extra\n", "line 1: expected 'SERVICE PEER_ID', got 3 fields"),
        ("\n\nssh nobody\n", "line 3: 'nobody' is not a peer ID"),
        (f"s/sh {PEERS[0]}", "line 1: service name"),
        ("x" * (1 << 20 | 1), "larger than"),
    ],
)
def test_bad_allow_files_name_the_line(text, needle):
    with pytest.raises(AllowError, match=needle):
        parse_allow_file(text)


@FAST
@given(rule_sets, st.lists(st.sampled_from(["", "# note", "   ", "\t# x"]), max_size=4), st.randoms())
def test_allow_file_round_trip(rules, noise, rnd):
    """Any rules written one per line, in any order, among comments and blanks, read back the same."""
    lines = [f"{service} {peer}" for service, peers in rules.items() for peer in peers] + noise
    rnd.shuffle(lines)
    lines = [line + ("  # why" if rnd.random() < 0.3 and line.strip() and "#" not in line else "") for line in lines]
    assert parse_allow_file("\n".join(lines)) == rules


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_allow_file_parser_ends_in_rules_or_one_error(text):
    try:
        rules = parse_allow_file(text)
    except AllowError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert all(isinstance(p, frozenset) and p for p in rules.values())


# --- the default ---------------------------------------------------------------------------


def test_no_access_control_means_every_service_open():
    policy = AccessPolicy.open()
    assert decide(policy, PEERS[0], "ssh", {"ssh"}).allowed
    assert policy.open_to_all(["ssh", "web"]) == ["ssh", "web"]
    assert policy.closed_to_all(["ssh", "web"]) == []


def test_enforcing_with_no_lists_means_every_service_closed():
    policy = AccessPolicy.enforce({})
    for peer in PEERS:
        assert answer(policy, peer, "ssh", {"ssh"}) == answer(policy, peer, "nope", {"ssh"}) == (False, NOT_ALLOWED)
    assert policy.closed_to_all(["ssh", "web"]) == ["ssh", "web"]
    assert policy.open_to_all(["ssh"]) == []


def test_star_opens_one_service_to_everyone_and_is_warned_about():
    policy = AccessPolicy.enforce({"web": {ANY_PEER}, "ssh": {PEERS[0]}})
    assert all(decide(policy, p, "web", {"web", "ssh"}).allowed for p in PEERS)
    assert policy.open_to_all(["web", "ssh"]) == ["web"]
    assert policy.unexposed({"web"}) == ["ssh"]


# --- laws --------------------------------------------------------------------------------


@FAST
@given(rule_sets, peers, services, exposed_sets)
def test_a_peer_not_listed_is_refused_not_allowed(rules, peer, service, exposed):
    policy = AccessPolicy.enforce(rules)
    listed = rules.get(service, frozenset())
    if peer not in listed and ANY_PEER not in listed:
        assert answer(policy, peer, service, exposed) == answer(policy, peer, service, exposed | {service})
        assert answer(policy, peer, service, exposed) == (False, NOT_ALLOWED)


@FAST
@given(policies, peers, services, exposed_sets, exposed_sets)
def test_the_answer_never_depends_on_which_other_services_exist(policy, peer, service, exposed, others):
    """Two nodes that agree on the policy and on whether *this* name is exposed give the
    same answer, whatever else each exposes."""
    same_here = (others - {service}) | (exposed & {service})
    assert answer(policy, peer, service, exposed) == answer(policy, peer, service, same_here)


@FAST
@given(policies, peers, services, exposed_sets)
def test_a_refused_peer_cannot_tell_an_existing_service_from_a_missing_one(policy, peer, service, exposed):
    if not policy.permits(peer, service):
        with_it = answer(policy, peer, service, exposed | {service})
        assert with_it == answer(policy, peer, service, exposed - {service}) == (False, NOT_ALLOWED)


@FAST
@given(policies, peers, services, exposed_sets)
def test_allowed_exactly_when_permitted_and_exposed(policy, peer, service, exposed):
    decision = decide(policy, peer, service, exposed)
    assert decision.allowed == (policy.permits(peer, service) and service in exposed)
    if not decision.allowed:
        assert decision.reason in (NOT_ALLOWED, f"unknown service {service!r}")
        assert decision.detail


@FAST
@given(rule_sets, rule_sets)
def test_changes_say_exactly_who_was_added_and_removed(old_rules, new_rules):
    old, new = AccessPolicy.enforce(old_rules), AccessPolicy.enforce(new_rules)
    diff = changes(old, new)
    assert (diff == []) == (old.rules == new.rules)
    rebuilt = dict(old.rules)
    for change in diff:
        peers_now = (rebuilt.get(change.service, frozenset()) - set(change.removed)) | set(change.added)
        if peers_now:
            rebuilt[change.service] = peers_now
        else:
            rebuilt.pop(change.service, None)
    assert rebuilt == dict(new.rules)


@FAST
@given(rule_sets, rule_sets)
def test_merge_is_a_union_per_service(a, b):
    merged = merge(a, b)
    assert set(merged) == set(a) | set(b)
    for service, peers_ in merged.items():
        assert peers_ == a.get(service, frozenset()) | b.get(service, frozenset())
