"""Settings defined once: each dataclass field carries its help text and its check.

    lr: float = setting(3e-3, "prefix learning rate (Adam)", POSITIVE)

A `Settings` dataclass checks every field when it is built (from Python or from YAML, the same code):
the type (int -> float and YAML's "1e-3" string -> float are accepted), finiteness of every float, then
the field's own check; then `validate()` for checks across fields. Errors are `ConfigError`s that name
`section.field`, the value and what is allowed. `config.py` assembles sections from these and `--help`
prints the same help text.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal


class ConfigError(ValueError):
    """A config key, type or value is wrong; the message names the key."""


# ---- checks: value -> None when allowed, else what is wrong ("is out of range (must be > 0)") ----------------
class Check:
    """`choices`: the allowed values, for checks that list them (one_of, each_of)."""

    def __init__(self, ok: Callable[[Any], bool], allowed: str, problem: str | None = None,
                 choices: tuple | None = None):
        self.ok, self.allowed, self.choices = ok, allowed, choices
        self.problem = problem or f"is out of range (must be {allowed})"

    def __call__(self, value) -> str | None:
        return None if value is None or self.ok(value) else self.problem


POSITIVE = Check(lambda v: v > 0, "> 0")
NONNEG = Check(lambda v: v >= 0, ">= 0")
UNIT = Check(lambda v: 0 < v <= 1, "in (0, 1]")
CLOSED_UNIT = Check(lambda v: 0 <= v <= 1, "in [0, 1]")


def at_least(lo) -> Check:
    return Check(lambda v: v >= lo, f">= {lo}")


def one_of(*choices) -> Check:
    names = ", ".join(map(str, choices))
    return Check(lambda v: v in choices, f"one of {names}", f"is not one of {names}", choices)


def each_of(*choices) -> Check:
    """A list whose items are all among `choices`."""
    names = ", ".join(map(str, choices))
    return Check(lambda v: all(x in choices for x in v), f"a list of {names}", f"not allowed (choose from {names})",
                 choices)


def setting(default=dataclasses.MISSING, help: str = "", check: Check | None = None, *,
            default_factory=dataclasses.MISSING):
    """A dataclass field with its help text and check."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, "check": check})


def _field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def default_of(cls, name: str) -> Any:
    """The default of setting `name` of a Settings dataclass: what a command-line option restating it reads."""
    f = _field(cls, name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def choices_of(cls, name: str) -> tuple:
    """The values setting `name` allows: its Literal type's, or its check's (one_of / each_of)."""
    tp = type_hints(cls)[name]
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    check = _field(cls, name).metadata.get("check")
    if check is None or check.choices is None:
        raise ValueError(f"{cls.__name__}.{name} lists no choices")
    return tuple(check.choices)


def help_of(cls, name: str) -> str:
    """The help text of setting `name`."""
    return _field(cls, name).metadata.get("help", "")


def check_of(cls, name: str) -> Check | None:
    """The check of setting `name` (None: only its type)."""
    return _field(cls, name).metadata.get("check")


# ---- types ------------------------------------------------------------------------------------------------------
def coerce(value: Any, tp) -> tuple[bool, Any]:
    """Check (and gently coerce: int -> float, "1e-3" -> 0.001) a value against a type annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)), list(value) if isinstance(value, (list, tuple)) else value
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


@functools.cache
def type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_value(path: str, value: Any, tp, check: Check | None) -> Any:
    """The checked (and coerced) value of one setting, or a ConfigError naming `path`."""
    ok, value = coerce(value, tp)
    if not ok:
        raise ConfigError(f"{path}: {value!r} is not {type_name(tp)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {value!r} is not a finite number")
    problem = check(value) if check is not None else None
    if problem:
        raise ConfigError(f"{path}: {value!r} {problem}")
    return value


class Settings:
    """Base of the config dataclasses: every field is checked on construction and by `validate()`.
    `section` is the name errors use ("ppo" -> "ppo.lr")."""

    section = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Field checks, then `check_fields_together` (fields may be changed after construction)."""
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                continue  # a nested section checks itself
            setattr(self, f.name, check_value(self.key(f.name), value, hints[f.name], f.metadata.get("check")))
        self.check_fields_together()

    def check_fields_together(self) -> None:
        """Checks across fields; override where needed."""

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name


def describe(cls, indent: str = "  ") -> list[str]:
    """`key: default  help [allowed]` lines for every YAML setting of a Settings dataclass (for --help)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            lines.append(f"{f.name}:" + (f"  # {f.metadata['help']}" if f.metadata.get("help") else ""))
            lines += describe(type(default), indent)
            continue
        check, tp = f.metadata.get("check"), type_hints(cls)[f.name]
        allowed = (f" [{check.allowed}]" if check is not None else
                   f" [{type_name(tp)}]" if typing.get_origin(tp) is Literal else "")
        text = f"{f.metadata.get('help', '')}{allowed}".strip()
        lines.append(f"{indent if cls.section else ''}{f.name}: {json.dumps(default)}" + (f"  # {text}" if text else ""))
    return lines


# ---- settings of no config section ---------------------------------------------------------------------------
@dataclass
class ServeSettings(Settings):
    """`rlprefix serve`'s batching. Defined here, on the lowest floor, so that the server (rlprefix.serve) and the
    command line (rlprefix.cli) read the same defaults and checks."""
    section = "serve"
    max_batch: int = setting(32, "most rows (completions) in the running batch; more wait for a free slot",
                             at_least(1))
    max_queue: int = setting(1024, "most rows (prompts x n) waiting for a slot; a request that would queue more gets "
                             "429 and may retry", at_least(1))
    batch_wait_ms: float = setting(5.0, "when nothing is decoding, how long to gather arriving rows to prefill "
                                   "together", NONNEG)
    drain_timeout: float = setting(30.0, "on SIGTERM/SIGINT, seconds in-flight requests may run before they are cut",
                                   NONNEG)
    max_body_bytes: int = setting(1 << 20, "largest request body accepted (a larger one gets 413); 1 MiB holds a "
                                  "prompt that fills a 128k-token context", at_least(1))
