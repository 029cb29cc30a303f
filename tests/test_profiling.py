"""Profiling the zoo into a cost model (small time budgets: this checks the plumbing, not the numbers)."""

from __future__ import annotations

import pytest
import torch

from cosine.errors import InvalidParameterError
from cosine.policy.cost_model import CostModel
from cosine.profiling import run_profile
from cosine.zoo import paths


@pytest.fixture(scope="module")
def zoo_profile(zoo_root) -> CostModel:
    drafters = {n: paths.drafter_dir(n, zoo_root) for n in paths.drafter_domains(zoo_root)[:1]}
    return run_profile(paths.target_dir(zoo_root), drafters, threads=1, time_budget_s=5, progress=False)


def test_profile_gives_a_usable_model(zoo_profile, tmp_path):
    m = zoo_profile
    assert m.verify_ms(1, 128, 1) > 0
    assert m.verify_ms(1, 128, 1) < m.verify_ms(4, 128, 4) < m.verify_ms(16, 128, 16)
    assert m.verify_ms(8, 128, 8) < m.verify_ms(8, 128, 72)  # draft nodes cost something
    assert 0 < m.draft_ms(1, 1) < m.draft_ms(1, 8) and m.draft_ms(1, 4) <= m.draft_ms(16, 4)
    md = m.metadata
    assert md["device"] == "cpu" and md["dtype"] == "float32" and md["threads"] == 1
    assert md["target"].endswith("target") and md["created"]
    assert md["verify_samples"] >= 4 and md["draft_samples"] >= 3
    assert md["sample_count"] == md["verify_samples"] + md["draft_samples"]
    assert md["grid"]["verify"] and "rms_relative" in md["verify_fit"]
    # It measured cosine's runner, which pads every row of a pass to its largest tree; the file says so.
    assert m.padded and m.fed(3, 7, 5) == 15
    path = tmp_path / "cost.json"
    m.save(path)
    assert CostModel.load(path) == m
    old = m.to_dict()
    del old["padded"]  # a profile saved before the field: priced as packed, as it was then
    assert not CostModel.from_dict(old).padded


def test_a_tiny_budget_still_measures_something(zoo_root):
    before = torch.get_num_threads()
    m = run_profile(paths.target_dir(zoo_root), {}, threads=1, time_budget_s=0.01, progress=False)
    assert torch.get_num_threads() == before  # the thread setting is put back
    assert m.verify_ms(2, 64, 2) > 0
    assert m.metadata["grid"]["draft"] == "not profiled (defaults)"
    assert m.draft_ms(1, 1) == CostModel.default().draft_ms(1, 1)


def test_bad_arguments():
    with pytest.raises(InvalidParameterError):
        run_profile("nowhere", {}, time_budget_s=0)
    with pytest.raises(InvalidParameterError):
        run_profile("nowhere", {}, threads=0)
