"""Shared fixtures. Model tests run on the demo zoo (``zoo/`` or ``$COSINE_ZOO``); a missing zoo fails them.

``COSINE_TEST_DEVICE`` and ``COSINE_TEST_DTYPE`` (default cpu / float32) move the model tests elsewhere,
e.g. ``scripts/gpu_check.sh`` runs them on CUDA in bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from cosine.client import Client
from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.local_redis import LocalRedis
from cosine.zoo import paths

from .helpers import TEST_DEVICE, TEST_DTYPE, tiny_llama
from .pipeline_helpers import deployment

torch.set_num_threads(2)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def zoo_root():
    root = paths.zoo_dir()
    if not paths.manifest_path(root).exists():
        pytest.fail(f"the demo zoo is missing at {root}: run `cosine zoo build` (or set $COSINE_ZOO)")
    return root


@pytest.fixture(scope="session")
def zoo_engine(zoo_root) -> SpeculativeEngine:
    """The zoo's target and drafters (float32 on the CPU unless overridden), one engine per session."""
    return SpeculativeEngine.from_zoo(zoo_root, device=TEST_DEVICE, dtype=TEST_DTYPE, config=SpecConfig(k=4))


@pytest.fixture(scope="session")
def zoo_prompts(zoo_root) -> dict[str, list[str]]:
    return paths.load_prompts(zoo_root)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


# -- one live deployment for the tests that only need a working one ------------------------------------------
# Starting a deployment (Redis, a verifier and a drafter loading the zoo) costs 10-20 s on two cores, so the
# pipeline, metrics, OpenAI-endpoint and chat tests share this one. Tests that kill or stop workers for good,
# write junk that leaves state behind, or need other worker settings start their own.
@pytest.fixture(scope="session")
def live_redis():
    with LocalRedis() as srv:
        yield srv


@pytest.fixture(scope="session")
def live_trace(tmp_path_factory):
    """The shared verifier's ``--trace-passes`` file: a line per pass since it started."""
    return tmp_path_factory.mktemp("live-trace") / "passes.jsonl"


@pytest.fixture(scope="session")
def live_cluster(live_redis, live_trace, tmp_path_factory, zoo_root):
    """verifier-0 and drafter-0 at their defaults (prefix ``cosine``), the verifier tracing its passes."""
    with deployment(live_redis.url, verifiers=1, drafters=1, log_dir=str(tmp_path_factory.mktemp("live-logs")),
                    verifier_args=["--trace-passes", str(live_trace)]) as dep:
        yield dep


@pytest.fixture(scope="session")
def live_client(live_cluster):
    with Client(live_cluster.url) as c:
        yield c
