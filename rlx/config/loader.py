"""Loading a `Config`: defaults < TOML file < command-line overrides, with errors that say where.

Overrides are `--section.key=value` (or `--section.key value`); nested tables use more dots
(`--sampler.adaptive.max_n=64`). A value is read as TOML when it parses (`true`, `0.28`, `["\\n"]`,
`{a = 1}`), else taken as a bare string (`token`, `0.6_1.6,2.5`). `"none"` switches an optional
setting off. A list-of-strings setting also accepts one string (`--data.train_files=a.jsonl`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlx.config.fields import (
    ConfigError, build_section, describe_range, describe_type, field_docs, is_section, parse_cli_value, toml_value,
    type_hints,
)  # fmt: skip
from rlx.config.root import Config

CLI_ORIGIN = "command line"
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file at `path` (if any), then `overrides` ("section.key=value", a
    leading "--" allowed). Validates everything; raises ConfigError naming the file or the command
    line and the key. Derived values are not filled in: call `.resolved()` on the result.
    """
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}  # dotted key (tables too) -> where its value came from
    if path is not None:
        data = read_toml(path)
        _record_sources(data, "", str(path), sources)
    for text in overrides:
        keys, value = parse_override(text)
        _set_nested(data, keys, value)
        _record_sources({keys[-1]: value}, ".".join(keys[:-1]), CLI_ORIGIN, sources)
    try:
        config = _build_config(data)
        config.validate()
    except ConfigError as e:
        origin = _origin(e.key, sources) or (str(path) if path is not None else None)
        raise ConfigError(f"{origin}: {e}" if origin else str(e)) from None
    return config


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing, unreadable or malformed file is a ConfigError (with line and column)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'--sampler.adaptive.max_n=64' -> (['sampler', 'adaptive', 'max_n'], CliValue('64', 64))."""
    key, sep, raw = text.removeprefix("--").partition("=")
    if not sep or not _OVERRIDE_KEY.match(key):
        raise ConfigError(f"malformed override {text!r}; expected --section.key=value")
    return key.split("."), parse_cli_value(raw)


def save_resolved(config: Config, run_dir: str | Path) -> Path:
    """Write `config` (normally `config.resolved()`) to <run_dir>/config.toml and return the path.

    `load_config(path)` of that file gives back an equal Config.
    """
    path = Path(run_dir) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved config of run {config.job.name!r}, written by rlx. Rerun: rlx train --config {path}\n\n"
    path.write_text(header + config.to_toml(), encoding="utf-8")
    return path


def _build_config(data: dict[str, Any]) -> Config:
    names = Config.section_names()
    for name in data:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            where = "" if isinstance(data[name], dict) else " (top-level settings must go under a [section] header)"
            raise ConfigError(f"unknown section{hint}{where}; valid sections: {', '.join(names)}", name)
    hints = type_hints(Config)
    return Config(**{name: build_section(hints[name], table, name) for name, table in data.items()})


def _set_nested(data: dict[str, Any], keys: list[str], value: Any) -> None:
    table = data
    for i, key in enumerate(keys[:-1]):
        table = table.setdefault(key, {})
        if not isinstance(table, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a table")
    table[keys[-1]] = value


def _record_sources(data: dict[str, Any], prefix: str, origin: str, sources: dict[str, str]) -> None:
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        sources[dotted] = origin
        if isinstance(value, dict):
            _record_sources(value, dotted, origin, sources)


def _origin(key: str | None, sources: dict[str, str]) -> str | None:
    """Where the value at `key` (or its closest enclosing table) came from."""
    key = re.sub(r"\[\d+\]", "", key or "")
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return None


# ---------------------------------------------------------------------------------------------
# Documentation and the command line


def help_config() -> str:
    """Every section, key, type, range, default and docstring, as `--help-config` prints them."""
    lines = ["Config reference: TOML tables and keys (override any with --section.key=value).", ""]
    root_docs = field_docs(Config)
    for name in Config.section_names():
        _describe_section(type_hints(Config)[name], name, root_docs.get(name, ""), lines)
    return "\n".join(lines).rstrip() + "\n"


def _describe_section(cls: type, name: str, doc: str, lines: list[str]) -> None:
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else doc
    lines.append(f"[{name}]  {summary}".rstrip())
    hints, docs, nested = type_hints(cls), field_docs(cls), []
    defaults = cls()
    for f in dataclasses.fields(cls):
        if is_section(hints[f.name]):
            nested.append((hints[f.name], f"{name}.{f.name}", docs.get(f.name, "")))
            continue
        value = getattr(defaults, f.name)
        default = "none" if value is None else toml_value(value)
        kind = describe_type(hints[f.name])
        bounds = describe_range(f.metadata)
        lines.append(f"  {f.name}: {kind}{f' ({bounds})' if bounds else ''} = {default}")
        if docs.get(f.name):
            lines.append(f"      {docs[f.name]}")
    lines.append("")
    for sub_cls, sub_name, sub_doc in nested:
        _describe_section(sub_cls, sub_name, sub_doc, lines)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are ConfigErrors (one line, exit status 2 via rlx.cli)."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def build_arg_parser(prog: str) -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=prog,
        allow_abbrev=False,
        description="Run from a TOML config. Any setting can be overridden with --section.key=value "
        "(nested tables: --sampler.adaptive.max_n=64). Precedence: defaults < TOML < command line.",
        epilog="Examples: --loss.clip_ratio_high=0.28  --generator.stop='[\"\\n\"]'  "
        "--rollout_correction.rollout_is=token  --logging.wandb=true",
    )
    parser.add_argument("--config", metavar="PATH", help="TOML experiment file (omit to start from defaults)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config as TOML and exit")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="WHERE",
                        help="set checkpoint.resume: auto (the default value), none, or a checkpoint path")  # fmt: skip
    parser.add_argument("--help-config", action="store_true", help="list every config key with type, default and doc")
    return parser


def parse_args(argv: Sequence[str] | None, prog: str = "rlx train") -> tuple[Config, argparse.Namespace]:
    """Parse a command line into (Config, namespace with config, dry_run, resume, overrides).

    `--help` and `--help-config` print and exit 0; `--dry-run` prints the resolved TOML and exits 0
    (SystemExit, as argparse does for --help). The Config is validated but not yet `.resolved()`.
    """
    parser = build_arg_parser(prog)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.help_config:
        print(help_config(), end="")
        raise SystemExit(0)
    args.overrides = _collect_overrides(rest, prog)
    if args.resume is not None:
        args.overrides.append(f"checkpoint.resume={args.resume}")
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(config.resolved().to_toml(), end="")
        raise SystemExit(0)
    return config, args


def _collect_overrides(rest: list[str], prog: str) -> list[str]:
    """['--a.b=1', '--c.d', '2'] -> ['a.b=1', 'c.d=2']; anything else is an error."""
    overrides, i = [], 0
    while i < len(rest):
        token = rest[i]
        key = token.removeprefix("--").partition("=")[0]
        if not token.startswith("--") or not _OVERRIDE_KEY.match(key):
            raise ConfigError(f"{prog}: unrecognized argument {token!r}; settings are overridden with "
                              f"--section.key=value (see {prog} --help-config)")  # fmt: skip
        if "=" in token:
            overrides.append(token[2:])
            i += 1
        elif i + 1 < len(rest):
            overrides.append(f"{key}={rest[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"{prog}: {token} needs a value (--{key}=VALUE)")
    return overrides


def cli_main(argv: Sequence[str] | None = None) -> int:
    """`rlx config --config X.toml [--section.key=value ...] [--dry-run]`: print the resolved config."""
    config, _ = parse_args(argv, prog="rlx config")
    print(config.resolved().to_toml(), end="")
    return 0
