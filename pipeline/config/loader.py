"""Loading, checking, overriding and saving configurations.

A YAML file may name one or more files to inherit from with ``_base_`` (paths relative
to the file). Bases are merged first, in order, then the file itself, then the dotted
command-line overrides (``train.lr=0.02``). Every key is checked against the schema as
soon as it is read, so an error names the file (or the command line) it came from.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from .schema import Config

BASE_KEY = "_base_"
CLI_SOURCE = "command line"


class ConfigError(ValueError):
    """A configuration problem, described in one line naming the key and its source."""


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a ``Config`` from an optional YAML file and dotted ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        _merge(tree, sources, _read_with_bases(Path(path), ()), str(path))
    for item in overrides:
        key, value = _parse_override(item)
        _check_key(key, CLI_SOURCE)
        _merge(tree, sources, _nest(key, value), CLI_SOURCE)
    cfg = _build(Config, tree, "", sources)
    _check_minimums(cfg, sources)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML; ``load_config(path)`` gives an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    return path


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included."""
    keys = []
    for name, hint in _hints(cls).items():
        key = prefix + name
        keys.append(key)
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, key + "."))
    return keys


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, read from its source."""
    class_node = ast.parse(inspect.getsource(cls)).body[0]
    docs: dict[str, str] = {}
    body = class_node.body
    for node, after in zip(body, [*body[1:], None], strict=True):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if is_field and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(str(after.value.value))
    return docs


# --- reading -------------------------------------------------------------------------


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{path}: {BASE_KEY} inherits from itself")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths")
    _check_tree(data, "", str(path))
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for base in bases:
        base_path = path.parent / base
        _merge(tree, sources, _read_with_bases(base_path, (*chain, resolved)), str(base_path))
    _merge(tree, sources, data, str(path))
    return tree


def _merge(tree: dict, sources: dict[str, str], update: dict, source: str, prefix: str = ""):
    """Deep-merge ``update`` into ``tree``, remembering which source set each leaf."""
    for key, value in update.items():
        dotted = prefix + key
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], sources, value, source, dotted + ".")
        else:
            tree[key] = value
            if not isinstance(value, dict):
                sources[dotted] = source
            else:
                _mark_sources(sources, value, source, dotted + ".")


def _mark_sources(sources: dict[str, str], tree: dict, source: str, prefix: str):
    for key, value in tree.items():
        if isinstance(value, dict):
            _mark_sources(sources, value, source, prefix + key + ".")
        else:
            sources[prefix + key] = source


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{CLI_SOURCE}: override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


# --- checking ------------------------------------------------------------------------


def _check_tree(data: dict, prefix: str, source: str):
    for key, value in data.items():
        dotted = prefix + str(key)
        _check_key(dotted, source)
        if isinstance(value, dict) and _is_section(dotted):
            _check_tree(value, dotted + ".", source)


def _check_key(dotted: str, source: str):
    keys = _schema_keys()
    if dotted in keys:
        return
    close = _closest_key(dotted, keys)
    hint = f" (did you mean '{close}'?)" if close else ""
    raise ConfigError(f"{source}: unknown key '{dotted}'{hint}")


@cache
def _schema_keys() -> tuple[str, ...]:
    """``all_keys()`` of the schema, walked once: every key of every file is checked against it."""
    return tuple(all_keys())


def _closest_key(dotted: str, keys: tuple[str, ...]) -> str | None:
    """A sibling in the same section first (prefix match, then spelling), else any key."""
    section, _, leaf = dotted.rpartition(".")
    if not section or _is_section(section):
        siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
        prefixed = [name for name in siblings if name.startswith(leaf) or leaf.startswith(name)]
        near = prefixed or difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.5)
        if near:
            return siblings[near[0]]
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _is_section(dotted: str) -> bool:
    cls: Any = Config
    for part in dotted.split("."):
        cls = _hints(cls).get(part)
        if cls is None:
            return False
    return dataclasses.is_dataclass(cls)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# --- building ------------------------------------------------------------------------


def _build(cls: type, tree: dict, prefix: str, sources: dict[str, str]):
    kwargs = {}
    for name, hint in _hints(cls).items():
        if name in tree:
            kwargs[name] = _coerce(tree[name], hint, prefix + name, sources)
    return cls(**kwargs)


# YAML 1.1 (PyYAML) reads these words as booleans: `amp: off` and `train.amp=off` give False.
_YAML_BOOL_WORDS = {False: ("off", "no", "false", "n"), True: ("on", "yes", "true", "y")}


def _yaml_word(value: Any, choices: tuple) -> Any:
    """The string choice that YAML read as a boolean (``off`` for ``train.amp``), if exactly
    one choice is such a word; otherwise the value as it is."""
    if not isinstance(value, bool) or not all(isinstance(c, str) for c in choices):
        return value
    words = [c for c in choices if c.lower() in _YAML_BOOL_WORDS[value]]
    return words[0] if len(words) == 1 else value


# A float as YAML 1.2 writes it. PyYAML follows YAML 1.1, which needs a dot and a signed
# exponent: `1e-3` and `1.0e12` arrive as strings, and that is how learning rates are written.
# Only float fields convert them, so a string key keeps "1e3" as written.
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _coerce(value: Any, hint: Any, key: str, sources: dict[str, str]) -> Any:
    source = sources.get(key) or _first_source(sources, key + ".")

    def fail(expected: str):
        raise ConfigError(
            f"{source}: {key} expects {expected}, got {value!r} ({type(value).__name__})"
        )

    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            fail("a mapping")
        return _build(hint, value, key + ".", sources)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        value = _yaml_word(value, choices)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            fail("one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            fail("a list")
        (item_hint,) = typing.get_args(hint)
        return [_coerce(v, item_hint, key, sources) for v in value]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key, sources)
            except ConfigError:
                pass
        fail(" or ".join(_expected(option) for option in typing.get_args(hint)))
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if hint is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("a number")
        return float(value)
    if hint is str:
        if isinstance(value, dict | list) or value is None:
            fail("a string")
        return value if isinstance(value, str) else str(value)
    if hint is type(None):
        if value is not None:
            fail("null")
        return None
    raise TypeError(f"config schema: unsupported type {hint!r} for {key}")


# Counts that must be at least this: 0 would pass the types and fail far from the config
# (train.max_steps=0 in a FileNotFoundError for checkpoints/FINISHED, a batch size in a
# division by zero).
_MINIMUMS = {
    "train.max_steps": 1,
    "train.batch_size": 1,
    "train.grad_accum_steps": 1,
    "train.reference_batch_size": 1,
    "eval.batch_size": 1,
    "model.num_classes": 2,  # or "auto"
}
_MINIMUM_HINTS = {"model.num_classes": " (categories + background) or auto"}


def _check_minimums(cfg: Config, sources: dict[str, str]):
    for key, minimum in _MINIMUMS.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, int) and value < minimum:
            source = sources.get(key, CLI_SOURCE)
            hint = _MINIMUM_HINTS.get(key, "")
            raise ConfigError(f"{source}: {key} must be >= {minimum}{hint}, got {value}")


def _expected(hint: Any) -> str:
    """What a value of ``hint`` is, for an error message: 'an integer', "'auto'"."""
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(repr(c) for c in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _first_source(sources: dict[str, str], prefix: str) -> str:
    return next((s for k, s in sources.items() if k.startswith(prefix)), CLI_SOURCE)
