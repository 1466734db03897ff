"""References for the tests, written from the definitions, not from the service's code.

tf.train.ExponentialMovingAverage (TensorFlow's moving_averages.py):
    decay = min(decay, (1 + num_updates) / (10 + num_updates))   when num_updates is given
    shadow -= (1 - decay) * (shadow - value)
and, for the bias-corrected value, a zero-started copy divided by 1 - prod(decays).

Three arithmetics (`ReferenceEma.arithmetic`):
- "float64": the update above in plain Python float64 (the service's default);
- "tensorflow-float64" / "tensorflow-float32": every step real TensorFlow 2.21 takes on a variable
  of that dtype, done here with numpy's float32 scalars: the decay converted to float32, the
  min with num_updates (cast to float32) in float32, `1 - decay` in float32 and then cast to the
  variable's dtype, `(shadow - value) * one_minus_decay` and the subtraction in the variable's
  dtype, a float32 variable holding each value rounded to float32, and subnormal inputs and
  results flushed to zero as TensorFlow's CPU kernels do.

In every arithmetic the bias-corrected value is computed in float64 with the decay used.

The spread (`exact_decay_spread`, `exact_time_spread`): exponentially weighted variance with
pandas' bias correction, computed from the weights themselves in 50-digit arithmetic (mpmath).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import mpmath
import numpy as np

Arithmetic = Literal["float64", "tensorflow-float64", "tensorflow-float32"]
ARITHMETICS: tuple[Arithmetic, ...] = ("float64", "tensorflow-float64", "tensorflow-float32")

SMALLEST_NORMAL = {"tensorflow-float64": 2.0**-1022, "tensorflow-float32": 2.0**-126}


def decay_for(decay: float, num_updates: int | None) -> float:
    if num_updates is None:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


def tensorflow_decay(decay: float, num_updates: int | None) -> np.float32:
    """The decay tensor TensorFlow builds: float32 throughout."""
    d = np.float32(decay)
    if num_updates is not None:
        n = np.float32(num_updates)
        d = min(d, (np.float32(1.0) + n) / (np.float32(10.0) + n))
    return d


def to_float32(x: float) -> float:
    return float(np.float32(x))


def flush(x: float, arithmetic: Arithmetic) -> float:
    """A subnormal becomes a zero of the same sign (the CPU's flush-to-zero)."""
    return x * 0.0 if abs(x) < SMALLEST_NORMAL[arithmetic] else x


def tensorflow_step(
    shadow: float, value: float, one_minus_decay: float, arithmetic: Arithmetic
) -> float:
    """`shadow -= (shadow - value) * one_minus_decay` in the variable's dtype."""

    def f(x: float) -> float:
        return flush(x, arithmetic)

    if arithmetic == "tensorflow-float32":
        v, x, o = np.float32(f(shadow)), np.float32(f(value)), np.float32(one_minus_decay)
        delta = np.float32(f(float(v - x))) * o
        return f(float(v - np.float32(f(float(delta)))))
    delta = f(f(shadow) - f(value)) * one_minus_decay
    return f(f(shadow) - f(delta))


@dataclass
class ReferenceEma:
    decay: float
    initial: float | None = None
    auto_num_updates: bool = False
    arithmetic: Arithmetic = "float64"

    def __post_init__(self) -> None:
        self.shadow = self.entry(self.initial) if self.initial is not None else None
        self.count = 0
        self.last: float | None = None
        self.decay_used: float | None = None
        self.zero_started = 0.0
        self.decay_product = 1.0

    def entry(self, value: float) -> float:
        """A value as the variable holds it."""
        return to_float32(value) if self.arithmetic == "tensorflow-float32" else value

    def push(self, value: float, num_updates: int | None = None) -> None:
        if num_updates is None and self.auto_num_updates:
            num_updates = self.count
        if self.arithmetic == "float64":
            decay = decay_for(self.decay, num_updates)
            if self.shadow is None:
                self.shadow = value
            else:
                self.shadow -= (1 - decay) * (self.shadow - value)
            self.zero_started -= (1 - decay) * (self.zero_started - value)
        else:
            d32 = tensorflow_decay(self.decay, num_updates)
            decay = float(d32)
            one_minus = float(np.float32(1.0) - d32)
            x = self.entry(value)
            if self.shadow is None:
                self.shadow = x
            else:
                self.shadow = tensorflow_step(self.shadow, x, one_minus, self.arithmetic)
            # not TensorFlow's (zero_debias is off): float64, with the decay TensorFlow used
            self.zero_started -= (1 - decay) * (self.zero_started - value)
        self.decay_product *= decay
        self.count += 1
        self.last = value
        self.decay_used = decay

    @property
    def debiased(self) -> float | None:
        if self.count == 0 or self.decay_product == 1.0:
            return None
        return self.zero_started / (1 - self.decay_product)


@dataclass(frozen=True)
class Spread:
    """A weighted mean, bias-corrected variance and its square root; None where undefined."""

    mean: float
    variance: float | None
    std: float | None


def _spread(weights: Sequence[mpmath.mpf], values: Sequence[float]) -> Spread:
    """pandas' bias-corrected weighted variance:
    V = (sum w (x - m)^2 / sum w) * (sum w)^2 / ((sum w)^2 - sum w^2)."""
    total = mpmath.fsum(weights)
    mean = mpmath.fsum(w * x for w, x in zip(weights, values, strict=True)) / total
    biased = mpmath.fsum(w * (x - mean) ** 2 for w, x in zip(weights, values, strict=True)) / total
    denominator = total**2 - mpmath.fsum(w * w for w in weights)
    if denominator <= 0:
        return Spread(float(mean), None, None)
    variance = biased * total**2 / denominator
    return Spread(float(mean), float(variance), float(mpmath.sqrt(variance)))


def exact_decay_spread(values: Sequence[float], decays: Sequence[float]) -> Spread:
    """The spread of `values` where value i > 0 was taken in with decay `decays[i]` (the first
    value starts the mean; decays[0] is not used): pandas' ewm(alpha=1 - decay, adjust=False)
    weights, generalised to a decay per step. Weight of value i: (1 - d_i) * prod_{j>i} d_j, the
    first value's prod_{j>0} d_j."""
    with mpmath.workdps(50):
        weights: list[mpmath.mpf] = []
        tail = mpmath.mpf(1)
        for i in range(len(values) - 1, -1, -1):
            d = mpmath.mpf(decays[i])
            weights.append(tail * (1 - d) if i > 0 else tail)
            tail *= d
        weights.reverse()
        return _spread(weights, values)


def exact_time_spread(values: Sequence[float], times: Sequence[float], halflife: float) -> Spread:
    """The spread of samples weighted by time: sample i weighs 2 ** -((max(t) - t_i) / h)."""
    with mpmath.workdps(50):
        newest = max(times)
        weights = [
            mpmath.power(2, -(mpmath.mpf(newest) - mpmath.mpf(t)) / mpmath.mpf(halflife))
            for t in times
        ]
        return _spread(weights, values)


def z_score(value: float, before: Spread | None) -> float | None:
    """How many standard deviations `value` lies from the mean before it."""
    if before is None or not before.std:
        return None
    z = (value - before.mean) / before.std
    return z if math.isfinite(z) else None
