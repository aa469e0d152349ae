"""JSON from outside, checked for what ``json.loads`` lets through and nothing downstream can carry.

Three things parse but break later, far from the request that brought them:

- **nesting**: Python's encoder recurses, so a broadcast whose ``data`` is
  nested ~1,000 deep parses, then fails to encode several frames further down
  (after it was recorded in the history, where it would break every replay);
- **unpaired surrogates** (``"\\ud800"``): valid JSON escapes that are not
  characters, so no UTF-8 frame (and no Postgres text) can hold them;
- **numbers too large for a float** (``1e400``): ``json.loads`` makes them
  ``inf`` (the literals ``NaN`` and ``Infinity`` are refused where JSON is
  parsed), which goes out as ``Infinity``, and a browser's ``JSON.parse``
  refuses the whole frame.

``problem(value)`` walks a parsed document once, iteratively, and names the
first of them; callers answer it with their own stable error code.

And JSON going out: ``compact(value)`` is the text every frame and stored
broadcast is written in (no spaces, UTF-8 left as is).
"""

from __future__ import annotations

import json
import math

MAX_DEPTH = 64  # objects and arrays inside one another; clinic events need a handful

# One encoder, built once: json.dumps with any option builds a new JSONEncoder on every
# call, half the cost of encoding a CONNECTED or SUBSCRIBED frame.
compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


TOO_LARGE = "it contains a number too large to represent (such as 1e400)"


def problem(value: object, max_depth: int = MAX_DEPTH) -> str | None:
    """Why ``value`` (as ``json.loads`` returns it) cannot be passed on, or None if it can."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not encodable(item):
                return "it contains text that is not valid Unicode (an unpaired surrogate escape such as \\ud800)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return TOO_LARGE
        elif isinstance(item, int):
            if item.bit_length() > 1024:  # past the largest double: a browser reads Infinity
                return TOO_LARGE
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                return f"it is nested more than {max_depth} levels deep"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


def encodable(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (no unpaired surrogate); ASCII answers at once."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
