"""Request and response bodies: the API's contract, and its OpenAPI documentation."""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Annotated, Any, Literal, Self, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

from app.keys import NAME_MAX_LENGTH, NAME_PATTERN, NAME_RULE

# 1e15 keeps (1 + n) / (10 + n) exact in float64 with plenty to spare.
MAX_NUM_UPDATES = 10**15
MAX_HISTORY = 100_000
MAX_WINDOWS = 8
MAX_HALFLIFE = 1e9
# A microsecond, Redis TIME's resolution: below it ln 2 / halflife (a rate's scale) and the
# weights' exponents leave any meaningful range.
MIN_HALFLIFE = 1e-6
# The largest double that rounds to a finite float32 is just below 2**128 - 2**103.
FLOAT32_LIMIT = 2.0**128 - 2.0**103
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


Halflife = Annotated[
    float,
    Field(
        ge=MIN_HALFLIFE,
        le=MAX_HALFLIFE,
        description="Seconds after which a sample weighs half as much (by sample timestamps).",
    ),
]
DECAY_DOC = "In [0, 1]: the weight the shadow keeps per update (TensorFlow's EMA)."
HALFLIFE_DOC = "Seconds after which a sample weighs half as much, by sample timestamps."
Arithmetic = Literal["float64", "tensorflow-float64", "tensorflow-float32"]
ARITHMETIC_DOC = (
    "How the decay averages are computed. float64: TensorFlow's update form, "
    "shadow -= (1 - decay) * (shadow - value), in exact float64 (the worked example gives 4.5, "
    "4.555, 4.60945); not bit for bit what TensorFlow computes. tensorflow-float64 and "
    "tensorflow-float32: bit for bit what tf.compat.v1.train.ExponentialMovingAverage (2.21, "
    "CPU, zero_debias off) computes on a float64 or float32 variable: the decay rounded to "
    "float32, min(decay, (1 + n) / (10 + n)) and 1 - decay in float32, the update in the "
    "variable's dtype (values and initial rounded to float32 for tensorflow-float32), subnormals "
    "flushed to zero; the worked example gives 4.4999998807907104, 4.554999829530715, "
    "4.609449779307839 (float64 variable) and 4.5, 4.554999828338623, 4.609449863433838 "
    "(float32 variable, which TensorFlow prints as 4.5, 4.555, 4.60945). Needs a decay."
)
WINDOW_NAME = r"^[A-Za-z0-9_.\-]{1,32}$"


def _exactly_one(
    *names: str, never_with: Sequence[tuple[str, str]] = ()
) -> Callable[[dict[str, Any]], None]:
    """A JSON Schema adjustment saying what a model validator enforces: exactly one of `names`
    is given (present and not null), and no pair in `never_with` is given together."""
    given = {"not": {"type": "null"}}

    def adjust(schema: dict[str, Any]) -> None:
        schema["oneOf"] = [
            {
                "required": [name],
                "properties": {
                    other: given if other == name else {"type": "null"} for other in names
                },
            }
            for name in names
        ]
        if never_with:
            schema["not"] = {
                "anyOf": [
                    {"required": list(pair), "properties": dict.fromkeys(pair, given)}
                    for pair in never_with
                ]
            }

    return adjust


def _stream_config_schema(schema: dict[str, Any]) -> None:
    """The rules StreamConfig's validator enforces across fields, in JSON Schema: a decay or a
    halflife; initial, auto_num_updates and a TensorFlow arithmetic only with a decay; a rate only
    with a halflife, and its windows with halflives; with tensorflow-float32, an initial value
    within float32's range. (That window names are distinct, JSON Schema cannot say.)"""
    _exactly_one("decay", "halflife")(schema)
    with_decay, with_halflife = schema["oneOf"]
    with_decay["properties"]["kind"] = {"not": {"const": "rate"}}
    with_halflife["properties"] |= {
        "initial": {"type": "null"},
        "auto_num_updates": {"not": {"const": True}},
        "arithmetic": {"const": "float64"},
    }
    rate_windows = {
        "if": {"required": ["kind"], "properties": {"kind": {"const": "rate"}}},
        "then": {
            "properties": {
                "windows": {
                    "anyOf": [
                        {"type": "null"},
                        {"type": "array", "items": {"properties": {"decay": {"type": "null"}}}},
                    ]
                }
            }
        },
    }
    float32_initial = {
        "if": {
            "required": ["arithmetic"],
            "properties": {"arithmetic": {"const": "tensorflow-float32"}},
        },
        "then": {
            "properties": {
                "initial": {
                    "anyOf": [
                        {"type": "null"},
                        {
                            "type": "number",
                            "exclusiveMinimum": -FLOAT32_LIMIT,
                            "exclusiveMaximum": FLOAT32_LIMIT,
                        },
                    ]
                }
            }
        },
    }
    schema["allOf"] = [rate_windows, float32_initial]


class Window(Model):
    """A named extra average of the same samples: by a decay per update, or by a halflife."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("decay", "halflife"))

    name: str = Field(
        pattern=WINDOW_NAME, description="1 to 32 of A-Z a-z 0-9 _ . -", examples=["1m"]
    )
    decay: Decay | None = Field(default=None, description=DECAY_DOC, examples=[None])
    halflife: Halflife | None = Field(default=None, description=HALFLIFE_DOC, examples=[60.0])

    @model_validator(mode="after")
    def _decay_or_halflife(self) -> Self:
        if (self.decay is None) == (self.halflife is None):
            raise ValueError("give either decay or halflife")
        return self


class StreamConfig(Model):
    """A stream's configuration, as set by PUT: a decay (TensorFlow's EMA, per update) or a
    halflife (by time), optionally more windows, a kind, and retention."""

    model_config = ConfigDict(json_schema_extra=_stream_config_schema)

    decay: Decay | None = Field(default=None, description=DECAY_DOC, examples=[0.99])
    halflife: Halflife | None = Field(default=None, description=HALFLIFE_DOC, examples=[60.0])
    kind: Literal["mean", "rate"] = Field(
        default="mean",
        description="mean: the average of the values; rate: values are event counts, and the "
        "stream reports events per second (needs a halflife).",
        examples=["mean"],
    )
    initial: float | None = Field(
        default=None,
        description="With a decay: the shadow's starting value. Null: the first value pushed "
        "becomes the shadow.",
        examples=[0.0],
    )
    auto_num_updates: bool = Field(
        default=False,
        description="Use the stream's own update count as num_updates when a push carries none.",
        examples=[False],
    )
    windows: Annotated[list[Window], Field(min_length=1, max_length=MAX_WINDOWS)] | None = Field(
        default=None,
        description=f"Up to {MAX_WINDOWS} more named averages, updated by the same pushes.",
        examples=[[{"name": "1m", "halflife": 60}, {"name": "5m", "halflife": 300}]],
    )
    arithmetic: Arithmetic = Field(
        default="float64", description=ARITHMETIC_DOC, examples=["float64"]
    )
    late: Literal["merge", "reject"] = Field(
        default="merge",
        description="A sample older than the stream's newest: merge it exactly as if it had "
        "arrived in order, or reject the push with 409.",
        examples=["merge"],
    )
    ttl: Annotated[int, Field(ge=1, le=10 * 365 * 86_400), BeforeValidator(_integral)] | None = (
        Field(
            default=None,
            description="Seconds without a push after which the stream is deleted. Null: never.",
            examples=[86400],
        )
    )
    history: HistoryCap = Field(
        default=0,
        description="Keep the newest this many (time, raw, smoothed) entries; 0 keeps none.",
        examples=[1000],
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.decay is None) == (self.halflife is None):
            raise ValueError("give either decay or halflife")
        if self.halflife is not None and (self.initial is not None or self.auto_num_updates):
            raise ValueError("initial and auto_num_updates go with a decay, not a halflife")
        if self.arithmetic != "float64" and self.decay is None:
            raise ValueError("the tensorflow arithmetics need a decay")
        if (
            self.arithmetic == "tensorflow-float32"
            and self.initial is not None
            and abs(self.initial) >= FLOAT32_LIMIT
        ):
            raise ValueError("initial is beyond float32's range (tensorflow-float32)")
        if self.kind == "rate" and self.halflife is None:
            raise ValueError("a rate stream needs a halflife")
        if self.kind == "rate" and any(w.decay is not None for w in self.windows or ()):
            raise ValueError("a rate stream's windows need halflives")
        names = [w.name for w in self.windows or ()]
        if len(set(names)) != len(names):
            raise ValueError("window names must be distinct")
        return self


TIMESTAMP_DOC = (
    "When the sample was taken, Unix seconds (a float). Absent: Redis server time. At most "
    "EMA_MAX_CLOCK_SKEW seconds past the server clock."
)
# The year 2106, a static bound; the service also refuses what is beyond EMA_MAX_CLOCK_SKEW.
Timestamp = Annotated[float, Field(ge=0, le=2**32)]
Triple = tuple[float, int | None, float | None]


@dataclass(slots=True)  # not frozen: that costs a single push 0.3 us more to build
class Samples:
    """Samples to apply in order, by column: their values, num_updates and timestamps. A column
    no sample has is None, so that a batch of plain numbers is its list of values, as validated,
    with no per-sample work before it is formatted for push.lua."""

    values: Sequence[float]
    num_updates: Sequence[int | None] | None = None
    timestamps: Sequence[float | None] | None = None

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Triple]:
        """The samples as (value, num_updates, timestamp) triples."""
        return zip(
            self.values,
            repeat(None) if self.num_updates is None else self.num_updates,
            repeat(None) if self.timestamps is None else self.timestamps,
            strict=False,  # a column of None is endless
        )


class Sample(Model):
    """One value to apply, optionally with TensorFlow's num_updates and a timestamp."""

    value: float = Field(description="A finite number.", examples=[5.0])
    num_updates: NumUpdates | None = Field(
        default=None, description=NUM_UPDATES_DOC, examples=[10000]
    )
    timestamp: Timestamp | None = Field(
        default=None, description=TIMESTAMP_DOC, examples=[1764072000.25]
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
        json_schema_extra=_exactly_one(
            "value", "values", never_with=[("values", "num_updates"), ("values", "timestamp")]
        )
    )

    value: float | None = Field(default=None, description="A finite number.", examples=[5.0])
    num_updates: NumUpdates | None = Field(
        default=None, description=NUM_UPDATES_DOC, examples=[10000]
    )
    timestamp: Timestamp | None = Field(
        default=None, description=TIMESTAMP_DOC, examples=[1764072000.25]
    )
    values: Annotated[list[BatchItem], Field(min_length=1)] | None = Field(
        default=None,
        description="Numbers, or objects with value and num_updates, applied in order.",
        examples=[[1.5, 2.0, {"value": 10.0, "num_updates": 7}]],
    )

    @model_validator(mode="after")
    def _value_or_values(self) -> Self:
        if (self.value is None) == (self.values is None):
            raise ValueError("give either value or values")
        if self.values is not None and (self.num_updates is not None or self.timestamp is not None):
            raise ValueError(
                "num_updates and timestamp go with value; give values as objects to set them"
            )
        return self

    @classmethod
    def from_json(cls, body: bytes) -> "Push":
        """`model_validate_json`, faster for a batch of plain numbers, the common case: a body
        with no object in it is read with its values as list[float], where the discriminated
        union costs a Python call per element, three times as much. What that refuses is read
        again by the model itself, so that errors are the model's."""
        if body.find(b"{", 1) < 0:
            try:
                return _PlainPush.model_validate_json(body)
            except ValidationError:
                pass
        return cls.model_validate_json(body)

    def samples(self) -> Samples:
        if self.values is None:
            assert self.value is not None
            return Samples(
                (self.value,),
                None if self.num_updates is None else (self.num_updates,),
                None if self.timestamp is None else (self.timestamp,),
            )
        values = self.values
        if all(isinstance(item, float) for item in values):
            return Samples(cast(list[float], values))
        steps = [None if isinstance(item, float) else item.num_updates for item in values]
        times = [None if isinstance(item, float) else item.timestamp for item in values]
        return Samples(
            [item if isinstance(item, float) else item.value for item in values],
            None if steps.count(None) == len(steps) else steps,
            None if times.count(None) == len(times) else times,
        )


class _PlainPush(Push):
    """A push with no object among its values (Push.from_json)."""

    # A narrower type than Push's: every such body reads alike with either.
    values: Annotated[list[float], Field(min_length=1, fail_fast=True)] | None = None  # type: ignore[assignment]

    def samples(self) -> Samples:
        return Push.samples(self) if self.values is None else Samples(self.values)


class WindowState(BaseModel):
    """One named window's average."""

    value: float | None = Field(
        description="Its average (for a rate stream: events per second, as of the response).",
        examples=[4.5],
    )
    # Defaults, so that the schema's examples stay valid: the document leaves out their nulls.
    decay: float | None = Field(
        default=None, description="Its decay, if it has one.", examples=[None]
    )
    halflife: float | None = Field(
        default=None, description="Its halflife, if it has one.", examples=[60.0]
    )


class StreamState(BaseModel):
    """A stream's state and configuration, as returned by a push and by GET."""

    name: str = Field(description=f"The stream's name: {NAME_RULE}.", examples=["cpu"])
    value: float | None = Field(
        description="The average: with a decay, the shadow; with a halflife, the time-weighted "
        "mean; for a rate stream, events per second as of the response. Null before the first "
        "value (with a decay and no initial value).",
        examples=[4.555],
    )
    debiased: float | None = Field(
        description="The bias-corrected average: a zero-started shadow divided by 1 minus the "
        "product of the decays used so far (Adam-style), in float64 in every arithmetic; a "
        "halflife mean is its own. Null before the first value, while every decay used was 1, and "
        "for rate streams.",
        examples=[5.0],
    )
    count: int = Field(description="Updates applied so far.", examples=[2])
    last: float | None = Field(description="The last raw value pushed.", examples=[10.0])
    decay_used: float | None = Field(
        description="The decay the last update used (in the TensorFlow arithmetics the float32 "
        "decay TensorFlow used, e.g. 0.9900000095367432); with a halflife, the factor it applied "
        "to older samples' weights (1 for a late sample).",
        examples=[0.99],
    )
    updated_at: float | None = Field(
        description="Redis server time of the last update, in Unix seconds.",
        examples=[1764072000.123456],
    )
    variance: float | None = Field(
        default=None,
        description="The exponentially weighted variance of the values pushed, bias-corrected "
        "as pandas does: with a decay, ewm(alpha=1 - decay, adjust=False).var() (the decay used "
        "at each update, in float64 whatever the arithmetic); with a halflife, "
        "(sum w (x - m)^2 / sum w) * (sum w)^2 / ((sum w)^2 - sum w^2) with the time weights. "
        "Null before two values (or while no weight has moved), and for rate streams.",
        examples=[6.25],
    )
    std: float | None = Field(
        default=None,
        description="The square root of variance: the band around the average.",
        examples=[2.5],
    )
    z: float | None = Field(
        default=None,
        description="The last value's z-score: (last - mean) / std, with the samples' mean and "
        "std before it. Null when it is not a finite number: fewer than two values before it, "
        "or no spread among them.",
        examples=[1.2],
    )
    timestamp: float | None = Field(
        default=None,
        description="The newest sample's time (its timestamp, or the server time it arrived).",
        examples=[1764072000.123456],
    )
    windows: dict[str, WindowState] | None = Field(
        default=None,
        description="The named windows' averages, when the stream has windows.",
        examples=[{"1m": {"value": 4.5, "decay": None, "halflife": 60.0}}],
    )
    config: StreamConfig = Field(description="The stream's configuration.")


class StreamPage(BaseModel):
    """One page of stream names; follow next_cursor until it is null."""

    streams: list[str] = Field(description="Stream names.", examples=[["cpu", "cpu.load"]])
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null when the listing is complete.",
        examples=[None],
    )
    states: list[StreamState] | None = Field(
        default=None,
        description="With `states=true`: the listed streams' states, in the order of `streams` "
        "(a stream deleted since it was listed is left out). Null otherwise.",
        examples=[None],
    )
    time: float | None = Field(
        default=None,
        description="With `states=true`: Redis server time the states were read at, Unix "
        "seconds (a rate stream's value is its rate as of then).",
        examples=[None],
    )


class HistoryEntry(BaseModel):
    """One applied value: its update's id (the stream's count after it), time, raw and smoothed."""

    id: int = Field(description="The stream's count after this value.", examples=[41])
    time: float = Field(
        description="The sample's time, Unix seconds: its timestamp, or the Redis server time "
        "it arrived at when it had none (the state's `timestamp`, not its `updated_at`).",
        examples=[1764072000.5],
    )
    raw: float = Field(description="The value pushed.", examples=[10.0])
    value: float = Field(description="The shadow after this value.", examples=[4.555])
    std: float | None = Field(
        default=None,
        description="The stream's std after this value (null if none).",
        examples=[2.5],
    )
    z: float | None = Field(
        default=None, description="This value's z-score (null if none).", examples=[1.2]
    )


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


# --- bulk pushes ------------------------------------------------------------------------------


class BulkEntry(Push):
    """One entry of a bulk push: a stream, and what to push to it (one `value`, or `values`
    applied in order, as in a push to that stream alone)."""

    stream: str = Field(
        pattern=NAME_PATTERN,
        max_length=NAME_MAX_LENGTH,
        description=f"The stream's name: {NAME_RULE}.",
        examples=["cpu"],
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Like a push's Idempotency-Key header: an entry with a key already used "
        "for this stream is not applied again and gets the original result. 1 to 255 visible "
        "ASCII characters.",
        examples=["7f9c2ba4"],
    )


@dataclass(frozen=True)
class InvalidEntry:
    """A bulk entry that is not valid: its stream when it names one, and pydantic's errors."""

    stream: str | None
    errors: list[dict[str, Any]]


def _entry_or_invalid(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError as error:
        stream = value.get("stream") if isinstance(value, dict) else None
        return InvalidEntry(
            stream if isinstance(stream, str) else None,
            [dict(e) for e in error.errors(include_url=False, include_input=False)],
        )


class _EntryOrInvalid:
    """Validates as a BulkEntry (and is documented as one), but an invalid entry becomes an
    InvalidEntry instead of failing the whole request: the other entries are still pushed."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_wrap_validator_function(
            _entry_or_invalid, handler.generate_schema(BulkEntry)
        )


class BulkPush(Model):
    """Pushes to many streams in one request. Each entry is applied on its own, atomically, as a
    push to its stream alone would be; an invalid or refused entry fails alone."""

    entries: Annotated[
        list[Annotated[BulkEntry | InvalidEntry, _EntryOrInvalid()]], Field(min_length=1)
    ] = Field(
        description="The pushes, applied in no particular order across streams, in order for "
        "entries of the same stream. At most EMA_MAX_BATCH values in all.",
        examples=[[{"stream": "cpu", "value": 1.5}, {"stream": "mem", "values": [2.0, 3.0]}]],
    )


class BulkResult(BaseModel):
    """What happened to one entry of a bulk push."""

    index: int = Field(description="The entry's position in `entries`, from 0.", examples=[0])
    stream: str | None = Field(
        description="The entry's stream; null if the entry names none.", examples=["cpu"]
    )
    status: int = Field(
        description="The status a push of this entry alone would have got: 200 applied (or, "
        "with `replayed`, applied before), 403 the API key may not write this stream, 404 no "
        "such stream (EMA_AUTO_CREATE=false), 409 a late sample refused, 422 invalid, 503 "
        "Redis could not take it (the error says whether it may have been applied).",
        examples=[200],
    )
    replayed: bool = Field(
        default=False,
        description="The idempotency key was used before: the original result, not applied again.",
        examples=[False],
    )
    state: StreamState | None = Field(
        default=None, description="With status 200: the stream's state after this entry."
    )
    error: Problem | None = Field(
        default=None, description="Otherwise: what went wrong, as a problem details object."
    )


class BulkReply(BaseModel):
    """Every entry's result, in request order."""

    applied: int = Field(
        description="Entries applied by this request (idempotent replays not counted).",
        examples=[2],
    )
    failed: int = Field(
        description="Entries with an error: not applied, except that a 503 may have been.",
        examples=[0],
    )
    results: list[BulkResult] = Field(description="One per entry, in request order.")
