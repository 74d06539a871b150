"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay) or constant.

Exact ends: the last step (total - 1, 0-based) runs at min_lr_ratio for cosine and WSD; warmup reaches the
peak at step warmup - 1. A schedule is fixed when a run starts and saved with every checkpoint: a resume with
another --steps keeps it (cosine refuses, since its horizon is part of every step's lr) unless
--reset-schedule asks for a new one; WSD keeps its decay length, so more steps grow its stable phase (as long
as the run has not begun to decay).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from kititans.errors import KititansError

KINDS = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class Schedule:
    kind: str
    total: int  # optimizer steps
    warmup: int
    min_ratio: float = 0.1
    decay: int = 0  # wsd: steps of the final decay

    @property
    def decay_start(self) -> int:
        return self.total - self.decay if self.kind == "wsd" else self.warmup

    def multiplier(self, step: int) -> float:
        """Multiplier of the base lr at 0-based `step`."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            if step < self.decay_start:
                return 1.0
            progress = min((step - self.decay_start + 1) / self.decay, 1.0)
            return 1.0 - (1.0 - self.min_ratio) * progress
        span = self.total - 1 - self.warmup
        progress = min((step - self.warmup) / span, 1.0) if span > 0 else 1.0
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def make_schedule(
    kind: str, total: int, warmup: int, min_ratio: float = 0.1, decay_fraction: float = 0.2
) -> Schedule:
    """The schedule of a run of `total` steps; a warmup that the run never finishes is an error."""
    if kind not in KINDS:
        raise KititansError(f"optim.schedule must be one of {', '.join(KINDS)}; got {kind!r}")
    if warmup < 0 or not 0.0 <= min_ratio <= 1.0:
        raise KititansError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
    if warmup >= total:
        raise KititansError(
            f"optim.warmup_steps {warmup} >= train.steps {total}: the run would never reach its peak lr "
            f"(use --set optim.warmup_steps={max(0, total // 10)} or more --steps)"
        )
    decay = 0
    if kind == "wsd":
        if not 0.0 < decay_fraction <= 1.0:
            raise KititansError(f"optim.decay_fraction must be in (0, 1], got {decay_fraction}")
        decay = max(1, round(total * decay_fraction))
        if warmup > total - decay:
            raise KititansError(
                f"wsd: warmup ({warmup} steps) overlaps the decay (the last {decay} of {total} steps): "
                "lower optim.warmup_steps or optim.decay_fraction"
            )
    return Schedule(kind, total, warmup, min_ratio, decay)


def schedule_for(optim: Any, steps: int) -> Schedule:
    """The schedule a run config asks for (optim section + train.steps). Every training entry point calls it
    before it prepares data or builds a model, so a warmup the run never finishes is refused first."""
    return make_schedule(optim.schedule, steps, optim.warmup_steps, optim.min_lr_ratio, optim.decay_fraction)


def lr_multiplier(step: int, total: int, warmup: int, kind: str = "cosine", min_ratio: float = 0.1,
                  decay_fraction: float = 0.2) -> float:  # fmt: skip
    """Multiplier of the base lr for 0-based `step` of `total` (make_schedule(...).multiplier(step))."""
    return make_schedule(kind, total, warmup, min_ratio, decay_fraction).multiplier(step)


def resumed_schedule(
    saved: Schedule | None, wanted: Schedule, step: int, reset: bool
) -> tuple[Schedule, str]:
    """The schedule a run resumed at `step` continues with, and a note for the log ('' when unchanged).

    Unchanged settings keep the saved schedule. --reset-schedule takes the wanted one. Without it, only a
    changed length is accepted where the lr of the steps already taken stays what it was: constant, and WSD
    before its decay (the decay keeps its length, the stable phase grows or shrinks)."""
    if saved is None or saved == wanted:
        return wanted, ""
    if reset:
        return wanted, (
            f"new lr schedule from step {step}: {wanted.kind} over {wanted.total} steps (was {saved.total})"
        )
    same_shape = (saved.kind, saved.warmup, saved.min_ratio) == (wanted.kind, wanted.warmup, wanted.min_ratio)
    if same_shape and saved.kind == "constant":
        return dataclasses.replace(saved, total=wanted.total), ""
    if same_shape and saved.kind == "wsd":
        grown = dataclasses.replace(saved, total=wanted.total)
        if step <= min(saved.decay_start, grown.decay_start) and grown.decay_start >= saved.warmup:
            return (
                grown,
                f"wsd: stable phase now ends at step {grown.decay_start} (decay {grown.decay} steps)",
            )
        raise KititansError(
            f"the wsd run has decayed since step {saved.decay_start} (resumed at {step}): it cannot be extended "
            "from here; resume from a checkpoint before its decay, or pass --reset-schedule"
        )
    if not same_shape:
        raise KititansError(
            f"the lr schedule differs from the one the run started with ({_describe(saved)} -> "
            f"{_describe(wanted)}): resume with the run's settings, or pass --reset-schedule"
        )
    at = saved.multiplier(step)
    new = wanted.multiplier(step)
    raise KititansError(
        f"--steps {wanted.total} changes the cosine schedule the run started with {saved.total} steps (the lr "
        f"would jump from {at:.2f} to {new:.2f} of its peak at step {step}): keep --steps {saved.total}, or "
        "pass --reset-schedule"
    )


def _describe(s: Schedule) -> str:
    return f"{s.kind}, {s.total} steps, warmup {s.warmup}, min {s.min_ratio:g}"
