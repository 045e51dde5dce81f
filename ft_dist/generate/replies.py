"""Strict parsing of a reply: a JSON list of objects with exactly the style's two string fields."""

from __future__ import annotations

import json
from typing import List, Optional, Tuple

from ft_dist.generate.schema import STYLE_FIELDS

Pair = Tuple[str, str]


def parse_reply(text: str, style: str) -> Optional[List[Pair]]:
    """The pairs of a well-formed reply, or None when it is malformed (not JSON, not a list of objects with the two
    string fields). A list inside a ``` fence is accepted; any other text around it is not."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    first, second = STYLE_FIELDS[style]
    if not isinstance(value, list) or not value:
        return None
    pairs: List[Pair] = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {first, second}:
            return None
        if not isinstance(item[first], str) or not isinstance(item[second], str):
            return None
        pairs.append((item[first], item[second]))
    return pairs
