"""CoSine: collaborative speculative inference over Redis Streams.

``from cosine import Client`` gives the producer client. Attributes load lazily, so importing the engine
(``cosine.engine``) does not pull in the Redis client.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Client": "cosine.client",
    "AsyncClient": "cosine.client",
    "GenerationResult": "cosine.client",
    "StreamChunk": "cosine.client",
    "SamplingParams": "cosine.sampling_params",
    "CosineError": "cosine.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cosine' has no attribute {name!r}")
