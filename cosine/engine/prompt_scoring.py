"""A cheap prior for which drafter fits a request: each drafter's loss on the prompt's tail."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Only the prompt's last tokens are scored: enough to tell domains apart, cheap for any prompt length.
TAIL_TOKENS = 128


@torch.no_grad()
def prompt_losses(models: dict[str, torch.nn.Module], prompt_ids: list[list[int]]) -> dict[str, list[float]]:
    """Mean next-token cross-entropy of every model on every prompt's tail."""
    out: dict[str, list[float]] = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        losses = []
        for ids in prompt_ids:
            tail = ids[-TAIL_TOKENS:]
            if len(tail) < 2:
                losses.append(0.0)
                continue
            x = torch.tensor([tail], device=device)
            logits = model(input_ids=x).logits[0, :-1].float()
            losses.append(float(F.cross_entropy(logits, x[0, 1:])))
        out[name] = losses
    return out


def best_by_prompt_loss(models: dict[str, torch.nn.Module], prompt_ids: list[list[int]]) -> list[str]:
    """For each prompt, the model with the lowest loss on its tail."""
    losses = prompt_losses(models, prompt_ids)
    return [min(losses, key=lambda n: losses[n][i]) for i in range(len(prompt_ids))]
