"""Options checked against the annotations of the parameters that receive them: plug-in options at config
validation (rlkit.config) and verifier options in configs and HTTP requests (rlkit.reward.verifier_options).

Options arrive as YAML/JSON values. Checked types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``tuple[X, ...]`` / ``list[X]`` (a list or tuple of X), ``X | None``. ``bool`` is not an int here, ``int`` is
a float, and floats must be finite. An unannotated parameter has the type of its scalar default. A leaf
module: it imports nothing of rlkit.
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
import types
import typing
from typing import Callable


def check_option_types(fn: Callable, options: dict, owner: str, prefix: str = "options.", strict: bool = True) -> None:
    """Raise TypeError naming `prefix + option`, `owner` and the fix for an option whose value is not of its type.

    fn: the function (or ``__init__``) whose parameters take the options, already known to bind. strict: refuse an
    option whose parameter declares no checkable type (else it is left to `fn`).
    """
    declared = _option_types(fn)
    parameters = inspect.signature(fn).parameters
    for name, value in options.items():
        param = name if name in parameters else _var_keyword(fn)  # bound: one of them takes it
        expected = declared.get(param)
        if param not in declared or not _checkable(expected):
            if not strict:
                continue
            what = f"type {_type_name(expected)}" if param in declared else "no type"
            raise TypeError(
                f"{prefix}{name}: {owner} declares {what} for this option, which rlkit cannot check. "
                f"Fix: annotate the parameter as bool, int, float, str, Literal[...], tuple[str, ...] or X | None"
            )
        if not _is_instance(value, expected):
            default = parameters[param].default
            keep = "" if default is inspect.Parameter.empty else f", or leave it out for the default {default!r}"
            raise TypeError(
                f"{prefix}{name}: {owner} expects {_type_name(expected)}, got {_value_name(value)}. "
                f"Fix: give a value of type {_type_name(expected)}{keep}"
            )


_VALUE_CHARS = 60


@functools.lru_cache(maxsize=256)
def _option_types(fn: Callable) -> dict[str, object]:
    """Parameter name -> declared type: its annotation (resolved), else the type of a scalar default."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: fall back to the defaults
        hints = {}
    declared = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name in hints:
            declared[name] = hints[name]
        elif type(param.default) in (bool, int, float, str):
            declared[name] = type(param.default)
    return declared


def _var_keyword(fn: Callable) -> str | None:
    """The name of ``fn``'s ``**kwargs`` parameter (whose annotation types each extra option), if any."""
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return name
    return None


def _checkable(tp: object) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (bool, int, float, str, type(None)):
        return True
    if origin is typing.Literal:
        return all(type(arg) in (bool, int, str) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return all(_checkable(arg) for arg in args)
    if origin is list and len(args) == 1 or origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _checkable(args[0])
    return False


def _is_instance(value: object, tp: object) -> bool:
    """Whether ``value`` is of the checkable type ``tp``, with JSON's view of numbers (see check_options)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float:
        if type(value) is int:
            return abs(value) <= sys.float_info.max  # converts to a finite float
        return type(value) is float and math.isfinite(value)
    if tp in (bool, int, str, type(None)):
        return type(value) is tp
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, arg) for arg in args)
    return isinstance(value, (list, tuple)) and all(_is_instance(item, args[0]) for item in value)


def _type_name(tp: object) -> str:
    if isinstance(tp, type):
        return "None" if tp is type(None) else tp.__name__
    return repr(tp).replace("typing.", "").replace("NoneType", "None")


def _value_name(value: object) -> str:
    text = repr(value)
    if len(text) > _VALUE_CHARS:
        text = text[:_VALUE_CHARS] + "..."
    return f"{_type_name(type(value))} {text}"
