"""Writes tests/vectors/tensorflow.json: what real TensorFlow computes, step by step, for the
sequences the service's TensorFlow arithmetic modes are tested against.

Runs `tf.compat.v1.train.ExponentialMovingAverage` (zero_debias off) eagerly on a float64 and a
float32 variable: the variable takes each value (`assign`), the step variable each num_updates,
and one `apply` updates the shadow, as in a training loop. Needs tensorflow-cpu, which is not a
dependency of the service; in a separate virtual environment:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tfvenv/bin/python tests/vectors/make_tf_vectors.py            # rewrites the file
    /tmp/tfvenv/bin/python tests/vectors/make_tf_vectors.py --check    # compares, writes nothing

Numbers are JSON numbers written with Python's repr, which reads back as the same float64 bit for
bit (a float32 shadow is written as the float64 it converts to exactly).
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

OUTPUT = Path(__file__).with_name("tensorflow.json")
DECAYS = [0.99, 0.999, 0.9999, 0.99999999]
FIXED_NUM_UPDATES = 1000
DTYPES = {"float64": tf.float64, "float32": tf.float32}


def run_tensorflow(
    variable: str, decay: float, initial: float, values: list[float], steps: list[int] | None
) -> list[float]:
    """The shadow after each value, as real TensorFlow computes it."""
    var = tf.Variable(initial, dtype=DTYPES[variable])
    step = tf.Variable(0, dtype=tf.int64)
    ema = tf.compat.v1.train.ExponentialMovingAverage(
        decay, num_updates=step if steps is not None else None, zero_debias=False
    )
    # The first apply creates the shadow from the variable's value; updating a value with itself
    # leaves it as it is, so the shadow starts at `initial` (as the variable holds it).
    ema.apply([var])
    shadows = []
    for i, value in enumerate(values):
        var.assign(value)
        if steps is not None:
            step.assign(steps[i])
        ema.apply([var])
        shadows.append(float(ema.average(var).numpy()))
    return shadows


def random_values(seed: int, count: int) -> list[float]:
    """Magnitudes spread evenly over 1e-3 .. 1e6 on a log scale, half of them negative."""
    rng = np.random.default_rng(seed)
    magnitudes = 10.0 ** rng.uniform(-3, 6, count)
    signs = rng.choice([-1.0, 1.0], count)
    return [float(v) for v in signs * magnitudes]


def inputs() -> dict[str, list[float]]:
    halvings = [0.0] * 40
    return {
        "worked": [5.0, 10.0, 10.0],
        "random": random_values(2026, 2000),
        "short": random_values(7, 400),
        # float64 values near the smallest normal (2.2250738585072014e-308), subnormals among
        # them: TensorFlow's CPU kernels flush subnormal inputs and results to zero.
        "tiny64": [
            1e-310,
            5e-324,
            -1e-308,
            2.2250738585072014e-308,
            3e-308,
            -2.5e-308,
            1e-300,
            0.0,
            -0.0,
            4e-308,
            2.2250738585072014e-308,
            1e-320,
            -3e-308,
            1.5e-307,
            2e-308,
            *halvings,
        ],
        # the same for float32 (smallest normal 1.1754943508222875e-38; values are rounded to
        # float32 on entry, some to subnormals, some halfway between two floats)
        "tiny32": [
            1e-40,
            1.4e-45,
            -1e-38,
            1.1754943508222875e-38,
            3e-38,
            -2.5e-38,
            1e-30,
            0.0,
            -0.0,
            4e-38,
            1.1754943508222875e-38,
            1e-44,
            16777217.0,
            -16777219.0,
            1.0000000596046448,
            3.4e38,
            -1e38,
            2e-38,
            *halvings,
        ],
    }


def sequences(values: dict[str, list[float]]) -> list[dict[str, Any]]:
    plans: list[dict[str, Any]] = []
    for variable in DTYPES:
        plans.append(
            {
                "input": "worked",
                "variable": variable,
                "decay": 0.99,
                "initial": 0.0,
                "num_updates": [0, 10000, 10000],
            }
        )
        count = len(values["random"])
        for decay in DECAYS:
            for mode, steps in [
                ("step", list(range(count))),
                ("fixed", [FIXED_NUM_UPDATES] * count),
                ("absent", None),
            ]:
                plans.append(
                    {
                        "input": "random",
                        "variable": variable,
                        "decay": decay,
                        "initial": -123.456789,
                        "num_updates": steps,
                        "mode": mode,
                    }
                )
        short = len(values["short"])
        # num_updates past 2**24, where float32 rounds them, and up to the service's 1e15
        rng = np.random.default_rng(11)
        for steps in [
            [2**24 - 200 + 3 * i for i in range(short)],
            sorted(int(n) for n in rng.integers(0, 10**15, short, endpoint=True)),
        ]:
            plans.append(
                {
                    "input": "short",
                    "variable": variable,
                    "decay": 0.9999,
                    "initial": 0.0,
                    "num_updates": steps,
                }
            )
        for decay in [0.0, 0.1, 0.3, 0.5, 1.0]:
            plans.append(
                {
                    "input": "short",
                    "variable": variable,
                    "decay": decay,
                    "initial": 1.0,
                    "num_updates": None,
                }
            )
        tiny = "tiny64" if variable == "float64" else "tiny32"
        for decay, initial in [(0.5, 1e-300 if tiny == "tiny64" else 1e-30), (0.99, 2.5e-38)]:
            plans.append(
                {
                    "input": tiny,
                    "variable": variable,
                    "decay": decay,
                    "initial": initial,
                    "num_updates": None,
                }
            )
        plans.append(
            {
                "input": tiny,
                "variable": variable,
                "decay": 0.75,
                "initial": 0.0,
                "num_updates": list(range(len(values[tiny]))),
            }
        )
    return plans


def build() -> dict[str, Any]:
    values = inputs()
    out = []
    for plan in sequences(values):
        plan["shadows"] = run_tensorflow(
            plan["variable"],
            plan["decay"],
            plan["initial"],
            values[plan["input"]],
            plan["num_updates"],
        )
        if plan.get("mode") in ("step", "fixed"):
            plan["num_updates"] = plan.pop("mode")  # written as a rule, not a list
        else:
            plan.pop("mode", None)
        out.append(plan)
    return {
        "about": "tf.compat.v1.train.ExponentialMovingAverage (zero_debias=False), applied "
        "eagerly after each variable.assign(value); see make_tf_vectors.py",
        "tensorflow": tf.__version__,
        "num_updates_rules": {"step": "the value's index, from 0", "fixed": FIXED_NUM_UPDATES},
        "inputs": values,
        "sequences": out,
    }


def dump(document: dict[str, Any]) -> str:
    # One line per input and per sequence: diffs stay readable, the file compact.
    lines = ["{"]
    for key, value in document.items():
        if key in ("inputs", "sequences"):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            inner = [
                (f"  {json.dumps(k)}: " if isinstance(value, dict) else "  ")
                + json.dumps(v, separators=(",", ":"))
                for k, v in items
            ]
            opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
            lines.append(f" {json.dumps(key)}: {opening}\n" + ",\n".join(inner) + f"\n {closing},")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)},")
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join(lines) + "\n}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file")
    args = parser.parse_args()
    text = dump(build())
    json.loads(text)  # well-formed
    if args.check:
        same = OUTPUT.read_text() == text
        print("identical" if same else f"{OUTPUT} differs from what TensorFlow computes now")
        return 0 if same else 1
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
