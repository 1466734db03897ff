"""Push bodies as the store receives them: `Push.samples()`, the columns push.lua's arguments are
built from, hold exactly the samples the JSON gives, in order; and `Push.from_json`, the fast
path's reading, accepts and refuses every body as the model does, with the same errors."""

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

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


@pytest.mark.parametrize("parse", [Push.model_validate_json, Push.from_json])
@pytest.mark.parametrize("data", BODIES.values(), ids=BODIES.keys())
def test_samples_are_the_bodys_in_order(data: dict[str, Any], parse: Any) -> None:
    samples = parse(json.dumps(data).encode()).samples()
    assert list(samples) == triples(data)
    assert len(samples) == len(triples(data))
    assert all(type(value) is float for value in samples.values)


@pytest.mark.parametrize("parse", [Push.model_validate_json, Push.from_json])
def test_a_batch_of_plain_numbers_has_no_empty_columns_to_fill(parse: Any) -> None:
    samples = parse(json.dumps(BODIES["many plain numbers"]).encode()).samples()
    assert samples.num_updates is None
    assert samples.timestamps is None


@pytest.mark.parametrize("parse", [Push.model_validate_json, Push.from_json])
@pytest.mark.parametrize(
    "data", [{"value": 5}, {"values": [1.5, {"value": 2}]}, {"values": [{"value": 2}]}]
)
def test_a_column_no_sample_has_is_none(data: dict[str, Any], parse: Any) -> None:
    samples = parse(json.dumps(data).encode()).samples()
    assert samples.num_updates is None
    assert samples.timestamps is None


# JSON text, some of it wrong for a push: what the two readings must agree on.
numbers = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0", "0.0"]),
)
elements = st.one_of(
    numbers,
    st.sampled_from(['"5"', '"{"', "true", "null", "[]", "[1]", "{}"]),
    st.builds(
        lambda value, steps: f'{{"value": {value}{steps}}}',
        numbers,
        st.sampled_from(["", ', "num_updates": 7', ', "num_updates": -1', ', "timestamp": 2']),
    ),
)
fields = st.one_of(
    st.builds(lambda items: f'"values": [{", ".join(items)}]', st.lists(elements, max_size=12)),
    st.builds(lambda value: f'"value": {value}', elements),
    st.sampled_from(['"num_updates": 3', '"timestamp": 1.5', '"values": 3', '"other": 1']),
)
bodies = st.builds(lambda parts: f"{{{', '.join(parts)}}}", st.lists(fields, max_size=3))


def reading(parse: Any, body: str) -> object:
    try:
        return list(parse(body.encode()).samples())
    except ValidationError as error:
        return error.errors(include_url=False, include_context=False, include_input=False)


@given(body=bodies)
@example(body='{"values": [1, 2, "x"]}')
@example(body='{"values": [1, {"value": 2, "bad": 3}]}')
@example(body='{"values": []}')
@example(body='{"values": [1], "num_updates": 3}')
@example(body=' {"values": [1, 2]}')
def test_the_fast_reading_is_the_models(body: str) -> None:
    assert reading(Push.from_json, body) == reading(Push.model_validate_json, body)
