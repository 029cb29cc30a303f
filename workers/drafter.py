"""Drafter worker process: load the drafter models, serve this worker's draft-job stream until SIGTERM."""

from __future__ import annotations

import logging

import torch

from cosine.broker import RedisSettings
from cosine.engine.draft_model import Drafter
from cosine.engine.models import load_model
from cosine.engine.runner import ModelRunner
from cosine.service.drafter_service import DrafterService, DrafterSettings
from cosine.service.run_loop import stop_on_signals

log = logging.getLogger(__name__)


def main(redis_settings: RedisSettings, settings: DrafterSettings, models: dict[str, str], device: str | None,
         dtype: str | None, threads: int | None) -> None:
    """``models`` maps expert names (e.g. domains) to model folders."""
    stop = stop_on_signals()
    if threads:
        torch.set_num_threads(threads)
    drafters = {}
    vocab = None
    for name, path in models.items():
        model = load_model(path, device, dtype)
        drafters[name] = Drafter(ModelRunner(model, name), name)
        size = int(model.config.vocab_size)
        if vocab is not None and size != vocab:
            raise SystemExit(f"drafter models disagree on the vocabulary: {vocab} vs {size} ids ({path})")
        vocab = size
    log.info("drafter %s loaded %s", settings.worker_id, ", ".join(f"{n}={p}" for n, p in models.items()))
    DrafterService(redis_settings, settings, drafters, vocab or 0).run(stop)
