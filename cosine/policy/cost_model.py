"""Cost models: how long a verification pass and a drafting job take, as small linear models.

:meth:`CostModel.verify_ms` is a fixed cost per forward plus terms per request, per fed token beyond the
roofline's knee (``verify_free_tokens``: a large target on a GPU feeds its first tokens for free) and per
request and context token; :meth:`CostModel.fed` says which token slots a pass computes (the tokens fed, or
batch times largest tree for an engine that pads rows, as cosine's runner does).
:meth:`CostModel.draft_ms` is an overhead plus a cost per step and per row. Both are fitted from
measurements (:mod:`cosine.profiling`, ``cosine profile``) by non-negative least squares on relative error
and saved as JSON with what they were measured on. The formulas and the default's numbers:
``docs/scheduling.md``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosine.errors import InvalidParameterError

log = logging.getLogger(__name__)

FORMAT = "cosine.cost_model"
VERSION = 1

VERIFY_FIELDS = ("verify_base_ms", "verify_row_ms", "verify_token_ms", "verify_context_ms")
KNEE_FIELD = "verify_free_tokens"  # fitted by a search over knees, not by least squares
DRAFT_FIELDS = ("draft_overhead_ms", "draft_step_ms", "draft_row_ms")


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares ``argmin ||a x - b||, x >= 0`` (Lawson & Hanson's active-set method).

    Columns are scaled to unit norm first, so features of very different size (``1`` next to
    ``batch * context``) are treated alike; the result is in the original units.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.shape != (a.shape[0],):
        raise ValueError(f"nnls: shapes {a.shape} and {b.shape} do not match")
    m, n = a.shape
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    s = a / norms
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(np.float64).eps * max(m, n) * max(1.0, float(np.abs(s).sum(axis=0).max()))
    max_iter = max_iter or 3 * n + 10
    w = s.T @ (b - s @ x)
    for _ in range(max_iter):
        free = ~passive
        if not free.any() or w[free].max() <= tol:
            break
        j = int(np.argmax(np.where(free, w, -np.inf)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(s[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            # Step from x towards z until the first passive coefficient hits zero, then drop it.
            neg = passive & (z <= tol)
            step = np.min(x[neg] / np.maximum(x[neg] - z[neg], np.finfo(np.float64).tiny))
            x = x + step * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive.any():
                break
        w = s.T @ (b - s @ x)
    return np.maximum(x, 0.0) / norms


def _fit(features: np.ndarray, ms: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """NNLS on relative error (each row weighted by 1/ms); returns coefficients and residual statistics."""
    weight = 1.0 / np.maximum(ms, 1e-6)
    coef = nnls(features * weight[:, None], ms * weight)
    pred = features @ coef
    resid = pred - ms
    stats = {
        "rms_ms": round(float(np.sqrt(np.mean(resid**2))), 4),
        "max_abs_ms": round(float(np.max(np.abs(resid))), 4),
        "rms_relative": round(float(np.sqrt(np.mean((resid * weight) ** 2))), 4),
    }
    return coef, stats


def _check_count(field_name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidParameterError(field_name, f"must be an integer >= 0, got {value!r}")
    return int(value)


@dataclass
class CostModel:
    """Verification and drafting time in milliseconds (the formulas: the field comments, ``docs/scheduling.md``).

    A bare ``CostModel()`` is all zeros, waiting for :meth:`fit_verify` / :meth:`fit_draft`;
    :meth:`default` holds the demo zoo's numbers on one x86-64 CPU core in float32.
    """

    # -- verification pass: [1, batch, tree_tokens, batch * max_context] -------------------------------
    verify_base_ms: float = 0.0  # fixed cost of one target forward, ms
    verify_row_ms: float = 0.0  # extra per request in the batch, ms
    verify_token_ms: float = 0.0  # extra per token fed (roots + draft nodes), ms
    verify_context_ms: float = 0.0  # extra per row per cached context token (attention), ms
    verify_free_tokens: float = 0.0  # tokens a pass feeds before each further one costs verify_token_ms
    # Every row of a pass computes as many slots as its longest segment (cosine's ModelRunner); False: the
    # engine packs the fed tokens (the simulated target, vLLM-style engines).
    padded: bool = False
    # -- drafting job: overhead + steps * (step + row * batch) ------------------------------------------
    draft_overhead_ms: float = 0.0  # fixed cost of a drafting job (catch-up bookkeeping, tree building), ms
    draft_step_ms: float = 0.0  # fixed cost of one drafter forward, ms
    draft_row_ms: float = 0.0  # extra per row per drafter forward, ms
    # What the numbers were measured on: device, dtype, target, created, sample counts, fit residuals.
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*VERIFY_FIELDS, KNEE_FIELD, *DRAFT_FIELDS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise InvalidParameterError(name, f"must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise InvalidParameterError(name, f"must be a finite number >= 0, got {value!r}")
            setattr(self, name, value)
        if not isinstance(self.padded, bool):
            raise InvalidParameterError("padded", f"must be true or false, got {self.padded!r}")
        if not isinstance(self.metadata, dict):
            raise InvalidParameterError("metadata", "must be a dict")

    # -- predictions ----------------------------------------------------------------------------------
    def verify_ms(self, batch: int, max_context: int, tree_tokens: int) -> float:
        """Predicted time of one verification pass; ``0.0`` for an empty batch."""
        batch = _check_count("batch", batch)
        max_context = _check_count("max_context", max_context)
        tree_tokens = _check_count("tree_tokens", tree_tokens)
        if batch == 0:
            return 0.0
        return (
            self.verify_base_ms
            + self.verify_row_ms * batch
            + self.verify_token_ms * max(0.0, tree_tokens - self.verify_free_tokens)
            + self.verify_context_ms * batch * max_context
        )

    def fed(self, batch: int, total: int, largest: int) -> int:
        """Token slots a pass computes for ``batch`` rows feeding ``total`` tokens, ``largest`` the most any
        row feeds: ``total`` when the engine packs them, ``batch * largest`` when it pads every row."""
        return batch * largest if self.padded else total

    def draft_ms(self, batch: int, steps: int) -> float:
        """Predicted time of a drafting job of ``steps`` forwards over ``batch`` rows; ``0.0`` if nothing runs."""
        batch = _check_count("batch", batch)
        steps = _check_count("steps", steps)
        if batch == 0 or steps == 0:
            return 0.0
        return self.draft_overhead_ms + steps * (self.draft_step_ms + self.draft_row_ms * batch)

    def draft_cost_ratio(self, batch: int = 1, context: int = 128) -> float:
        """One drafter step over one target pass of single tokens at this batch: the ``c`` of speculation control."""
        target = self.verify_ms(batch, context, batch)
        return (self.draft_step_ms + self.draft_row_ms * batch) / target if target > 0 else 0.0

    # -- fitting --------------------------------------------------------------------------------------
    def fit_verify(self, samples: list[tuple[int, int, int, float]]) -> CostModel:
        """Fit the verification coefficients to ``(batch, max_context, tree_tokens, ms)`` samples (in place):
        least squares at every knee the samples' token counts allow, keeping the knee that fits best (a knee
        must cut the relative error by a tenth to be preferred to none)."""
        rows = self._samples("samples", samples, 4)
        ms = np.array([r[3] for r in rows], dtype=np.float64)
        best: tuple[float, float] | None = None
        counts = sorted({float(t) for _, _, t, _ in rows})
        for knee in sorted({0.0, *counts[:-1]}):  # a knee at the largest count would leave no slope to fit
            x = np.array([[1.0, b, max(0.0, t - knee), b * c] for b, c, t, _ in rows], dtype=np.float64)
            err = _fit(x, ms)[1]["rms_relative"]
            if best is None or err < best[1] * (0.9 if best[0] == 0.0 else 1.0):
                best = (knee, err)
        assert best is not None
        self.verify_free_tokens = best[0]
        self.metadata["verify_knee_tokens"] = best[0]
        return self._fit_fields("verify", VERIFY_FIELDS,
                                [[1.0, b, max(0.0, t - best[0]), b * c] for b, c, t, _ in rows], list(ms))

    def fit_draft(self, samples: list[tuple[int, int, float]]) -> CostModel:
        """Fit the drafting coefficients to ``(batch, steps, ms)`` samples (in place)."""
        rows = self._samples("samples", samples, 3)
        return self._fit_fields("draft", DRAFT_FIELDS, [[1.0, s, s * b] for b, s, _ in rows], [r[2] for r in rows])

    def _fit_fields(self, kind: str, names: tuple[str, ...], features: list[list[float]], ms: list[float]) -> CostModel:
        x, y = np.array(features, dtype=np.float64), np.array(ms, dtype=np.float64)
        if len(y) < x.shape[1]:
            log.warning("fitting %d %s coefficients to only %d samples", x.shape[1], kind, len(y))
        coef, stats = _fit(x, y)
        for name, value in zip(names, coef):
            setattr(self, name, float(value))
        self.metadata[f"{kind}_samples"] = len(y)
        self.metadata[f"{kind}_fit"] = stats
        log.info("%s cost fit on %d samples: %s (%s)", kind, len(y), dict(zip(names, coef.tolist())), stats)
        return self

    @staticmethod
    def _samples(name: str, samples, width: int) -> list[tuple]:
        rows = [tuple(s) for s in samples]
        if not rows:
            raise InvalidParameterError(name, "need at least one sample to fit")
        for r in rows:
            if len(r) != width:
                raise InvalidParameterError(name, f"each sample has {width} values, got {r!r}")
            if any(not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) or v < 0
                   for v in r):
                raise InvalidParameterError(name, f"values must be finite numbers >= 0, got {r!r}")
        return rows

    def verify_coefficients(self) -> dict[str, float]:
        return {n: round(getattr(self, n), 6) for n in (*VERIFY_FIELDS, KNEE_FIELD)}

    def draft_coefficients(self) -> dict[str, float]:
        return {n: round(getattr(self, n), 6) for n in DRAFT_FIELDS}

    # -- persistence ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "verify_ms": {n: getattr(self, n) for n in (*VERIFY_FIELDS, KNEE_FIELD)},
            "padded": self.padded,
            "draft_ms": {n: getattr(self, n) for n in DRAFT_FIELDS},
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InvalidParameterError("cost_model", f"not a {FORMAT} document")
        if data.get("version") != VERSION:
            raise InvalidParameterError("cost_model", f"version {data.get('version')!r} is not {VERSION}")
        try:
            values = {n: data["verify_ms"][n] for n in VERIFY_FIELDS}
            values[KNEE_FIELD] = data["verify_ms"].get(KNEE_FIELD, 0.0)  # models saved before the knee: none
            values.update({n: data["draft_ms"][n] for n in DRAFT_FIELDS})
        except (KeyError, TypeError) as exc:
            raise InvalidParameterError("cost_model", f"missing coefficient {exc}") from exc
        # Models saved before ``padded`` existed were priced as packed.
        return cls(**values, padded=data.get("padded", False), metadata=dict(data.get("metadata") or {}))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model as JSON (written to a temporary file, then renamed into place)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=1, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostModel:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise InvalidParameterError("cost_model", f"{path} is not JSON: {exc}") from exc
        return cls.from_dict(data)

    # -- defaults -------------------------------------------------------------------------------------
    @classmethod
    def default(cls) -> CostModel:
        """The demo zoo (8-layer 384-wide Llama target, 2-layer 160-wide drafters) on one CPU core, float32.

        Fitted by ``cosine.profiling.run_profile`` (``threads=1``) on an x86-64 machine with 2 cores, rounded;
        how it was measured and cross-checked is in ``docs/scheduling.md``. Re-profile on other hardware: these
        numbers are only a starting point.
        """
        return cls(
            verify_base_ms=7.3,
            verify_row_ms=0.0,
            verify_token_ms=0.37,
            verify_context_ms=0.0021,
            draft_overhead_ms=0.24,
            draft_step_ms=0.56,
            draft_row_ms=0.12,
            padded=True,
            metadata={
                "device": "cpu",
                "dtype": "float32",
                "target": "zoo/target",
                "threads": 1,
                "machine": "x86_64",
                "source": "built-in default: run_profile of the demo zoo on one x86-64 CPU core",
                "created": "2026-11-26T05:06:00Z",
                "sample_count": 87,
                "verify_fit": {"rms_relative": 0.0736, "rms_ms": 1.27},
                "draft_fit": {"rms_relative": 0.0843, "rms_ms": 0.67},
            },
        )


def now_iso() -> str:
    """The current UTC time as an ISO-8601 string (for metadata)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
