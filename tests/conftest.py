"""Shared fixtures. Model tests run on the demo zoo (``zoo/`` or ``$COSINE_ZOO``); a missing zoo fails them.

``COSINE_TEST_DEVICE`` and ``COSINE_TEST_DTYPE`` (default cpu / float32) move the model tests elsewhere,
e.g. ``scripts/gpu_check.sh`` runs them on CUDA in bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from cosine.engine.speculative import SpecConfig, SpeculativeEngine
from cosine.zoo import paths

from .helpers import TEST_DEVICE, TEST_DTYPE, tiny_llama

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
