"""Bad parameters raise InvalidParameterError naming the field."""

from __future__ import annotations

import pytest

from cosine.engine.speculative import SpecConfig
from cosine.errors import CosineError, InvalidParameterError
from cosine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert field in str(err.value)
    assert isinstance(err.value, CosineError) and isinstance(err.value, ValueError)


def test_good_sampling_params():
    p = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=3, stop=["\n\n"])
    assert not p.greedy and p.stop == ("\n\n",)
    assert SamplingParams().greedy


@pytest.mark.parametrize(
    "kwargs, field",
    [({"k": -1}, "k"), ({"tree_width": 0}, "tree_width"), ({"proposal": "x"}, "proposal"),
     ({"proposal": "sampled", "tree_width": 2}, "tree_width")],
)
def test_bad_spec_config(kwargs, field):
    with pytest.raises(InvalidParameterError) as err:
        SpecConfig(**kwargs)
    assert err.value.field == field
