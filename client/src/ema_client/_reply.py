"""The base of the client's reply models: frozen dataclasses read from the service's JSON, each
declared field's type checked, and fields a newer service adds kept, so that this package needs
nothing beyond httpx."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Self, Union, dataclass_transform


class InvalidReply(ValueError):
    """A reply that does not have the shape its model declares."""


@dataclass_transform(kw_only_default=True, frozen_default=True)
@dataclasses.dataclass(frozen=True, kw_only=True)
class Reply:
    """Subclasses are frozen, keyword-only dataclasses. `parse()` builds one from decoded JSON;
    fields the model does not declare are kept in `extra` and read as attributes too;
    `to_dict()` gives the JSON form back, those fields included."""

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True, kw_only=True)(cls)

    @classmethod
    def parse(cls, data: Any) -> Self:
        """The model from decoded JSON; raises InvalidReply when a field is missing or of
        another type."""
        if not isinstance(data, dict):
            raise InvalidReply(f"{cls.__name__}: expected an object, got {_kind(data)}")
        values: dict[str, Any] = {}
        for name, (hint, required) in _fields(cls).items():
            if name in data:
                values[name] = _convert(hint, data[name], f"{cls.__name__}.{name}")
            elif required:
                raise InvalidReply(f"{cls.__name__}.{name}: missing")
        extra = {key: value for key, value in data.items() if key not in _fields(cls)}
        return cls(**values, extra=extra)

    @classmethod
    def parse_json(cls, text: str | bytes) -> Self:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise InvalidReply(f"not JSON: {error}") from None
        return cls.parse(data)

    def to_dict(self) -> dict[str, Any]:
        """The reply as JSON-ready data, with the fields this client does not know."""
        data = {name: _plain(getattr(self, name)) for name in _fields(type(self))}
        return data | self.extra

    if not typing.TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any:
            # Only for names that are not fields: a newer service's, kept in `extra`.
            try:
                return self.__dict__["extra"][name]
            except KeyError:
                raise AttributeError(
                    f"{type(self).__name__!r} object has no attribute {name!r}"
                ) from None


_FIELDS: dict[type, dict[str, tuple[Any, bool]]] = {}


def _fields(cls: type[Reply]) -> dict[str, tuple[Any, bool]]:
    """Each declared field (but `extra`): its resolved type, and whether it is required."""
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls)
        _FIELDS[cls] = {
            item.name: (
                hints[item.name],
                item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING,
            )
            for item in dataclasses.fields(cls)
            if item.name != "extra"
        }
    return _FIELDS[cls]


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        failures = []
        for option in arguments:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except InvalidReply as error:
                failures.append(error)
        raise failures[0]
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if origin is list and isinstance(value, list):
        return [_convert(arguments[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {key: _convert(arguments[1], item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(hint, type) and issubclass(hint, Reply):
        return hint.parse(value)
    expected = getattr(hint, "__name__", str(hint))
    raise InvalidReply(f"{where}: expected {expected}, got {_kind(value)}")


def _plain(value: Any) -> Any:
    if isinstance(value, Reply):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
