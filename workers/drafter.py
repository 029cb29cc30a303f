"""Drafter worker process: load the drafter models, serve this worker's draft-job stream until SIGTERM."""

from __future__ import annotations

import logging

import torch

from cosine.broker import RedisSettings
from cosine.engine.draft_model import Drafter
from cosine.engine.models import describe_memory, load_model, load_tokenizer
from cosine.engine.runner import ModelRunner
from cosine.engine.vocab import check_compatible, identity
from cosine.service.drafter_service import DrafterService, DrafterSettings
from cosine.service.run_loop import stop_on_signals

log = logging.getLogger(__name__)


def main(redis_settings: RedisSettings, settings: DrafterSettings, models: dict[str, str], device: str | None,
         dtype: str | None, threads: int | None, devices: dict[str, str] | None = None) -> None:
    """``models`` maps expert names (e.g. domains) to model folders, each with its tokenizer: the experts
    must share one (checked here), and verifiers check it against their target's (announced in the
    heartbeat). Logits cover the tokenizer's ids, whatever size each model pads its table to. ``devices``:
    the device of some experts by name (``--model NAME=PATH@DEVICE``); the others load on ``device``."""
    stop = stop_on_signals()
    if threads:
        torch.set_num_threads(threads)
    drafters = {}
    first: tuple[str, object] | None = None
    bound = 0
    for name, path in models.items():
        tok = load_tokenizer(path)
        if first is None:
            first = (path, tok)
        else:
            check_compatible(first[0], first[1], path, tok)
        model = load_model(path, (devices or {}).get(name, device), dtype)
        drafters[name] = Drafter(ModelRunner(model, name, vocab_size=len(tok)), name)
        bound = max(bound, int(model.config.vocab_size), len(tok))
    log.info("drafter %s loaded %s", settings.worker_id, ", ".join(f"{n}={p}" for n, p in models.items()))
    log.info("drafter %s memory: %s", settings.worker_id,
             describe_memory({n: d.runner.model for n, d in drafters.items()}))
    ident = identity(first[1]) if first else None
    DrafterService(redis_settings, settings, drafters, bound, identity=ident).run(stop)
