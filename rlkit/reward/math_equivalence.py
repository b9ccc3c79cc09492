"""math-verify as rlkit calls it: imported once per process, timeouts off, answers parsed in parts.

math-verify (the ``math-verify`` package) parses LaTeX and plain expressions to sympy
and compares them. rlkit's `math` verifier (`rlkit.reward.verifiers.math_verifier`) chooses what text
to hand it; this module hands it over: the extraction configs, a parse of a multi-part answer as one
set, and a comparison that one failing pair of parses does not end. No timers here: the worker pool
(`rlkit.reward.pool`) times a verifier out from outside.
"""
from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Literal

from rlkit.reward.extract import split_list


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeout is off: here that is by design (the pool times out)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.lru_cache(maxsize=None)
def load_math_verify() -> ModuleType:
    """Import math-verify once per process and warm up its LaTeX parser (~1.7 s on first call)."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    math_verify.parse("$1$", parsing_timeout=None, raise_on_error=True)
    return math_verify


MathTargets = Literal["latex+expr", "latex", "expr", "string"]


@functools.lru_cache(maxsize=16)
def extraction_config(targets: MathTargets, strings: tuple[str, ...]) -> tuple:
    """math-verify's extraction targets for the ``targets`` option (cached: the configs key its regex caches)."""
    if targets == "string" and (not strings or not all(choice.strip() for choice in strings)):
        raise ValueError(f"options.strings: {list(strings)} has no choice or a blank one. "
                         f"Fix: list the answer choices, e.g. [A, B, C, D]")
    mv = load_math_verify()
    configs = {
        "latex": (mv.LatexExtractionConfig(),),
        "expr": (mv.ExprExtractionConfig(),),
        "latex+expr": (mv.LatexExtractionConfig(), mv.ExprExtractionConfig()),
        "string": (mv.StringExtractionConfig(strings=strings),),
    }
    return configs[targets]


def _as_math_text(answer: str, targets: MathTargets) -> str:
    """An extracted answer as math-verify reads one best: inside ``$...$`` for LaTeX, as is otherwise."""
    return f"${answer}$" if targets.startswith("latex") else answer


def parse(text: str, config: tuple) -> list:
    """math-verify's parse of ``text``: the values it extracts, each followed by its text, or []."""
    return load_math_verify().parse(text, list(config), parsing_timeout=None, raise_on_error=True)


def parse_parts(parts: tuple[str, ...], targets: MathTargets, config: tuple) -> list:
    """math-verify's parse of an answer given in parts (the boxes of one group), or [].

    The parts, each cut at its top-level commas (`split_list`), become the set of their
    values plus their joined text, as math-verify builds for ``\\boxed{1} and \\boxed{2}``.
    Each piece is parsed alone because math-verify's parse of a comma list it cannot read
    whole falls back to one element (``$\\frac{1}{2}, 25\\%$`` -> ``25``), which would reward
    a partial answer or a hedge. One piece, or pieces without a value (a string target, text
    it cannot parse): one part is parsed whole, several are compared by their joined text.
    """
    joined = ", ".join(parts)
    pieces = [piece for part in parts for piece in split_list(part)]
    if len(pieces) > 1:
        values = []
        for piece in pieces:
            value = next((v for v in parse(_as_math_text(piece, targets), config) if not isinstance(v, str)), None)
            if value is None:
                break
            values.extend(value.args if isinstance(value, _finite_set()) else [value])
        else:
            try:
                return [_finite_set()(*values), joined]
            except Exception:  # values sympy cannot hold in a set (matrices): read as below
                pass
    return parse(_as_math_text(joined, targets), config) if len(parts) == 1 else [joined]


def _finite_set() -> type:
    """math-verify's own set type (a sympy FiniteSet), imported with math-verify."""
    from latex2sympy2_extended.sets import FiniteSet

    return FiniteSet


@functools.lru_cache(maxsize=4096)
def parse_reference(parts: tuple[str, ...], targets: MathTargets, config: tuple) -> tuple:
    """`parse_parts` of a reference, cached: a group's n samples share one reference."""
    return tuple(parse_parts(parts, targets, config))


def printed(parsed: list) -> str | None:
    """The text math-verify extracted (the string it returns after the parsed value), else the value printed."""
    texts = [p for p in parsed if isinstance(p, str)]
    return texts[-1] if texts else (str(parsed[0]) if parsed else None)


def equivalent(gold: tuple, pred: list, options: dict) -> bool:
    """``math_verify.verify(gold, pred)``, one (gold, pred) pair of parses at a time.

    math-verify parses an answer to a value and its text (``"12:00"`` -> ``[zoo, "12:00"]``);
    with ``raise_on_error=True`` one failing pair (``zoo`` cannot be compared) would end the
    whole comparison before the texts are compared. Here a failing pair is passed over; the
    first error is raised only when no pair could be compared at all.
    """
    mv = load_math_verify()
    compared, first_error = False, None
    for g in gold:
        for p in pred:
            try:
                if mv.verify(g, p, timeout_seconds=None, raise_on_error=True, **options):
                    return True
                compared = True
            except Exception as err:  # this pair only; the others still decide
                first_error = first_error or err
    if not compared and first_error is not None:
        raise first_error
    return False
