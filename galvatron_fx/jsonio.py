"""Reading the project's JSON files (plans, cluster profiles, layer timings) with errors that
name the file and the field path (`plan.json: strategies[2].tp: expected an integer, got
"two"`), so a hand-edited or truncated file is fixed in one look.

`fields_of(cls, data, where)` checks a JSON object against a dataclass's annotations (types,
unknown and missing fields, nested dataclasses and lists of them) and returns the keyword
arguments to build it; the dataclass's own `__post_init__` then checks values. Pure: no
torch. Files are JSON only, never pickle: loading a plan or profile runs no code.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

__all__ = ["fields_of", "read_json"]


def read_json(path: str | Path, *, error: type[Exception] = ValueError) -> Any:
    """The parsed file; a missing file or bad JSON raises `error` naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(
            f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from None


def fields_of(
    cls: type, data: Any, source: str, path: str = "", *, error: type[Exception] = ValueError
) -> dict[str, Any]:
    """`data` checked against dataclass `cls`: keyword arguments for `cls(**...)`.

    Messages read `{source}: {path}.field: what is wrong`; `path` is where `data` sits in the
    file (`pipeline`, `strategies[2]`). Dataclasses nested in fields (or in lists and
    mappings of them) are built too, so the caller gets ready values."""
    where = f"{source}: {path}" if path else source
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected an object {{...}}, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"{where}: unknown field(s) {unknown} (known: {sorted(known)})")
    missing = [
        name
        for name, f in known.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise error(f"{where}: missing field(s) {missing}")
    return {
        name: _value(hints[name], value, source, _join(path, name), error)
        for name, value in data.items()
    }


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _value(kind: Any, value: Any, source: str, path: str, error: type[Exception]) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    where = f"{source}: {path}"
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        return _value(kind, value, source, path, error)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        return kind(**fields_of(kind, value, source, path, error=error))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise error(f"{where}: expected a list [...], got {_show(value)}")
        inner = args[0] if args else Any
        return tuple(_value(inner, v, source, f"{path}[{i}]", error) for i, v in enumerate(value))
    if origin in (Mapping, dict) or kind in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise error(f"{where}: expected an object {{...}}, got {_show(value)}")
        inner = args[1] if len(args) == 2 else Any
        return {k: _value(inner, v, source, f"{path}[{k!r}]", error) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise error(f"{where}: expected one of {list(args)}, got {_show(value)}")
        return value
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        allowed = [m.value for m in kind]
        if value not in allowed:
            raise error(f"{where}: expected one of {allowed}, got {_show(value)}")
        return kind(value)
    return _scalar(kind, value, where, error)


_SCALARS: dict[type, tuple[str, tuple[type, ...]]] = {
    bool: ("true or false", (bool,)),
    int: ("an integer", (int,)),
    float: ("a number", (int, float)),
    str: ("a string", (str,)),
}


def _scalar(kind: Any, value: Any, where: str, error: type[Exception]) -> Any:
    if kind not in _SCALARS:
        return value
    name, accepted = _SCALARS[kind]
    # JSON's true/false are Python bools, and bool is an int: a flag is not a count
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
        raise error(f"{where}: expected {name}, got {_show(value)}")
    return float(cast(float, value)) if kind is float else value


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object {...}"
    if isinstance(value, list | tuple):
        return "a list [...]"
    text = json.dumps(value, default=repr)
    return text if len(text) < 40 else text[:37] + "..."
