"""Request and response bodies: the API's contract, and its OpenAPI documentation."""

from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from app.keys import NAME_RULE
from app.scripts import Fields

# 1e15 keeps (1 + n) / (10 + n) exact in float64 with plenty to spare.
MAX_NUM_UPDATES = 10**15
MAX_HISTORY = 100_000
# Counts, and the event and history ids made of them, stay exact integers in a Lua double.
MAX_COUNT = 2**53


class Model(BaseModel):
    """Base for request bodies: unknown fields, NaN, infinities and quoted numbers are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


Decay = Annotated[
    float,
    Field(ge=0, le=1, description="Decay in [0, 1]: the weight the shadow keeps per update."),
]


def _integral(value: Any) -> Any:
    # JSON Schema's integer includes 7.0: accept a float with no fractional part as an int.
    return int(value) if isinstance(value, float) and value.is_integer() else value


NumUpdates = Annotated[int, Field(ge=0, le=MAX_NUM_UPDATES), BeforeValidator(_integral)]
HistoryCap = Annotated[int, Field(ge=0, le=MAX_HISTORY), BeforeValidator(_integral)]
NUM_UPDATES_DOC = (
    "TensorFlow's num_updates (the training step), an integer in [0, 1e15]: the decay used is "
    "min(decay, (1 + num_updates) / (10 + num_updates)). Null or absent: the stream's decay, "
    "or its own count when auto_num_updates is on."
)


class StreamConfig(Model):
    """A stream's configuration, as set by PUT."""

    decay: Decay = Field(examples=[0.99])
    initial: float | None = Field(
        default=None,
        description="The shadow's starting value. Null: the first value pushed becomes the shadow.",
        examples=[0.0],
    )
    auto_num_updates: bool = Field(
        default=False,
        description="Use the stream's own update count as num_updates when a push carries none.",
        examples=[False],
    )
    history: HistoryCap = Field(
        default=0,
        description="Keep the newest this many (time, raw, smoothed) entries; 0 keeps none.",
        examples=[1000],
    )


class Sample(Model):
    """One value to apply, optionally with TensorFlow's num_updates."""

    value: float = Field(description="A finite number.", examples=[5.0])
    num_updates: NumUpdates | None = Field(
        default=None, description=NUM_UPDATES_DOC, examples=[10000]
    )


def _number_or_object(item: Any) -> str:
    return "object" if isinstance(item, dict) else "number"


BatchItem = Annotated[
    Annotated[float, Tag("number")] | Annotated[Sample, Tag("object")],
    Discriminator(_number_or_object),
]


class Push(Model):
    """A push: one `value` (with its optional `num_updates`), or a list of `values` applied in
    order in one atomic update, where one bad element applies none."""

    # The schema says what the validator below enforces: exactly one of value and values, and
    # num_updates only beside value.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["value"]}, {"required": ["values"]}],
            "not": {"required": ["values", "num_updates"]},
        }
    )

    value: float | SkipJsonSchema[None] = Field(
        default=None, description="A finite number.", examples=[5.0]
    )
    num_updates: NumUpdates | None = Field(
        default=None, description=NUM_UPDATES_DOC, examples=[10000]
    )
    values: Annotated[list[BatchItem], Field(min_length=1)] | SkipJsonSchema[None] = Field(
        default=None,
        description="Numbers, or objects with value and num_updates, applied in order.",
        examples=[[1.5, 2.0, {"value": 10.0, "num_updates": 7}]],
    )

    @model_validator(mode="after")
    def _value_or_values(self) -> Self:
        if (self.value is None) == (self.values is None):
            raise ValueError("give either value or values")
        if self.values is not None and self.num_updates is not None:
            raise ValueError("num_updates goes with value; give values as objects to set it")
        return self

    def samples(self) -> list[tuple[float, int | None]]:
        if self.values is None:
            assert self.value is not None
            return [(self.value, self.num_updates)]
        return [
            (item, None) if isinstance(item, float) else (item.value, item.num_updates)
            for item in self.values
        ]


class StreamState(BaseModel):
    """A stream's state and configuration, as returned by a push and by GET."""

    name: str = Field(description=f"The stream's name: {NAME_RULE}.", examples=["cpu"])
    value: float | None = Field(
        description="The shadow (the moving average). Null before the first value when the "
        "stream has no initial value.",
        examples=[4.555],
    )
    debiased: float | None = Field(
        description="The bias-corrected average: a zero-started shadow divided by 1 minus the "
        "product of the decays used so far (Adam-style). Null before the first value, or while "
        "every decay used was 1.",
        examples=[5.0],
    )
    count: int = Field(description="Updates applied so far.", examples=[2])
    last: float | None = Field(description="The last raw value pushed.", examples=[10.0])
    decay_used: float | None = Field(
        description="The decay used by the last update.", examples=[0.99]
    )
    updated_at: float | None = Field(
        description="Redis server time of the last update, in Unix seconds.",
        examples=[1764072000.123456],
    )
    config: StreamConfig = Field(description="The stream's configuration.")

    @classmethod
    def from_fields(cls, name: str, fields: Fields) -> Self:
        """Build from the hash fields d i a h v n l u t b p (see app/lua/push.lua)."""
        decay, initial, auto, history, value, count, last, used, at, biased, product = fields
        assert decay is not None
        assert count is not None
        assert biased is not None
        assert product is not None
        n = int(count)
        correction = 1.0 - float(product)
        return cls.model_construct(
            name=name,
            value=_number(value),
            debiased=float(biased) / correction if n and correction else None,
            count=n,
            last=_number(last),
            decay_used=_number(used),
            updated_at=_number(at),
            config=StreamConfig.model_construct(
                decay=float(decay),
                initial=_number(initial),
                auto_num_updates=auto == "1",
                history=int(history or 0),
            ),
        )


def _number(text: str | None) -> float | None:
    return None if text is None else float(text)


class StreamPage(BaseModel):
    """One page of stream names; follow next_cursor until it is null."""

    streams: list[str] = Field(description="Stream names.", examples=[["cpu", "cpu.load"]])
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null when the listing is complete.",
        examples=[None],
    )


class HistoryEntry(BaseModel):
    """One applied value: its update's id (the stream's count after it), time, raw and smoothed."""

    id: int = Field(description="The stream's count after this value.", examples=[41])
    time: float = Field(description="Redis server time, Unix seconds.", examples=[1764072000.5])
    raw: float = Field(description="The value pushed.", examples=[10.0])
    value: float = Field(description="The shadow after this value.", examples=[4.555])


class HistoryPage(BaseModel):
    """The oldest `limit` entries after `since`, oldest first."""

    entries: list[HistoryEntry] = Field(description="Oldest first.", examples=[[]])
    next_since: int | None = Field(
        description="Pass as `since` for the next page; null when there is no more.",
        examples=[None],
    )


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (media type application/problem+json)."""

    type: str = Field(default="about:blank", examples=["about:blank"])
    title: str = Field(examples=["Not Found"])
    status: int = Field(examples=[404])
    detail: str = Field(examples=["stream 'cpu' does not exist"])
    instance: str | None = Field(default=None, examples=["/v1/streams/cpu"])
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="For invalid input: where and what, one entry per error."
    )
