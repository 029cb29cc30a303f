"""Unusable prompts raise InvalidParameterError naming the field, and nothing is left behind."""

from __future__ import annotations

import pytest

from cosine.errors import InvalidParameterError
from cosine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "prompt, field",
    [
        ([], "prompt"),
        ("", "prompt"),
        ([5, -1, 7], "prompt_token_ids"),
        ([5, 10**6], "prompt_token_ids"),
        ([5, "x"], "prompt_token_ids"),
    ],
)
def test_bad_prompts(zoo_engine, prompt, field):
    with pytest.raises(InvalidParameterError) as err:
        zoo_engine.generate([prompt], SamplingParams(max_new_tokens=4))
    assert err.value.field == field
    assert zoo_engine.verifier.runner.row_ids == []


def test_prompt_longer_than_context(zoo_engine):
    n = zoo_engine.verifier.max_len
    with pytest.raises(InvalidParameterError) as err:
        zoo_engine.generate([[5] * (n + 3)], SamplingParams(max_new_tokens=4))
    assert err.value.field == "prompt" and str(n) in str(err.value)


def test_one_bad_prompt_rejects_the_batch_before_any_work(zoo_engine):
    with pytest.raises(InvalidParameterError):
        zoo_engine.generate([[5, 6], []], SamplingParams(max_new_tokens=4))
    assert zoo_engine.verifier.runner.row_ids == []
    assert all(not d.runner.row_ids for d in zoo_engine.drafters.values())


def test_unknown_drafter(zoo_engine):
    with pytest.raises(InvalidParameterError) as err:
        zoo_engine.generate([[5, 6]], SamplingParams(max_new_tokens=4), drafter="nope")
    assert err.value.field == "drafter"


def test_generation_near_the_context_end_stops_with_length(zoo_engine):
    n = zoo_engine.verifier.max_len
    [seq] = zoo_engine.generate([[7] * (n - 3)], SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert seq.finish_reason.value == "length" and len(seq) == n


def test_stop_strings_and_tokens(zoo_engine, zoo_prompts):
    prompt = zoo_prompts["code"][0]
    [free] = zoo_engine.generate([prompt], SamplingParams(max_new_tokens=40))
    text = zoo_engine.text(free)
    assert len(text) > 10
    stop = text[5:8]
    [cut] = zoo_engine.generate([prompt], SamplingParams(max_new_tokens=40, stop=[stop]))
    assert cut.finish_reason.value == "stop"
    assert zoo_engine.text(cut) == text[: text.find(stop)]
    [by_id] = zoo_engine.generate([prompt], SamplingParams(max_new_tokens=40, stop_token_ids=[free.output_ids[3]]))
    assert by_id.output_ids == free.output_ids[: free.output_ids.index(free.output_ids[3]) + 1]
