"""A stream's Redis hash fields, to and from the API's models. The field names are documented
in app/lua/push.lua, the script that writes them."""

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from pydantic_core import to_json

from app.models import HistoryEntry, StreamConfig, StreamState, Window, WindowState


def number(x: float) -> str:
    """The shortest decimal that reads back as exactly `x` (Lua's tonumber is strtod)."""
    return repr(x)


def numbers(xs: Sequence[float]) -> list[str]:
    """`[number(x) for x in xs]` in digits, in a third of its time for many: pydantic-core's
    float formatting (ryu) also finds the shortest digits that read back exactly, written in
    forms strtod reads ("1e+16"; "1e-7" and "0.000027" where repr has "1e-07" and "2.7e-05").
    Finite numbers only."""
    return to_json(xs).decode()[1:-1].split(",") if xs else []


def float32(x: float) -> float:
    """The float32 nearest to `x` (ties to even), as a float; OverflowError beyond its range."""
    value: float = struct.unpack("f", struct.pack("f", x))[0]
    return value


ARITHMETIC_FIELD = {"tensorflow-float64": "64", "tensorflow-float32": "32"}
ARITHMETIC_NAME = {field: name for name, field in ARITHMETIC_FIELD.items()}


def config_fields(config: StreamConfig) -> dict[str, str]:
    """The hash of a new stream with this configuration, before any value."""
    # a=0 and h=0 are the defaults, left out: every byte counts at a million streams
    fields = {"n": "0"}
    if config.history:
        fields["h"] = str(config.history)
    if config.decay is not None:
        fields |= {"d": number(config.decay), "b": "0", "p": "1"}
        if config.auto_num_updates:
            fields["a"] = "1"
        if config.initial is not None:
            fields["i"] = fields["v"] = number(config.initial)
            if config.arithmetic == "tensorflow-float32":
                # the shadow starts as the variable holds its initial value
                fields["v"] = number(float32(config.initial))
        if config.arithmetic != "float64":
            fields["A"] = ARITHMETIC_FIELD[config.arithmetic]
    else:
        assert config.halflife is not None
        fields["H"] = number(config.halflife)
    if config.kind == "rate":
        fields["k"] = "r"
    if config.late == "reject":
        fields["L"] = "r"
    if config.ttl is not None:
        fields["x"] = str(config.ttl)
    if config.windows:
        fields["W"] = ",".join(
            f"{w.name}:d{number(w.decay)}"
            if w.decay is not None
            else f"{w.name}:h{number(w.halflife or 0)}"
            for w in config.windows
        )
    return fields


def encode_fields(fields: Mapping[str, str]) -> str:
    """`field=value;field=value`, as push.lua takes a new stream's fields."""
    return ";".join(f"{field}={value}" for field, value in fields.items())


def decode_fields(text: str) -> dict[str, str]:
    """The inverse of encode_fields, and push.lua's replies and announcements, written so with
    the packed state `s` last (binary: everything after the first `;s=`)."""
    head, found, state = text.partition(";s=")
    fields = dict(part.split("=", 1) for part in head.split(";") if part)
    if found:
        fields["s"] = state
    return fields


# The configuration fields (push.lua's header): what a stream's layout depends on.
_CONFIG_FIELDS = "dHiahkLxWA"


@dataclass(frozen=True)
class _Layout:
    """What the configuration fields say about reading a stream's hash, worked out once per
    configuration (_layout): its StreamConfig fields, shared by every state read with it (read
    only), and the names of its packed state's numbers, in push.lua's order."""

    config: dict[str, Any]
    decay: float | None
    rate: bool
    windows: tuple[tuple[str, float | None], ...]  # (field suffix, halflife), the main value first
    packed: tuple[str, ...]
    # Per window, the main value first: the names of the numbers its average is read from (v
    # and "", or S and Z, with its suffix), and its halflife; named once here rather than on
    # every state.
    averages: tuple[tuple[str, str, float | None], ...]
    config_json: bytes  # config as state_json writes it: the same for every state read with it


@lru_cache(maxsize=1024)
def _layout(config_values: tuple[str | None, ...]) -> _Layout:
    fields = {k: v for k, v in zip(_CONFIG_FIELDS, config_values, strict=True) if v is not None}
    config = _config(fields)
    named = ((f":{w['name']}", w["halflife"]) for w in config["windows"] or ())
    windows = (("", config["halflife"]), *named)
    decay, rate = config["decay"], config["kind"] == "rate"
    packed = ["b", "p"] if decay is not None else []
    if not rate:
        packed += ["q", "w", "z"]
    for suffix, halflife in windows:
        packed += ["v" + suffix] if halflife is None else ["S" + suffix, "Z" + suffix]
    packed += ["t", "l", "u", "E", "m"]
    averages = tuple(
        ("v" + suffix, "", None) if halflife is None else ("S" + suffix, "Z" + suffix, halflife)
        for suffix, halflife in windows
    )
    config_json = to_json(config, inf_nan_mode="null")
    return _Layout(config, decay, rate, windows, tuple(packed), averages, config_json)


def state_numbers(fields: Mapping[str, str | bytes]) -> dict[str, float]:
    """The numbers of a stream's state by field name (see _numbers)."""
    return _numbers(fields, _layout_of(fields))


def _layout_of(fields: Mapping[str, str | bytes]) -> _Layout:
    # map, not a generator: a third of the time, on every state rendered
    return _layout(tuple(map(fields.get, _CONFIG_FIELDS)))


def _numbers(fields: Mapping[str, str | bytes], layout: _Layout) -> dict[str, float]:
    """The stream's state as numbers by field name (push.lua's header): unpacked from `s` (in
    chunks s, s1, ...; a client reads it as text decoded with errors="surrogateescape", which
    gives back its bytes), or read from the text fields of a stream not pushed to since they
    were its layout. A number left out is absent, or NaN for a packed z."""
    packed = fields.get("s")
    if packed is None:
        return _text_numbers(fields, layout)
    data = _bytes(packed)
    for name in _CHUNKS:
        chunk = fields.get(name)
        if chunk is None:
            break
        data += _bytes(chunk)
    return _unpacked(data, layout)


def _unpacked(data: bytes, layout: _Layout) -> dict[str, float]:
    """The packed state's numbers by field name."""
    numbers = dict(zip(layout.packed, _doubles(len(data) // 8)(data), strict=False))
    # left out when they equal their default (and every one after them does)
    numbers.setdefault("u", 1.0 if layout.decay is None else layout.decay)
    numbers.setdefault("E", numbers["t"])
    return numbers


# The names of the packed state's chunks after `s` (push.lua writes at most 64 bytes a chunk).
_CHUNKS = tuple(f"s{index}" for index in range(1, 64))


def _bytes(chunk: str | bytes) -> bytes:
    return chunk if isinstance(chunk, bytes) else chunk.encode("utf-8", "surrogateescape")


@cache
def _doubles(count: int) -> Callable[[bytes], tuple[float, ...]]:
    """Unpacks `count` little-endian doubles: the format parsed once per count."""
    return struct.Struct(f"<{count}d").unpack


def _text_numbers(fields: Mapping[str, str | bytes], layout: _Layout) -> dict[str, float]:
    text = {k: v for k, v in fields.items() if isinstance(v, str) and v}
    if "V" in text:  # the spread as V `q,w` and M `m,z`, or as q w m z
        text["q"], _, text["w"] = text["V"].partition(",")
        text["z"] = text.get("M", "").partition(",")[2]
    names = ["l", "t", "u", "E", "b", "p", "q", "w", "z"]
    names += [f + suffix for suffix, _ in layout.windows for f in ("v", "S", "Z")]
    return {name: float(text[name]) for name in names if text.get(name)}


def history_entry(entry_id: str, fields: Mapping[str, str]) -> HistoryEntry:
    """A history entry: its fields packed in `p` (see push.lua's header), or as the decimal
    text fields of an entry written before (t, l, v, and s and z when defined)."""
    if "p" in fields:
        data = fields["p"].encode("utf-8", "surrogateescape")
        t, raw, value, *spread = struct.unpack(f"<{len(data) // 8}d", data)
        std, z = [*spread, math.nan, math.nan][:2]
    else:
        t, raw, value = float(fields["t"]), float(fields["l"]), float(fields["v"])
        std, z = float(fields.get("s", "nan")), float(fields.get("z", "nan"))
    return HistoryEntry(
        id=int(entry_id.split("-")[0]),
        time=t,
        raw=raw,
        value=value,
        std=None if math.isnan(std) else std,
        z=None if math.isnan(z) else z,
    )


def _config(fields: Mapping[str, str]) -> dict[str, Any]:
    """The configuration, as StreamConfig's fields in their order (plain data: see state_data)."""
    windows = []
    for spec in filter(None, fields.get("W", "").split(",")):
        name, _, param = spec.partition(":")
        kind, value = param[0], float(param[1:])
        windows.append(
            {
                "name": name,
                "decay": value if kind == "d" else None,
                "halflife": value if kind == "h" else None,
            }
        )
    return {
        "decay": _float(fields.get("d")),
        "halflife": _float(fields.get("H")),
        "kind": "rate" if fields.get("k") == "r" else "mean",
        "initial": _float(fields.get("i")),
        "auto_num_updates": fields.get("a") == "1",
        "windows": windows or None,
        "arithmetic": ARITHMETIC_NAME.get(fields.get("A", ""), "float64"),
        "late": "reject" if fields.get("L") == "r" else "merge",
        "ttl": int(fields["x"]) if "x" in fields else None,
        "history": int(fields.get("h", 0)),
    }


def _average(
    numbers: Mapping[str, float],
    average: tuple[str, str, float | None],
    rate: bool,
    now: float,
) -> float | None:
    """A window's value (`average`: one of _Layout.averages): its shadow, its weighted mean, or
    its rate decayed to `now`."""
    key, weight_key, halflife = average
    if halflife is None:
        return numbers.get(key)
    total, weight = numbers.get(key), numbers.get(weight_key)
    if total is None or weight is None or weight == 0:
        return None
    if rate:
        # As of `now`, or of the newest sample if it is ahead of the clock (within the skew
        # allowed): a rate never grows by itself, and 2 ** positive could overflow.
        newest = numbers["E"]
        return total * math.log(2) / halflife * 2 ** (min(newest - now, 0.0) / halflife)
    return total / weight


def state_data(
    name: str, fields: Mapping[str, str | bytes], now: float | None = None
) -> dict[str, Any]:
    """The state of a stream from its hash, as StreamState's fields in their order, in plain
    dicts and lists. `now` (Redis server time) is when a rate stream's rate is reported for; by
    default, its last update's time.

    Plain data because the hot paths (a push's reply, a GET, an event) serialise it straight to
    JSON (state_json): building the pydantic models costs more than the rest of a push. Its
    `config` is shared by every state of that configuration: read it, never change it."""
    data, layout = _state(name, fields, now)
    data["config"] = layout.config
    return data


def _state(
    name: str, fields: Mapping[str, str | bytes], now: float | None
) -> tuple[dict[str, Any], _Layout]:
    """state_data without its last field, `config`, and the layout that gives it."""
    layout = _layout_of(fields)
    return _state_of(name, layout, _numbers(fields, layout), int(fields["n"]), now), layout


def _state_of(
    name: str, layout: _Layout, numbers: Mapping[str, float], count: int, now: float | None
) -> dict[str, Any]:
    """_state, from the stream's layout, numbers and count."""
    rate = layout.rate
    updated_at = numbers.get("t")
    at = now if now is not None else updated_at or 0.0
    value = _average(numbers, layout.averages[0], rate, at)
    if layout.decay is not None:
        correction = 1.0 - numbers["p"]
        debiased = numbers["b"] / correction if count and correction else None
    else:
        debiased = None if rate else value
    variance = None
    q, w = numbers.get("q"), numbers.get("w")
    if not rate and q is not None and w is not None and w > 0:
        # as push.lua computes it (the same float64 operations)
        variance = q / w if layout.decay is not None else q * numbers["Z"] / w
    z = numbers.get("z")
    windows = None
    if len(layout.averages) > 1:
        windows = {
            window["name"]: {
                "value": _average(numbers, average, rate, at),
                "decay": window["decay"],
                "halflife": window["halflife"],
            }
            for average, window in zip(layout.averages[1:], layout.config["windows"], strict=True)
        }
    data = {
        "name": name,
        "value": value,
        "debiased": debiased,
        "count": count,
        "last": numbers.get("l"),
        "decay_used": numbers.get("u"),
        "updated_at": updated_at,
        "variance": variance,
        # A variance rounded below zero (a late sample's Welford step) has no deviation: as
        # push.lua, whose square root of it is NaN, written null.
        "std": None if variance is None or variance < 0 else math.sqrt(variance),
        "z": None if z is None or math.isnan(z) else z,
        "timestamp": numbers.get("E"),
        "windows": windows,
    }
    return data


def state_from_fields(
    name: str, fields: Mapping[str, str], now: float | None = None
) -> StreamState:
    """The state of a stream from its hash, as a model (see state_data)."""
    data = state_data(name, fields, now)
    config = data["config"]
    windows = config["windows"]
    data["config"] = StreamConfig.model_construct(
        **{**config, "windows": windows and [Window.model_construct(**w) for w in windows]}
    )
    if data["windows"] is not None:
        data["windows"] = {
            label: WindowState.model_construct(**window)
            for label, window in data["windows"].items()
        }
    return StreamState.model_construct(**data)


def state_json(name: str, fields: Mapping[str, str], now: float | None = None) -> bytes:
    """`state_from_fields(name, fields, now).model_dump_json()`, byte for byte, without building
    the models: pydantic-core's own serializer, on plain data. The configuration, the last
    field, is spliced in as serialised once per configuration (_Layout.config_json): for three
    windows, serialising it again made up a third of the serialiser's time."""
    data, layout = _state(name, fields, now)
    return _json(data, layout)


def reply_json(name: str, text: str) -> tuple[int, bytes]:
    """The count and state_json of the state in a push's reply text or an announcement, read
    straight from the text (see push.lua's header): the configuration fields come first, and
    as one string they name the layout (_reply_layout); then the count, then the packed state.
    Text without a packed state (a new stream's fields, which a reset announces) is read as
    fields."""
    head, packed_state, packed = text.partition(";s=")
    if not packed_state:
        fields = decode_fields(text)
        return int(fields["n"]), state_json(name, fields)
    config, _, count_text = head.rpartition("n=")
    layout = _reply_layout(config)
    count = int(count_text)
    numbers = _unpacked(packed.encode("utf-8", "surrogateescape"), layout)
    return count, _json(_state_of(name, layout, numbers, count, None), layout)


@lru_cache(maxsize=1024)
def _reply_layout(config: str) -> _Layout:
    return _layout_of(decode_fields(config))


def _json(data: dict[str, Any], layout: _Layout) -> bytes:
    return b'%s,"config":%s}' % (to_json(data, inf_nan_mode="null")[:-1], layout.config_json)


class RecentReplies:
    """The states this process just rendered for push replies, by stream name and reply text
    (what the push announced; streams in the same state have the same text): the event hub
    takes an update's count and JSON from here rather than render the same state again. Kept
    only while the hub has subscribers (`wanted`), and at most `limit`: one the hub does not
    hear soon goes with the oldest (and is rendered again if it ever comes)."""

    def __init__(self, limit: int = 1024) -> None:
        self._limit = limit
        self._wanted = False
        self._states: dict[tuple[str, str], tuple[int, bytes]] = {}

    @property
    def wanted(self) -> bool:
        return self._wanted

    @wanted.setter
    def wanted(self, wanted: bool) -> None:
        self._wanted = wanted
        if not wanted:
            self._states.clear()

    def keep(self, name: str, text: str, count: int, json: bytes) -> None:
        if self._wanted:
            states = self._states
            states[name, text] = (count, json)
            if len(states) > self._limit:
                del states[next(iter(states))]

    def take(self, name: str, text: str) -> tuple[int, bytes] | None:
        return self._states.pop((name, text), None)

    def __len__(self) -> int:
        return len(self._states)


def _float(text: str | None) -> float | None:
    return None if text is None else float(text)
