"""Typed configs: a frozen dataclass per job, filled from a YAML file and `key=value` overrides.

Unknown keys, wrong types and values the dataclass rejects in `__post_init__` all raise
`ConfigError` with a message meant for the user; entry points print it instead of a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A user mistake in a config file or override."""


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if value not in args:
            hint = ""
            if isinstance(value, bool) and any(isinstance(arg, str) for arg in args):
                hint = " (YAML reads a bare on/off/yes/no as true/false: quote it, e.g. 'off')"
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            return _coerce(name, value, options[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            raise ConfigError(f"{name} must have {len(item_hints)} items, got {len(value)}")
        return tuple(
            _coerce(f"{name}[{i}]", v, h) for i, (v, h) in enumerate(zip(value, item_hints))
        )
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['width=128', 'atoms=[-1, 1]'] -> {'width': 128, 'atoms': [-1, 1]} (values parsed as YAML)."""
    parsed = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parsed[key.strip()] = yaml.safe_load(text)
    return parsed


def build_config(cls: type[C], values: dict[str, Any]) -> C:
    """Instantiate the dataclass `cls` from plain values, checking keys and types."""
    hints = typing.get_type_hints(cls)
    fields = {field.name for field in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; known keys: {sorted(fields)}")
    kwargs = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = ()) -> C:
    """Defaults of `cls`, then the YAML mapping at `path`, then `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path} must hold a mapping of config keys, got {type(loaded).__name__}"
            )
        values.update(loaded or {})
    values.update(parse_overrides(list(overrides)))
    return build_config(cls, values)


def add_config_arguments(parser, cls: type, example: str) -> None:
    """The CLIs' shared --config FILE and repeatable --set KEY=VALUE (into args.config and
    args.overrides), for `load_config(cls, args.config, args.overrides)`."""
    parser.add_argument("--config", type=Path, help=f"YAML file with {cls.__name__} keys")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config key (repeatable), e.g. --set {example}",
    )


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One key of a config dataclass as its source documents it."""

    name: str
    type: str  # e.g. "int", "float | null", "[float, float]", "sgts | all"
    default: str | None  # YAML, e.g. "0.875", "null", "[0.02, 0.98]"; None: required
    comment: str  # the `#` comments above the key and on its lines, joined
    section: str  # the last `# --- section ---` line above the key; "" before any


SECTION = re.compile(r"^#\s*---\s*(.*?)\s*---\s*$")


def _type_text(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if arg is type(None) else _type_text(arg) for arg in args)
    if origin is tuple:
        items = [_type_text(args[0]), "..."] if args[-1] is Ellipsis else map(_type_text, args)
        return f"[{', '.join(items)}]"
    return getattr(hint, "__name__", str(hint))


def _yaml_text(value: Any) -> str:
    if isinstance(value, tuple):
        return f"[{', '.join(_yaml_text(item) for item in value)}]"
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def field_docs(cls: type) -> list[FieldDoc]:
    """Every field of the config dataclass `cls`, in order, with its type, default and the
    comments of its source: the comment lines directly above it and those on its own lines,
    and the section (`# --- name ---`) it sits in. These comments are the config's reference
    documentation (docs/configuration.md is generated from them)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {}  # line number (1-based) -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string
    body = ast.parse(source).body[0].body
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    docs, section, previous_end = [], "", 0
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous_end = node.end_lineno
            continue
        above = []
        for number in range(previous_end + 1, node.lineno):
            text = comments.get(number)
            if text is None or lines[number - 1].strip() != text:  # blank or code: restart
                above = []
            elif header := SECTION.match(text):
                section, above = header.group(1), []
            else:
                above.append(text)
        inline = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        comment = " ".join(text.lstrip("#").strip() for text in above + inline)
        field = fields[node.target.id]
        if field.default is not dataclasses.MISSING:
            default = _yaml_text(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = _yaml_text(field.default_factory())
        else:
            default = None
        docs.append(FieldDoc(field.name, _type_text(hints[field.name]), default, comment, section))
        previous_end = node.end_lineno
    return docs
