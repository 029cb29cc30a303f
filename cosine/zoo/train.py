"""Training of the zoo's Llama-style models on token streams, with optional distillation from a teacher."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of one zoo model."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 1024

    def config(self, vocab_size: int, eos_id: int, pad_id: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )


@dataclass
class TrainPlan:
    """How one model is trained; ``tokens`` may be cut to fit ``time_budget_s`` (the cut is recorded)."""

    tokens: int
    seq_len: int = 256
    batch: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    time_budget_s: float = math.inf
    # Share of the steps (at the end) that learn from the teacher's distribution instead of the data.
    distill_fraction: float = 0.0
    distill_temperature: float = 1.0


@dataclass
class TrainReport:
    planned_tokens: int
    trained_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    cut_to_budget: bool = False
    loss_curve: list[tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class WindowSampler:
    """Random fixed-length windows from per-domain token arrays, mixed with given weights."""

    def __init__(self, streams: dict[str, np.ndarray], weights: dict[str, float], seed: int) -> None:
        self.names = sorted(streams)
        self.streams = streams
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.p = w / w.sum()
        self.rng = np.random.default_rng(seed)

    def batch(self, batch: int, seq_len: int) -> torch.Tensor:
        rows = []
        choices = self.rng.choice(len(self.names), size=batch, p=self.p)
        for c in choices:
            arr = self.streams[self.names[c]]
            start = int(self.rng.integers(0, len(arr) - seq_len - 1))
            rows.append(arr[start : start + seq_len + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def new_model(spec: ModelSpec, vocab_size: int, eos_id: int, pad_id: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.config(vocab_size, eos_id, pad_id))
    return model


def _lr_at(step: int, total: int, plan: TrainPlan) -> float:
    if step < plan.warmup_steps:
        return plan.lr * (step + 1) / plan.warmup_steps
    progress = min(1.0, (step - plan.warmup_steps) / max(1, total - plan.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return plan.lr * (plan.min_lr_ratio + (1 - plan.min_lr_ratio) * cosine)


def train(
    model: LlamaForCausalLM,
    sampler: WindowSampler,
    plan: TrainPlan,
    desc: str,
    teacher: LlamaForCausalLM | None = None,
) -> TrainReport:
    """Train ``model`` in place on windows from ``sampler``; returns what was done."""
    tokens_per_step = plan.batch * plan.seq_len
    total = max(1, plan.tokens // tokens_per_step)
    report = TrainReport(planned_tokens=plan.tokens)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": plan.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=plan.lr,
        betas=(0.9, 0.95),
    )
    if teacher is not None:
        teacher.eval()
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=2.0)
    ema = None
    step = 0
    phase_start: tuple[int, float] | None = None
    while step < total:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, plan)
        batch = sampler.batch(plan.batch, plan.seq_len)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=inputs).logits
        distill = teacher is not None and step >= total * (1 - plan.distill_fraction)
        if distill:
            with torch.no_grad():
                t_logits = teacher(input_ids=inputs).logits
            temp = plan.distill_temperature
            loss = F.kl_div(
                F.log_softmax(logits / temp, dim=-1).flatten(0, 1),
                F.log_softmax(t_logits / temp, dim=-1).flatten(0, 1),
                log_target=True,
                reduction="batchmean",
            ) * (temp * temp)
        else:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if step % 10 == 0 or step == total:
            report.loss_curve.append((step, round(ema, 4)))
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", kd="y" if distill else "n")
        now = time.perf_counter()
        if distill and phase_start is None:
            phase_start = (step - 1, now)  # distillation steps cost more: re-project once they run
        checkpoint = step == 3 or (phase_start is not None and step == phase_start[0] + 3)
        if checkpoint and plan.time_budget_s < math.inf:
            since_step, since = phase_start if phase_start is not None else (0, start)
            rate = (now - since) / max(1, step - since_step)
            elapsed = now - start
            projected = elapsed + (total - step) * rate
            if projected > plan.time_budget_s:
                new_total = max(step + 1, step + int((plan.time_budget_s - elapsed) / rate))
                log.warning(
                    "%s: %d steps would take %.0f s, over the %.0f s budget; training %d steps instead",
                    desc,
                    total,
                    projected,
                    plan.time_budget_s,
                    new_total,
                )
                total = new_total
                bar.total = total
                report.cut_to_budget = True
    bar.close()
    model.eval()
    report.steps = step
    report.trained_tokens = step * tokens_per_step
    report.seconds = round(time.perf_counter() - start, 1)
    report.tokens_per_s = round(report.trained_tokens / max(report.seconds, 1e-9), 1)
    return report


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, ids: np.ndarray, seq_len: int = 256, max_tokens: int = 65536) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping windows of a held-out stream."""
    model.eval()
    n = min(len(ids) - 1, max_tokens)
    total, count = 0.0, 0
    for start in range(0, n - 1, seq_len):
        chunk = torch.from_numpy(ids[start : min(start + seq_len + 1, n + 1)].astype(np.int64))[None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total += float(loss)
        count += chunk.shape[1] - 1
    return total / max(count, 1)
