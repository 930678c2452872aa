"""Rewards by name (built-ins), by dotted path (`package.module:attr`), or as callables."""
from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from typing import Any, Callable

REGISTRY: dict[str, Callable[..., Callable]] = {}


def register(name: str):
    """Decorator: make a reward factory (class or function returning a callable) available by name."""

    def deco(factory):
        REGISTRY[name] = factory
        return factory

    return deco


def load_callable(path: str) -> Any:
    """Import `package.module:attr` (or `package.module.attr`), with errors that say what was missing."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    elif "." in path:
        module_name, _, attr = path.rpartition(".")
    else:
        raise ValueError(f"{path!r} is not a dotted path; use 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for reward {path!r}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (reward {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


def _inject(factory, options: dict, context: dict) -> dict:
    """Pass context objects (model, tokenizer, device) to factories that ask for them by name."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return options
    extra = {k: v for k, v in context.items() if k in params and k not in options and v is not None}
    return {**options, **extra}


def build_reward(spec: str | dict | Callable, context: dict | None = None, **options) -> Callable:
    """Build a reward from a name, a {"name": ..., **options} dict, a dotted path, or a callable."""
    context = context or {}
    if callable(spec) and not isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        options = {**{k: v for k, v in spec.items() if k != "name"}, **options}
        if "name" not in spec:
            raise ValueError(f"reward spec {spec} has no 'name'; available: {sorted(REGISTRY)}")
        spec = spec["name"]
    if spec in REGISTRY:
        factory = REGISTRY[spec]
        try:
            return factory(**_inject(factory, options, context))
        except TypeError as e:
            raise ValueError(f"bad options for reward {spec!r}: {e}") from None
    if ":" in spec or "." in spec:
        obj = load_callable(spec)
        if inspect.isclass(obj):
            return obj(**_inject(obj, options, context))
        if options:
            fn = functools.partial(obj, **options)
            fn.__name__ = getattr(obj, "__name__", spec)
            return fn
        return obj
    close = difflib.get_close_matches(spec, REGISTRY, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown reward {spec!r}{hint} (built-ins: {sorted(REGISTRY)}; or a dotted path "
                     f"'package.module:function')")
