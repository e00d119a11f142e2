"""Typed-field machinery for the config dataclasses: docstrings, type checks, ranges, TOML values.

Stdlib only. A section is a dataclass whose fields carry a type hint (`int`, `float | str`,
`Literal[...]`, `list[str]`, `X | None`, a nested section), an optional range in the field
metadata (`ge`, `gt`, `le`, `lt`) and a one-line docstring directly under the field.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import difflib
import functools
import inspect
import json
import re
import textwrap
import tomllib
import types
import typing
from typing import Any, Literal, Union

from rlx.errors import UserError

# TOML has no null: these strings switch an Optional field off (compared case-insensitively).
NONE_WORDS = frozenset({"none", "null", ""})
_RANGE_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
              "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}  # fmt: skip
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(UserError):
    """A config mistake: unknown key or section, wrong type, out-of-range value, bad file.

    `key` is the dotted path of the offending setting (`loss.clip_ratio_c`); the loader uses it to
    say where the value came from (the TOML file or the command line).
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


def ranged(default: Any, **bounds: float) -> Any:
    """A field with a default and a range: `ranged(1, ge=1)` means an integer >= 1, default 1."""
    assert set(bounds) <= set(_RANGE_OPS), bounds
    return dataclasses.field(default=default, metadata=bounds)


def check_import_path(value: str, key: str, builtins: tuple[str, ...], what: str) -> None:
    """Accept a built-in registry name or a `pkg.module:attr` import path (format only, not importability)."""
    if value in builtins or _IMPORT_PATH.match(value):
        return
    close = difflib.get_close_matches(value, builtins, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"unknown {what} {value!r}{hint}; use one of {', '.join(builtins)} or an import path 'pkg.module:Name'", key
    )


# ---------------------------------------------------------------------------------------------
# Introspection


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a dataclass (the modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right under each annotated field, whitespace-folded."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app, REPL): docs are a nicety, not a contract
        return {}
    class_def = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    body = class_def.body
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):  # fmt: skip
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else None


def describe_type(tp: Any) -> str:
    """Human name of a field type, as shown in errors and `--help-config`."""
    members = _union_args(tp)
    if members is not None:
        return " or ".join("none" if m is type(None) else describe_type(m) for m in members)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is list:
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "table"
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def describe_range(metadata: typing.Mapping[str, Any]) -> str:
    return ", ".join(f"{_RANGE_OPS[op][0]} {bound}" for op, bound in metadata.items() if op in _RANGE_OPS)


def _got(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return f"{names.get(type(value), type(value).__name__)} {value!r}"


# ---------------------------------------------------------------------------------------------
# Checking values


@dataclasses.dataclass(frozen=True)
class CliValue:
    """A command-line override: its raw text and the text read as a TOML value.

    Both readings are tried against the field type, so `--job.name=123` is the string "123" and
    `--rollout_correction.rollout_is_threshold=0.5_2` stays the string "0.5_2" (TOML would read
    0.52: underscores are digit separators there).
    """

    text: str
    parsed: Any


def coerce(value: Any, tp: Any, key: str, metadata: typing.Mapping[str, Any] = {}) -> Any:
    """Check `value` against field type `tp` and range `metadata`; return it normalized.

    Normalizing means: ints become floats for float fields, "none" becomes None for Optional
    fields, a lone string becomes a one-element list for list fields. Raises ConfigError.
    """
    if isinstance(value, CliValue):
        # TOML reads "0.5_2" as the number 0.52; a threshold meant as the "lo_hi" string must win.
        # Only then is the raw text tried first: a list or path containing "_" parses as itself.
        text_first = "_" in value.text and isinstance(value.parsed, (int, float)) and not isinstance(value.parsed, bool)
        first, second = (value.text, value.parsed) if text_first else (value.parsed, value.text)
        try:
            return coerce(first, tp, key, metadata)
        except ConfigError:
            if second == first:
                raise
            try:
                return coerce(second, tp, key, metadata)
            except ConfigError:
                pass
            raise
    value = _coerce_type(value, tp, key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for op, bound in metadata.items():
            if op in _RANGE_OPS and not _RANGE_OPS[op][1](value, bound):
                raise ConfigError(f"must be {_RANGE_OPS[op][0]} {bound}, got {value!r}", key)
    return value


def _coerce_type(value: Any, tp: Any, key: str) -> Any:
    members = _union_args(tp)
    if members is not None:
        switched_off = value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)
        if type(None) in members and switched_off:
            return None
        candidates = [m for m in members if m is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own error message is the most useful one
            return _coerce_type(value, candidates[0], key)
        for member in candidates:
            try:
                return _coerce_type(value, member, key)
            except ConfigError:
                continue
        raise ConfigError(f"expected {describe_type(tp)}, got {_got(value)}", key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"invalid choice {value!r}{hint}; valid: {', '.join(map(str, args))}", key)
        return value
    if origin is list:
        if isinstance(value, str) and args and args[0] is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"expected {describe_type(tp)}, got {_got(value)}", key)
        return [_coerce_type(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {_got(value)}", key)
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        raise ConfigError(f"expected an integer, got float {value!r} (write {int(value)})", key)
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise ConfigError(f"expected {describe_type(tp)}, got {_got(value)}", key)
    return value


def check_fields(obj: Any, prefix: str) -> None:
    """Type- and range-check every field of a section instance (nested sections included)."""
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if is_section(hints[f.name]):
            if not isinstance(value, hints[f.name]):
                raise ConfigError(f"expected a {hints[f.name].__name__}, got {_got(value)}", key)
            check_fields(value, key)
        else:
            coerce(value, hints[f.name], key, f.metadata)


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """Construct section `cls` from a TOML table: unknown keys, types and ranges are checked here."""
    if isinstance(data, CliValue):  # a whole table given on the command line: --sampler.adaptive='{max_n = 3}'
        data = data.parsed
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table [{prefix}], got {_got(data)}", prefix)
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean '{prefix}.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key{hint}; valid keys in [{prefix}]: {', '.join(fields)}", key)
        if is_section(hints[name]):
            kwargs[name] = build_section(hints[name], value, key)
        else:
            kwargs[name] = coerce(value, hints[name], key, fields[name].metadata)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# TOML reading and writing of single values


def parse_cli_value(text: str) -> CliValue:
    """Read an override's value as a TOML value (`true`, `0.28`, `["\\n"]`, `{a = 1}`), else the bare string."""
    try:
        table = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return CliValue(text, text)
    # One key and no date/time objects; anything else was not meant as a TOML value.
    if list(table) != ["v"] or isinstance(table["v"], (datetime.date, datetime.time)):
        return CliValue(text, text)
    return CliValue(text, table["v"])


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def toml_value(value: Any) -> str:
    """One TOML value. JSON string escapes are valid TOML basic-string escapes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 'inf', 'nan', '1e-06' are TOML floats; repr round-trips exactly
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")
