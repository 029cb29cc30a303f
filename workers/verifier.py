"""Verifier worker process: load the target model, serve requests until SIGTERM."""

from __future__ import annotations

import logging

import torch

from cosine.broker import RedisSettings
from cosine.engine.kv_budget import bytes_per_token
from cosine.engine.models import load_model, load_tokenizer, memory_by_device
from cosine.engine.prompting import eos_ids
from cosine.engine.runner import ModelRunner
from cosine.engine.target import TargetVerifier
from cosine.engine.vocab import identity
from cosine.service.run_loop import stop_on_signals
from cosine.service.verifier_service import VerifierService, VerifierSettings
from cosine.units import human_bytes

log = logging.getLogger(__name__)


def main(redis_settings: RedisSettings, settings: VerifierSettings, target: str, device: str | None,
         dtype: str | None, threads: int | None, device_map=None, max_memory=None,
         quantization: str | None = None) -> None:
    """``device_map``/``max_memory``/``quantization``: how the target is placed and loaded
    (:func:`~cosine.engine.models.load_model`; ``device`` is used where no device map is given)."""
    stop = stop_on_signals()
    if threads:
        torch.set_num_threads(threads)
    model = load_model(target, device, dtype, device_map=device_map, max_memory=max_memory,
                       quantization=quantization)
    log.info("verifier %s: target parameters %s", settings.worker_id,
             ", ".join(f"{dev} {n / 2**20:.1f} MiB" for dev, n in memory_by_device(model).items()))
    tokenizer = load_tokenizer(target)
    runner = ModelRunner(model, "target")
    capacity = None
    if settings.kv_memory is not None:
        per_slot = bytes_per_token(model.config, runner.dtype)
        capacity = settings.kv_memory // per_slot
        log.info("verifier %s: KV budget %s = %d token slots of %s", settings.worker_id,
                 human_bytes(settings.kv_memory), capacity, human_bytes(per_slot))
    engine = TargetVerifier(runner, eos_ids(model, tokenizer), capacity_tokens=capacity)
    log.info("verifier %s loaded %s", settings.worker_id, target)
    VerifierService(redis_settings, settings, engine, tokenizer, identity=identity(tokenizer)).run(stop)
