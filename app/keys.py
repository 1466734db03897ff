"""Redis key layout: `<prefix>{<name>}` for a stream's hash.

The name sits in braces so that it is the Redis Cluster hash tag: every key of one stream
(later side keys such as `<prefix>{<name>}:history`) lands in one hash slot, which a Lua
script touching several of them requires. Names therefore may not contain braces.
"""

import re
from typing import Final

NAME_PATTERN: Final = r"^[A-Za-z0-9_.:\-]{1,200}$"
NAME_MAX_LENGTH: Final = 200
NAME_RULE: Final = "1 to 200 characters from A-Z a-z 0-9 _ . : -"

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\^])")


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class KeyLayout:
    """Maps stream names to Redis keys and back, under one configurable prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def stream(self, name: str) -> str:
        return f"{self.prefix}{{{name}}}"

    def scan_pattern(self, name_prefix: str) -> str:
        """A SCAN MATCH pattern for the streams whose name starts with `name_prefix`.

        The closing brace anchors the match to stream hashes, never their side keys.
        """
        return f"{_glob_escape(self.prefix)}{{{_glob_escape(name_prefix)}*}}"

    def name_of(self, key: str) -> str:
        return key[len(self.prefix) + 1 : -1]
