"""JSON from outside the process (files anyone may have written, request bodies), parsed
within bounds.

Python's `json` recurses once per nesting level (100,000 brackets end in a RecursionError)
and refuses integers of more than 4,300 digits with a ValueError that names no file: both
reached users as tracebacks or 500s. `parse_json` checks the nesting first, on the text
with its strings blanked out, and turns every refusal into one ValueError naming the source.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import numpy as np

MAX_JSON_DEPTH = 64  # no file or body of this project nests deeper than ~6
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


class UntrustedJSONError(ValueError):
    """JSON that cannot be used; the message (one line) names the source and why."""


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text` (strings do not count)."""
    skeleton = np.frombuffer(_STRING.sub('""', text).encode("utf-8", "replace"), np.uint8)
    if skeleton.size == 0:
        return 0
    steps = np.isin(skeleton, _OPEN).astype(np.int64) - np.isin(skeleton, _CLOSE)
    return int(np.cumsum(steps).max(initial=0))


def parse_json(data: str | bytes, source: str, max_depth: int = MAX_JSON_DEPTH, **kwargs: Any) -> Any:
    """`json.loads(data, **kwargs)` for data from outside: UTF-8, nested at most `max_depth`
    deep, numbers Python converts; else UntrustedJSONError naming `source`."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UntrustedJSONError(f"{source}: not UTF-8 (byte {e.start})") from None
    depth = json_depth(data)
    if depth > max_depth:
        raise UntrustedJSONError(f"{source}: JSON nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(data, **kwargs)
    except json.JSONDecodeError as e:
        raise UntrustedJSONError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more digits than Python converts
        raise UntrustedJSONError(f"{source}: {value_error_reason(e)}") from None


def value_error_reason(e: Exception) -> str:
    """A parser's ValueError as one line for a user (Python's own advice for huge integers left out)."""
    if "integer string conversion" in str(e):
        return f"a number of more than {sys.get_int_max_str_digits()} digits"
    return " ".join(str(e).split())[:200]
