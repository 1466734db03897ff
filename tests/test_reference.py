"""The references themselves, against the anchors: the TensorFlow arithmetic against every step
real TensorFlow computed (tests/vectors), the spread against pandas."""

import random

import pandas as pd
import pytest

from tests.reference import (
    ReferenceEma,
    exact_decay_spread,
    exact_time_spread,
)
from tests.vectors.load import Vector, vectors


@pytest.mark.parametrize("vector", vectors(), ids=lambda v: v.name)
def test_tensorflow_arithmetic_is_bit_identical_to_real_tensorflow(vector: Vector) -> None:
    reference = ReferenceEma(vector.decay, vector.initial, arithmetic=vector.arithmetic)
    for value, num_updates, shadow in zip(
        vector.values, vector.num_updates, vector.shadows, strict=True
    ):
        reference.push(value, num_updates)
        assert reference.shadow is not None
        assert reference.shadow.hex() == shadow.hex()


def test_the_vectors_cover_the_issue() -> None:
    seen = {(v.arithmetic, v.decay) for v in vectors()}
    for arithmetic in ("tensorflow-float64", "tensorflow-float32"):
        for decay in (0.99, 0.999, 0.9999, 0.99999999):
            assert (arithmetic, decay) in seen
    assert sum(len(v.values) for v in vectors()) > 6_000


def test_default_arithmetic_is_not_tensorflows() -> None:
    # The README's worked example in each arithmetic.
    expected = {
        "float64": [4.5, 4.555, 4.60945],
        "tensorflow-float64": [4.4999998807907104, 4.554999829530715, 4.609449779307839],
        "tensorflow-float32": [4.5, 4.554999828338623, 4.609449863433838],
    }
    for arithmetic, shadows in expected.items():
        reference = ReferenceEma(0.99, 0.0, arithmetic=arithmetic)  # type: ignore[arg-type]
        got = []
        for value, n in [(5.0, 0), (10.0, 10000), (10.0, 10000)]:
            reference.push(value, n)
            got.append(reference.shadow)
        assert got == shadows


def _values(seed: int, count: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.choice([-1, 1]) * 10 ** rng.uniform(-3, 6) for _ in range(count)]


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99, 0.999])
def test_decay_spread_is_pandas_ewm_var_adjust_false(decay: float) -> None:
    values = _values(1, 600)
    ewm = pd.Series(values).ewm(alpha=1 - decay, adjust=False)
    variance, std = ewm.var(), ewm.std()
    for n in [2, 3, 10, 97, 301, 600]:
        exact = exact_decay_spread(values[:n], [decay] * n)
        assert exact.variance == pytest.approx(variance[n - 1], rel=1e-12)
        assert exact.std == pytest.approx(std[n - 1], rel=1e-12)
    assert exact_decay_spread(values[:1], [decay]).variance is None
    assert pd.isna(variance[0])


@pytest.mark.parametrize(("halflife", "spacing"), [(10.0, 1.0), (60.0, 7.5), (0.5, 2.0)])
def test_time_spread_is_pandas_on_regular_spacing(halflife: float, spacing: float) -> None:
    values = _values(2, 400)
    times = [1.7e9 + spacing * i for i in range(len(values))]
    ewm = pd.Series(values).ewm(alpha=1 - 2 ** (-spacing / halflife), adjust=True)
    variance, std = ewm.var(), ewm.std()
    for n in [2, 5, 50, 399]:
        exact = exact_time_spread(values[:n], times[:n], halflife)
        assert exact.variance == pytest.approx(variance[n - 1], rel=1e-12)
        assert exact.std == pytest.approx(std[n - 1], rel=1e-12)


def test_pandas_has_no_variance_with_times() -> None:
    # Why the time-weighted spread is checked against its own definition.
    series = pd.Series([1.0, 2.0, 4.0])
    times = pd.to_datetime([0, 1, 3], unit="s")
    with pytest.raises(NotImplementedError):
        series.ewm(halflife="1s", times=times).var()
