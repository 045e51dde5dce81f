"""How the config schemas declare their fields, and the checks and identities derived from those declarations.

A field says on itself what its values may be (`choices` from a Literal type, `positive`, `non_negative`) and
whether it identifies what a run computes (`identity=False` for labels, cadences and where or how fast things
run). From that, by one rule each:
- `check_fields` validates a config against its schema, naming the dotted key, so a renamed or new field keeps
  its checks (nothing is listed by key elsewhere);
- `identity` is the part of a config that determines a result: the data cache key and the resume fingerprint.

Literal types are the choices; the schema fields themselves are typed `str` because OmegaConf's structured configs
do not accept Literal annotations.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Iterable, Tuple, cast

from ft_dist.errors import ConfigError

_NO_DEFAULT: Any = object()


def setting(
    default: Any = _NO_DEFAULT,
    *,
    factory: Any = None,
    choices: Any = None,
    positive: bool = False,
    non_negative: bool = False,
    identity: bool = True,
) -> Any:
    """A dataclass field with its declared constraints (`choices`: a Literal type or a tuple of values)."""
    metadata: Dict[str, Any] = {"identity": identity}
    if choices is not None:
        metadata["choices"] = tuple(typing.get_args(choices)) or tuple(choices)
    if positive:
        metadata["minimum"] = (">", 0)
    if non_negative:
        metadata["minimum"] = (">=", 0)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def choices_of(schema: type, name: str) -> Tuple[Any, ...]:
    """The declared choices of one field (for messages and callers that branch on them)."""
    return next(f.metadata["choices"] for f in dataclasses.fields(schema) if f.name == name)


def _nested(schema: type) -> Dict[str, type]:
    """Fields whose type is itself a schema dataclass (resolved from the string annotations)."""
    hints = typing.get_type_hints(schema)
    # Type hints are classes, never dataclass instances: is_dataclass narrows to both.
    return {name: cast(type, t) for name, t in hints.items() if dataclasses.is_dataclass(t)}


def check_fields(schema: type, node: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first value that breaks its field's declaration, in `node` and its sub-configs."""
    nested = _nested(schema)
    for f in dataclasses.fields(schema):
        value = getattr(node, f.name, None)
        key = prefix + f.name
        if f.name in nested and value is not None:
            check_fields(nested[f.name], value, key + ".")
            continue
        if value is None:
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        op, bound = f.metadata.get("minimum", (None, None))
        if op == ">" and not value > bound:
            raise ConfigError(key, f"expected a value > {bound}, got {value!r}")
        if op == ">=" and value < bound:
            raise ConfigError(key, f"expected a value >= {bound}, got {value!r}")


def identity(schema: type, values: Any, skip: Iterable[str] = ()) -> Dict[str, Any]:
    """The fields of a config that identify a result: every field of `schema` not declared `identity=False`, minus
    `skip`. `values` is the config (a node read by attribute) or the same as a plain dict."""
    get = values.get if isinstance(values, dict) else (lambda k: getattr(values, k))
    skipped = set(skip)
    return {
        f.name: get(f.name)
        for f in dataclasses.fields(schema)
        if f.metadata.get("identity", True) and f.name not in skipped
    }
