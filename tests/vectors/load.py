"""The committed TensorFlow vectors (tensorflow.json, written by make_tf_vectors.py)."""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tests.reference import Arithmetic

PATH = Path(__file__).with_name("tensorflow.json")


@dataclass(frozen=True)
class Vector:
    """One sequence: a stream's configuration, the values pushed, and TensorFlow's shadows."""

    name: str
    arithmetic: Arithmetic
    decay: float
    initial: float
    values: list[float]
    num_updates: list[int | None]
    shadows: list[float]


@cache
def vectors() -> list[Vector]:
    document = json.loads(PATH.read_text())
    fixed = document["num_updates_rules"]["fixed"]
    out = []
    for i, seq in enumerate(document["sequences"]):
        values = document["inputs"][seq["input"]]
        rule = seq["num_updates"]
        steps: list[int | None]
        if rule == "step":
            steps = list(range(len(values)))
        elif rule == "fixed":
            steps = [fixed] * len(values)
        elif rule is None:
            steps = [None] * len(values)
        else:
            steps = list(rule)
        label = rule if isinstance(rule, str) or rule is None else "list"
        out.append(
            Vector(
                name=f"{i}-{seq['input']}-{seq['variable']}-{seq['decay']}-{label}",
                arithmetic="tensorflow-float32"
                if seq["variable"] == "float32"
                else "tensorflow-float64",
                decay=seq["decay"],
                initial=seq["initial"],
                values=values,
                num_updates=steps,
                shadows=seq["shadows"],
            )
        )
    return out
