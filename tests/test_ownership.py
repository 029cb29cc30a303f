"""Request ownership: a client's requests are bound to its owner secret, so another client (or a malformed
message) cannot write into, resume, cancel or read them, even knowing their ids. The verifier's rules run
in-process on fakeredis with the simulated engine (as in test_service_unit.py); one test runs the attempts
against a live deployment through real clients."""

from __future__ import annotations

import msgpack
import pytest

from cosine.client import Client, build_request
from cosine.errors import RequestTimeoutError
from cosine.ownership import is_owned, may_act, new_secret, output_name, owned_id, owner_tag
from cosine.protocol import Cancel, Chunk, decode_entry, encode

from .test_service_unit import PROMPT, connector, make_verifier, truth  # noqa: F401 - connector is a fixture

VICTIM, ATTACKER = new_secret(), new_secret()


def owned_request(secret: str, **params):
    return build_request(PROMPT, owner=secret, **params)


def output(svc, rid: str, secret: str | None) -> list[Chunk]:
    return [decode_entry(f, (Chunk,)) for _, f in svc.streams.entries(svc.keys.out(output_name(rid, secret)))]


def run(svc, turns: int = 60) -> None:
    for _ in range(turns):
        svc.step()


def test_ids_are_unguessable_and_name_their_owner():
    a, b = build_request(PROMPT, owner=VICTIM), build_request(PROMPT, owner=VICTIM)
    assert a.request_id != b.request_id and len(a.request_id.split(".")[0]) == 32  # a random uuid4 each
    assert is_owned(a.request_id) and a.request_id.endswith(owner_tag(VICTIM)) and VICTIM not in a.request_id
    assert may_act(a.request_id, VICTIM) and not may_act(a.request_id, ATTACKER) and not may_act(a.request_id, None)
    assert may_act("legacy-id", None)  # an id without a tag: its id is its only key, as before
    assert output_name(a.request_id, VICTIM) != output_name(a.request_id, ATTACKER)
    assert owned_id("job-7", VICTIM) == f"job-7.{owner_tag(VICTIM)}"  # the caller's id, bound


def test_an_invalid_request_with_a_victims_id_writes_nothing_of_the_victims(connector):  # noqa: F811
    svc = make_verifier(connector)
    svc.recover_own()
    victim = owned_request(VICTIM, max_new_tokens=8)
    svc.streams.add(svc.keys.requests, victim)
    for secret in (None, ATTACKER):  # invalid (negative length), with no secret and with the attacker's
        body = msgpack.unpackb(encode(build_request(PROMPT, max_new_tokens=8, request_id="x")))
        body["request_id"], body["params"]["max_new_tokens"] = victim.request_id, -1
        if secret:
            body["owner"] = secret
        svc.streams.add(svc.keys.requests, {b"d": msgpack.packb(body)})
    run(svc)
    out = output(svc, victim.request_id, VICTIM)
    assert out[-1].finished and out[-1].finish_reason == "length" and out[-1].error is None
    assert [t for c in out for t in c.token_ids] == truth(8)
    assert not svc.streams.r.exists(svc.keys.out(output_name(victim.request_id, ATTACKER)))
    assert not svc.streams.r.exists(svc.keys.out(victim.request_id))
    assert svc.streams.r.xlen(svc.keys.dlq) == 2


def test_a_valid_request_with_a_victims_id_is_refused_and_cannot_resume_it(connector):  # noqa: F811
    svc = make_verifier(connector)
    svc.recover_own()
    victim = owned_request(VICTIM, max_new_tokens=8)
    svc.streams.add(svc.keys.requests, victim)
    run(svc, 3)
    thief = build_request(PROMPT, max_new_tokens=40, request_id="x", owner=ATTACKER)
    for stolen in (thief.__class__(**{**thief.__dict__, "request_id": victim.request_id}),  # the attacker's secret
                   thief.__class__(**{**thief.__dict__, "request_id": victim.request_id, "owner": None})):
        svc.streams.add(svc.keys.requests, stolen)
    run(svc)
    out = output(svc, victim.request_id, VICTIM)
    assert [t for c in out for t in c.token_ids] == truth(8) and out[-1].finish_reason == "length"
    reasons = [f[b"reason"].decode() for _, f in svc.streams.r.xrange(svc.keys.dlq)]
    assert reasons == ["request_id: bound to another client (its owner secret does not match)"] * 2
    assert svc.metrics.counters["ownership_refused"] == 2
    # Once the victim's request has ended, its id still cannot be taken over to write a new output.
    svc.streams.add(svc.keys.requests, thief.__class__(**{**thief.__dict__, "request_id": victim.request_id}))
    run(svc, 10)
    assert output(svc, victim.request_id, VICTIM) == out


def test_only_the_owner_can_cancel(connector):  # noqa: F811
    svc = make_verifier(connector)
    svc.recover_own()
    victim = owned_request(VICTIM, max_new_tokens=30)
    svc.streams.add(svc.keys.requests, victim)
    run(svc, 2)
    svc.streams.add(svc.keys.cancel, Cancel(victim.request_id, ATTACKER))
    svc.streams.add(svc.keys.cancel, Cancel(victim.request_id))
    run(svc)
    assert output(svc, victim.request_id, VICTIM)[-1].finish_reason == "length"
    assert svc.metrics.counters["cancels_refused"] == 2
    # A cancellation marker set by another client does not end a request admitted after it; its owner's does.
    late, mine = owned_request(VICTIM, max_new_tokens=30), owned_request(VICTIM, max_new_tokens=30)
    svc.streams.r.set(svc.keys.cancelled(late.request_id), ATTACKER)
    svc.streams.r.set(svc.keys.cancelled(mine.request_id), VICTIM)
    svc.streams.add(svc.keys.requests, late)
    svc.streams.add(svc.keys.requests, mine)
    run(svc)
    assert output(svc, late.request_id, VICTIM)[-1].finish_reason == "length"
    assert output(svc, mine.request_id, VICTIM)[-1].finish_reason == "cancelled"


@pytest.mark.slow
def test_against_a_live_deployment_another_client_cannot_read_cancel_or_write(cluster_url, zoo_prompts):
    prompt = zoo_prompts["code"][0]
    with Client(cluster_url) as owner, Client(cluster_url) as other:
        rid = owner.submit(prompt, max_new_tokens=24, ignore_eos=True)
        other.cancel(rid)  # ignored: not its request
        with pytest.raises(RequestTimeoutError):
            other.result(rid, timeout=2)  # its read key is not the owner's: nothing to read
        res = owner.result(rid, timeout=120)
        assert res.finish_reason == "length" and len(res.token_ids) == 24
        shared = Client(cluster_url, owner=owner.owner)  # the same secret in another client reads it too
        try:
            assert shared.result(rid, timeout=30).token_ids == res.token_ids
        finally:
            shared.close()


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory, zoo_root):
    from cosine.local_redis import LocalRedis

    from .pipeline_helpers import deployment

    with LocalRedis() as srv, deployment(srv.url, verifiers=1, drafters=1,
                                         log_dir=str(tmp_path_factory.mktemp("own-logs"))):
        yield srv.url
