"""What a round of a live pipeline costs beyond the profiled cost model, measured as it runs.

The cost model (:mod:`cosine.policy.cost_model`) prices a verification pass and a drafting job on an idle
machine. A request's round on a live pipeline, from one of its verifications to the next, costs more: the
draft job and the draft travel through Redis, the drafter does per-job work, the verifier schedules and
writes output, and on shared cores every process slows the others. Those costs come once per round
whatever the draft's length, so a model without them makes short drafts look cheap. (Measured on the 2-core
zoo under fluctuating load: a round took 56-67 ms where its forward took about 24 ms and the built-in model
predicted 11-14 ms of pass plus 3-7 ms of drafting; adaptive control, pricing rounds by the model alone,
drafted about 3 positions where fixed lengths of 4 and 6 gave lower per-token latency.)

:class:`RoundClock` learns two corrections from what the verifier measures after every pass:

* ``pass_scale``: the measured forward over the model's prediction for it (how much slower the target runs
  here and now than where it was profiled);
* ``overhead_ms(batch)``: for each request verified with a draft, the time since its previous verification
  minus the target forwards the verifier ran meanwhile (its own pass, other batches, prefills) minus the
  modelled drafting of its draft: what its round cost outside forwards and drafting. Most of it is work per
  request (its job, its draft and its output chunk are each encoded, sent and decoded; the drafter keeps
  per-request state), so it grows with the batch: it is fitted as ``overhead_base_ms + overhead_row_ms *
  batch`` by least squares over the passes seen, older passes weighing less (a pass's weight decays by
  ``1 - ewma`` per pass). A draft drafted ahead of its job (lookahead) costs no drafting time in the round,
  so lookahead hits lower it, as they lower the real cost.

A round at a given depth and batch is then priced :meth:`RoundClock.round_ms` = ``pass_scale * pass +
drafting + overhead_ms(batch)``. Both corrections are bounded and start neutral (scale 1, overhead 0: the
cost model alone) until ``min_passes`` passes have been seen.

Pure code: no Redis, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cosine.errors import InvalidParameterError


@dataclass
class ClockSettings:
    ewma: float = 0.05  # weight of the newest pass in both estimates (about the last 1 / ewma passes count)
    min_passes: int = 8  # passes observed before the corrections apply (before: the cost model alone)
    scale_bounds: tuple[float, float] = (0.25, 8.0)  # pass_scale is kept within these
    max_overhead_ms: float = 1000.0  # overhead_ms is kept within [0, this]

    def __post_init__(self) -> None:
        if not (isinstance(self.ewma, (int, float)) and 0 < self.ewma <= 1):
            raise InvalidParameterError("ewma", f"must be in (0, 1], got {self.ewma!r}")
        if isinstance(self.min_passes, bool) or not isinstance(self.min_passes, int) or self.min_passes < 0:
            raise InvalidParameterError("min_passes", f"must be an integer >= 0, got {self.min_passes!r}")
        low, high = self.scale_bounds
        if not 0 < low <= 1 <= high:
            raise InvalidParameterError("scale_bounds", f"must satisfy 0 < low <= 1 <= high, got {self.scale_bounds!r}")
        if not self.max_overhead_ms >= 0:
            raise InvalidParameterError("max_overhead_ms", f"must be >= 0, got {self.max_overhead_ms!r}")


class RoundClock:
    """Measured corrections to the cost model's price of a round (see the module docstring)."""

    def __init__(self, settings: ClockSettings | None = None) -> None:
        self.settings = settings or ClockSettings()
        self.passes = 0
        self._scale = 1.0
        # Decayed sums for the weighted least-squares line overhead = base + row * batch.
        self._w = self._wx = self._wy = self._wxx = self._wxy = 0.0
        self._base = self._row = 0.0

    @property
    def ready(self) -> bool:
        return self.passes >= self.settings.min_passes

    @property
    def pass_scale(self) -> float:
        return self._scale if self.ready else 1.0

    def overhead_ms(self, batch: int) -> float:
        """What a round at this batch costs outside forwards and drafting (0 until the clock is ready)."""
        if not self.ready:
            return 0.0
        return min(self.settings.max_overhead_ms, self._base + self._row * max(0, batch))

    def observe(self, measured_ms: float, modelled_ms: float, batch: int, overheads_ms: list[float]) -> None:
        """One pass of ``batch`` rows: its measured forward and the model's prediction for it, and for each
        request it verified with a draft (and verified before) the round's time outside forwards and modelled
        drafting."""
        s = self.settings
        measured_ms, modelled_ms = _finite("measured_ms", measured_ms), _finite("modelled_ms", modelled_ms)
        if measured_ms > 0 and modelled_ms > 0:
            low, high = s.scale_bounds
            ratio = min(high, max(low, measured_ms / modelled_ms))
            self._scale = ratio if self.passes == 0 else (1 - s.ewma) * self._scale + s.ewma * ratio
            self.passes += 1
        samples = [_finite("overheads_ms", v) for v in overheads_ms]
        if samples:
            self._fit(float(batch), min(s.max_overhead_ms, max(0.0, sum(samples) / len(samples))))

    def _fit(self, x: float, y: float) -> None:
        keep = 1 - self.settings.ewma
        self._w, self._wx, self._wy = keep * self._w + 1, keep * self._wx + x, keep * self._wy + y
        self._wxx, self._wxy = keep * self._wxx + x * x, keep * self._wxy + x * y
        mx, my = self._wx / self._w, self._wy / self._w
        var = self._wxx / self._w - mx * mx
        row = (self._wxy / self._w - mx * my) / var if var > 0.25 else 0.0  # batches too alike: a level only
        if row < 0:  # never cheaper per request as the batch grows
            row = 0.0
        base = my - row * mx
        if base < 0:  # a line through the origin instead
            base, row = 0.0, (self._wxy / self._wxx if self._wxx > 0 else 0.0)
        self._base, self._row = base, max(0.0, row)

    def pass_ms(self, modelled_ms: float) -> float:
        """A modelled pass's expected time here."""
        return self.pass_scale * modelled_ms

    def round_ms(self, pass_ms: float, draft_ms: float, batch: int) -> float:
        """A round's expected time: the modelled pass (scaled), the drafting, the overhead at this batch."""
        return self.pass_ms(pass_ms) + draft_ms + self.overhead_ms(batch)

    def as_dict(self) -> dict[str, float]:
        ready = self.ready
        return {"pass_scale": round(self.pass_scale, 3),
                "round_overhead_base_ms": round(self._base if ready else 0.0, 2),
                "round_overhead_row_ms": round(self._row if ready else 0.0, 3)}


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(name, f"must be a finite number, got {value!r}")
    return float(value)
