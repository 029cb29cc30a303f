"""Verifier worker process: load the target model, serve requests until SIGTERM."""

from __future__ import annotations

import logging

import torch

from cosine.broker import RedisSettings
from cosine.engine.models import load_model, load_tokenizer
from cosine.engine.runner import ModelRunner
from cosine.engine.target import TargetVerifier
from cosine.engine.vocab import identity
from cosine.service.run_loop import stop_on_signals
from cosine.service.verifier_service import VerifierService, VerifierSettings

log = logging.getLogger(__name__)


def main(redis_settings: RedisSettings, settings: VerifierSettings, target: str, device: str | None,
         dtype: str | None, threads: int | None) -> None:
    stop = stop_on_signals()
    if threads:
        torch.set_num_threads(threads)
    model = load_model(target, device, dtype)
    tokenizer = load_tokenizer(target)
    engine = TargetVerifier(ModelRunner(model, "target"), tokenizer.eos_token_id)
    log.info("verifier %s loaded %s", settings.worker_id, target)
    VerifierService(redis_settings, settings, engine, tokenizer, identity=identity(tokenizer)).run(stop)
