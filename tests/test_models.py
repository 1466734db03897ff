"""Push bodies as the store receives them: `Push.samples()`, the columns push.lua's arguments are
built from, hold exactly the samples the JSON gives, in order."""

import json
from typing import Any

import pytest

from app.models import Push


def triples(data: dict[str, Any]) -> list[tuple[float, int | None, float | None]]:
    """The samples a push body gives, read straight from its JSON."""
    if "value" in data:
        return [(float(data["value"]), data.get("num_updates"), data.get("timestamp"))]
    return [
        (float(item["value"]), item.get("num_updates"), item.get("timestamp"))
        if isinstance(item, dict)
        else (float(item), None, None)
        for item in data["values"]
    ]


BODIES = {
    "one value": {"value": 5},
    "one value with both": {"value": 5.5, "num_updates": 3, "timestamp": 1764072000.25},
    "plain numbers": {"values": [1, 2.5, -3e-7, 0.1]},
    "many plain numbers": {"values": [i / 7 for i in range(1000)]},
    "objects": {"values": [{"value": 1, "num_updates": 2}, {"value": 3, "timestamp": 4.5}]},
    "mixed": {"values": [1.5, {"value": 2, "num_updates": 9}, 3, {"value": 4}] * 10},
}


@pytest.mark.parametrize("data", BODIES.values(), ids=BODIES.keys())
def test_samples_are_the_bodys_in_order(data: dict[str, Any]) -> None:
    samples = Push.model_validate_json(json.dumps(data)).samples()
    assert list(samples) == triples(data)
    assert len(samples) == len(triples(data))
    assert all(type(value) is float for value in samples.values)


def test_a_batch_of_plain_numbers_has_no_empty_columns_to_fill() -> None:
    samples = Push.model_validate_json(json.dumps(BODIES["many plain numbers"])).samples()
    assert samples.num_updates is None
    assert samples.timestamps is None
