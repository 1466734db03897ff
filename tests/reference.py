"""tf.train.ExponentialMovingAverage in plain Python float64: the tests' reference.

Written from TensorFlow's definition (moving_averages.py), not from the service's code:
    decay = min(decay, (1 + num_updates) / (10 + num_updates))   when num_updates is given
    shadow -= (1 - decay) * (shadow - value)
and, for the bias-corrected value, a zero-started copy divided by 1 - prod(decays).
"""

from dataclasses import dataclass


def decay_for(decay: float, num_updates: int | None) -> float:
    if num_updates is None:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


@dataclass
class ReferenceEma:
    decay: float
    initial: float | None = None
    auto_num_updates: bool = False

    def __post_init__(self) -> None:
        self.shadow = self.initial
        self.count = 0
        self.last: float | None = None
        self.decay_used: float | None = None
        self.zero_started = 0.0
        self.decay_product = 1.0

    def push(self, value: float, num_updates: int | None = None) -> None:
        if num_updates is None and self.auto_num_updates:
            num_updates = self.count
        decay = decay_for(self.decay, num_updates)
        if self.shadow is None:
            self.shadow = value
        else:
            self.shadow -= (1 - decay) * (self.shadow - value)
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
