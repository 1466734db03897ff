"""Redis key layout: `<prefix>{<name>}` for a stream's hash, `<prefix>{<name>}:<suffix>` for its
side keys (history, idempotency records) and its Pub/Sub channel.

The name sits in braces so that it is the Redis Cluster hash tag: every key of one stream lands
in one hash slot, which a Lua script touching several of them requires. Names therefore may not
contain braces.
"""

import re
from typing import Final

# `.` and `..` are left out: HTTP clients resolve them as dot segments of the URL, so such a
# stream could be created by one client and never reached by another. Spelled without a
# lookahead, which the JSON Schema pattern (and pydantic's Rust regex engine) cannot have: a name
# starts with a non-dot, or with one dot and a non-dot, or with two dots and anything.
NAME_PATTERN: Final = (
    r"^(?:[A-Za-z0-9_:\-][A-Za-z0-9_.:\-]{0,199}"
    r"|\.[A-Za-z0-9_:\-][A-Za-z0-9_.:\-]{0,198}"
    r"|\.\.[A-Za-z0-9_.:\-]{1,198})$"
)
NAME_MAX_LENGTH: Final = 200
NAME_RULE: Final = "1 to 200 characters from A-Z a-z 0-9 _ . : -, but not `.` or `..`"

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\^])")


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class KeyLayout:
    """Maps stream names to Redis keys and back, under one configurable prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def stream(self, name: str) -> str:
        return f"{self.prefix}{{{name}}}"

    def history(self, name: str) -> str:
        return f"{self.prefix}{{{name}}}:history"

    def idempotency(self, name: str, idempotency_key: str) -> str:
        return f"{self.prefix}{{{name}}}:idem:{idempotency_key}"

    def channel(self, name: str) -> str:
        """The Pub/Sub channel announcing the stream's updates."""
        return f"{self.prefix}{{{name}}}:events"

    def channel_pattern(self, name_prefix: str) -> str:
        """A PSUBSCRIBE pattern for the channels of the streams starting with `name_prefix`."""
        return f"{_glob_escape(self.prefix)}{{{_glob_escape(name_prefix)}*}}:events"

    def name_of_channel(self, channel: str) -> str:
        return channel[len(self.prefix) + 1 : -len("}:events")]

    def scan_pattern(self, name_prefix: str) -> str:
        """A SCAN MATCH pattern for the streams whose name starts with `name_prefix`.

        The closing brace anchors the match to stream hashes, never their side keys.
        """
        return f"{_glob_escape(self.prefix)}{{{_glob_escape(name_prefix)}*}}"

    def name_of(self, key: str) -> str:
        return key[len(self.prefix) + 1 : -1]
