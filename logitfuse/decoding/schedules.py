"""When to ask the LLM: fusion schedules for :class:`logitfuse.CoGenesisLogitsProcessor`.

A schedule decides, at each decoding step and for each row, whether the LLM is consulted. Steps
without an LLM call use the SLM alone (α = 1); the tokens generated meanwhile are fed to the LLM in
one go at its next call (lazy catch-up), so both models stay in sync.

- ``"always"``: every step (the default).
- ``"periodic(P, K, T)"``: the CoGenesis paper's ``FusionStrategy``: every step below ``P``, then
  steps whose phase ``(step - K - 1) mod (K + T)`` is below ``T`` (``T`` fused steps in every
  ``K + T``; the ``K + 1`` offset is the paper's and kept for a faithful comparison).
- ``"entropy_gate(h)"``: only rows whose SLM entropy (nats) is at or above ``h``; ``h = 0`` is
  ``always``.
- ``"head_gate(tau)"``: only rows where the fusion head's learned call gate predicts that the call
  lowers the NLL by at least ``tau`` nats (:meth:`logitfuse.FusionHead.call_gain`, from SLM-side
  signals alone); needs a head trained with a gate (``logitfuse train --gate-hidden``).

>>> from logitfuse.decoding.schedules import parse
>>> schedule = parse("periodic(2, 3, 1)")
>>> [bool(schedule.should_call(step, None)) for step in range(10)]
[True, True, False, False, True, False, False, False, True, False]
"""

from __future__ import annotations

import math
import re

import torch

Tensor = torch.Tensor

__all__ = ["Always", "EntropyGate", "HeadGate", "Periodic", "Schedule", "parse"]


class Schedule:
    """Base class. ``should_call(step, slm_entropy, call_gain)`` returns a bool or a ``(batch_size,)``
    bool tensor.

    ``step`` counts decoding steps from 0 (the first generated token); ``slm_entropy`` is the SLM's
    per-row entropy in nats, ``(batch_size,)`` float32, or ``None`` when :attr:`needs_entropy` is
    false (then it is not computed); ``call_gain`` the head gate's predicted gain per row (nats),
    ``None`` unless :attr:`needs_call_gain`. Either need means the decision reads the SLM's output
    at the position, so the LLM call cannot run while the SLM computes it.
    """

    needs_entropy: bool = False
    needs_call_gain: bool = False

    def should_call(self, step: int, slm_entropy: Tensor | None,
                    call_gain: Tensor | None = None) -> bool | Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.spec

    @property
    def spec(self) -> str:  # pragma: no cover
        raise NotImplementedError


class Always(Schedule):
    """Consult the LLM at every step."""

    def should_call(self, step: int, slm_entropy: Tensor | None, call_gain: Tensor | None = None) -> bool:
        return True

    @property
    def spec(self) -> str:
        return "always"


class Periodic(Schedule):
    """The paper's schedule: every step below ``P``, then ``T`` of every ``K + T`` steps.

    Args:
        P (`int`): number of leading steps that are always fused (``>= 0``).
        K (`int`): SLM-only steps per cycle (``>= 0``).
        T (`int`): fused steps per cycle (``>= 1``).
    """

    def __init__(self, P: int, K: int, T: int):
        for name, value, low in (("P", P, 0), ("K", K, 0), ("T", T, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"periodic schedule: {name}={value!r} must be an int >= {low}")
        self.P, self.K, self.T = P, K, T

    def should_call(self, step: int, slm_entropy: Tensor | None, call_gain: Tensor | None = None) -> bool:
        if step < self.P:
            return True
        return (step - self.K - 1) % (self.K + self.T) < self.T

    @property
    def spec(self) -> str:
        return f"periodic({self.P}, {self.K}, {self.T})"


class EntropyGate(Schedule):
    """Consult the LLM only for rows where the SLM is unsure: entropy (nats) ``>= threshold``.

    Args:
        threshold (`float`): entropy in nats, ``>= 0``; ``0`` calls at every step.
    """

    needs_entropy = True

    def __init__(self, threshold: float):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"entropy_gate: threshold={threshold!r} must be a number >= 0 (nats)")
        self.threshold = float(threshold)

    def should_call(self, step: int, slm_entropy: Tensor | None, call_gain: Tensor | None = None) -> Tensor:
        if slm_entropy is None:
            raise ValueError("entropy_gate needs the SLM's per-row entropy")
        return slm_entropy.clamp(min=0) >= self.threshold

    @property
    def spec(self) -> str:
        return f"entropy_gate({self.threshold:g})"


class HeadGate(Schedule):
    """Consult the LLM only for rows where the fusion head's call gate predicts a gain of at least
    ``tau`` nats of NLL (:meth:`logitfuse.FusionHead.call_gain`: SLM-side signals only, read before
    anything is sent). The session computes the gain; the head must have a gate.

    Args:
        tau (`float`): the least predicted gain (nats) worth a call; lower calls more often (a very
            negative ``tau`` calls at every step).
    """

    # the gain reads the SLM's distribution at the position: like the entropy gate, the call waits for it
    needs_entropy = True
    needs_call_gain = True

    def __init__(self, tau: float):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise ValueError(f"head_gate: tau={tau!r} must be a finite number (nats of predicted NLL gain)")
        self.tau = float(tau)

    def should_call(self, step: int, slm_entropy: Tensor | None, call_gain: Tensor | None = None) -> Tensor:
        if call_gain is None:
            raise ValueError("head_gate needs the head's predicted call gain (FusionHead.call_gain); "
                             "FusionSession.step computes it")
        return call_gain >= self.tau

    @property
    def spec(self) -> str:
        return f"head_gate({self.tau:g})"


_NUMBER = r"\s*([-+0-9.eE]+)\s*"


def parse(schedule: str | Schedule) -> Schedule:
    """A :class:`Schedule` from ``"always"``, ``"periodic(P, K, T)"``, ``"entropy_gate(h)"`` or
    ``"head_gate(tau)"`` (a :class:`Schedule` instance is returned as is)."""
    if isinstance(schedule, Schedule):
        return schedule
    if not isinstance(schedule, str):
        raise TypeError(f"schedule must be a string or a logitfuse.decoding.schedules.Schedule, got {type(schedule).__name__}")
    text = schedule.strip()
    if text == "always":
        return Always()
    if match := re.fullmatch(rf"periodic\({_NUMBER},{_NUMBER},{_NUMBER}\)", text):
        try:
            P, K, T = (int(group) for group in match.groups())
        except ValueError:
            raise ValueError(f"schedule={schedule!r}: P, K and T must be integers, e.g. 'periodic(5, 10, 3)'") from None
        return Periodic(P, K, T)
    if match := re.fullmatch(rf"entropy_gate\({_NUMBER}\)", text):
        try:
            threshold = float(match.group(1))
        except ValueError:
            raise ValueError(f"schedule={schedule!r}: the threshold must be a number, e.g. 'entropy_gate(2.5)'") from None
        return EntropyGate(threshold)
    if match := re.fullmatch(rf"head_gate\({_NUMBER}\)", text):
        try:
            tau = float(match.group(1))
        except ValueError:
            raise ValueError(f"schedule={schedule!r}: tau must be a number, e.g. 'head_gate(0.05)'") from None
        return HeadGate(tau)
    raise ValueError(
        f"schedule={schedule!r} is not one of 'always', 'periodic(P, K, T)', 'entropy_gate(threshold)', 'head_gate(tau)'"
    )
