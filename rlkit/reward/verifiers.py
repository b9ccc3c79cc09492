"""Verifiers: ``fn(response, reference, **options) -> Score``, pure, one item at a time.

A verifier runs inside a worker process (``rlkit.reward.pool``), which enforces the
wall-clock timeout from outside; verifiers themselves never install timers, so
math-verify is always called with its ``signal.alarm`` timeouts switched off.

Unscorable is not zero: a verifier failure (bad reference, exception, timeout, crash)
gives ``reward=None`` and the trainer leaves that sample out of its group baseline.
A model that gives no final answer is scorable: reward 0.0, error ``"no_answer"``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from rlkit.registry import Registry
from rlkit.reward.extract import (
    boxed_answer,
    final_boxes,
    final_statement,
    gsm8k_answer,
    last_number,
    normalize_number,
    reference_answer,
    reference_parts,
    standalone_numbers,
    stands_alone,
    unescape_boxes,
    unevaluated_arithmetic,
)
from rlkit.reward.math_equivalence import (
    MathTargets,
    equivalent,
    extraction_config,
    load_math_verify,
    parse,
    parse_parts,
    parse_reference,
    printed,
)
from rlkit.reward.normalize import normalize_text
from rlkit.reward.verifier_options import check_options


@dataclass(frozen=True)
class Score:
    """One verdict.

    reward: the reward, or ``None`` when unscorable (verifier failure; never a silent 0).
    correct: whether the answer matched the reference.
    extracted: the answer taken from the response (``None`` if none was found).
    error: ``None``; ``"no_answer"`` (scorable, reward 0.0); or, with ``reward=None``,
        ``"bad_reference"``, ``"timeout"``, ``"worker_crash"``,
        ``"verifier_error: <ExcType>: <msg>"``.
    """

    reward: float | None
    correct: bool
    extracted: str | None
    error: str | None


VERIFIERS: Registry[Callable[..., Score]] = Registry("verifier")
"""``fn(response: str, reference: str, **options) -> Score``.

A verifier may carry a zero-argument ``prepare`` attribute: pool workers call it once
at start-up, before taking items (``math`` uses it to import and warm up math-verify,
about 1.7 s, so that cost never counts against an item's timeout).
"""

_ERROR_MESSAGE_CHARS = 300


def score_one(verifier: str, response: str, reference: str, options: dict | None = None) -> Score:
    """Look up ``verifier`` (a registered name or ``"pkg.mod:fn"``) and score one pair.

    An exception inside the verifier, or a result that is not a valid ``Score``, gives
    ``Score(None, False, None, "verifier_error: <ExcType>: <msg>")``: unscorable, not 0.
    Caller errors raise: an unknown verifier (KeyError), options the verifier does not
    take or non-str inputs (TypeError).
    """
    fn = VERIFIERS.get(verifier)
    options = options or {}
    check_options(verifier, fn, options)
    if not isinstance(response, str) or not isinstance(reference, str):
        raise TypeError(
            f"score_one takes str response and reference, got "
            f"{type(response).__name__} and {type(reference).__name__}"
        )
    try:
        result = fn(response, reference, **options)
    except Exception as err:  # the verifier's failure: unscorable, reported with its cause
        return Score(None, False, None, _error_code(err))
    problem = _invalid_score(result)
    if problem is not None:
        return Score(None, False, None, f"verifier_error: TypeError: verifier {verifier!r} {problem}")
    return result


def check_score_inputs(responses: list[str], references: list[str]) -> None:
    """Argument checks shared by every scorer's `score(responses, references)`."""
    if isinstance(responses, str) or isinstance(references, str):
        raise TypeError("score takes lists of strings; wrap a single pair as score([response], [reference])")
    if len(responses) != len(references):
        raise ValueError(
            f"score got {len(responses)} responses but {len(references)} references; pass one reference per response"
        )
    for name, items in (("responses", responses), ("references", references)):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise TypeError(f"{name}[{i}] is {type(item).__name__}, expected str")


def _error_code(err: BaseException) -> str:
    try:
        message = str(err)
    except Exception:  # str() of some sympy-carrying exceptions fails; keep the type
        message = "<unprintable message>"
    return f"verifier_error: {type(err).__name__}: {message}"[:_ERROR_MESSAGE_CHARS]


def _invalid_score(result: object) -> str | None:
    """Why ``result`` is not a usable Score, or None if it is."""
    if not isinstance(result, Score):
        return f"returned {type(result).__name__}; return rlkit.reward.Score(reward, correct, extracted, error)"
    if result.reward is not None and not (
        isinstance(result.reward, (int, float)) and math.isfinite(result.reward)
    ):
        return f"returned reward {result.reward!r}; give a finite number, or None when unscorable"
    if not isinstance(result.correct, bool):
        return f"returned correct={result.correct!r}; give a bool"
    for field in ("extracted", "error"):
        value = getattr(result, field)
        if value is not None and not isinstance(value, str):
            return f"returned {field}={value!r}; give a str or None"
    return None


# --------------------------------------------------------------------------- math


@VERIFIERS.register("math")
def math_verifier(
    response: str,
    reference: str,
    *,
    fallback_last_number: bool = True,
    targets: MathTargets = "latex+expr",
    strings: tuple[str, ...] = ("A", "B", "C", "D"),
    float_rounding: int = 6,
    strict: bool = True,
    allow_set_relation_comp: bool = False,
    accept_unevaluated: bool = False,
) -> Score:
    """math-verify equivalence of the response's final answer with the reference.

    Reference: read by `rlkit.reward.extract.reference_parts` (the final group of boxes of a
    full solution, a ``####`` answer, or a bare answer with or without math delimiters), then
    parsed by math-verify; unscorable (``bad_reference``) only if nothing can be parsed.
    Response: the final group of boxes (``\\boxed{1} and \\boxed{2}`` is the set ``{1, 2}``,
    extracted as ``"1, 2"``; a box that never closes does not count), unless a "final answer ... is"
    statement follows the last box (`rlkit.reward.extract.final_statement`) and yields an answer read
    as below: then that statement wins, as math-verify ranks the later of the two first.
    Without a box, and if ``fallback_last_number``, math-verify's own extraction over the whole
    text: the last math span (``$...$``, ``\\(...\\)``, ``\\[...\\]``), an ``answer: ...`` phrase,
    or a number; a number must stand alone where it is written (`rlkit.reward.extract.stands_alone`:
    not the ``2`` of ``2**undef``), else there is no answer. With ``fallback_last_number=False`` only
    a boxed answer counts. Both texts are first normalised (`rlkit.reward.normalize.normalize_text`).
    ``extracted`` is the text that was compared. Reward 1.0 / 0.0.

    targets: what math-verify extracts: ``"latex+expr"`` (LaTeX, then plain expressions),
        ``"latex"``, ``"expr"``, or ``"string"`` (one of ``strings``: multiple-choice letters,
        ``"The answer is A."`` against ``"A"``).
    float_rounding, strict, allow_set_relation_comp: math-verify's comparison options
        (decimal places kept for floats; variables and set/tuple types must match;
        ``1 < x < 2`` may equal ``(1, 2)``).
    accept_unevaluated: score an answer that is arithmetic left undone (``16 + 20`` for 36,
        `rlkit.reward.extract.unevaluated_arithmetic`) by its value. Off by default: such an answer
        scores 0 (scorable, ``extracted`` shows it) unless the reference is written the same way,
        since a policy learns to restate the question's expression and math-verify evaluates it.
    """
    config = extraction_config(targets, tuple(strings))
    response, reference = normalize_text(response), normalize_text(reference)
    gold_parts = reference_parts(reference)
    gold = parse_reference(tuple(gold_parts), targets, config) if gold_parts else ()
    statement = final_statement(response) if fallback_last_number else None
    boxed = final_boxes(response)
    pred, extracted = _unboxed_answer(statement, config) if statement is not None else ([], None)
    if pred:
        boxed = None  # a final statement after the last box wins, as in math-verify
    elif boxed is not None:
        parts = tuple(part for part in boxed if part)
        pred, extracted = (parse_parts(parts, targets, config) if parts else []), ", ".join(parts)
    elif fallback_last_number:
        pred, extracted = _unboxed_answer(unescape_boxes(response), config)
    if not gold:
        return Score(None, False, extracted, "bad_reference")
    if not pred:
        return Score(0.0, False, None, "no_answer")
    answers = parts if boxed is not None else [extracted or ""]
    if not accept_unevaluated and any(map(unevaluated_arithmetic, answers)) and not any(
            map(unevaluated_arithmetic, gold_parts)):
        return Score(0.0, False, extracted, None)
    options = {"float_rounding": float_rounding, "strict": strict, "allow_set_relation_comp": allow_set_relation_comp}
    correct = equivalent(gold, pred, options)
    return Score(1.0 if correct else 0.0, correct, extracted, None)


math_verifier.prepare = load_math_verify


_LEADING_NUMBER = re.compile(r"[-\u2212]?\d+(?:\.\d+)?")
# What math-verify reads as a plain expression outside math: digits, points, spaces, operators, parentheses.
_PLAIN_EXPRESSION = re.compile(r"[\d.\s+\-*/^()\u00d7\u00f7\u2212]+")


def _unboxed_answer(text: str, config: tuple) -> tuple[list, str | None]:
    """math-verify's extraction from ``text`` and its text, or ``([], None)`` if what it read is a number
    that does not stand alone where it is written (the ``2`` of ``2**undef``, `stands_alone`).

    The number is the extracted text, or the number that text begins with when it is a plain expression
    with that value: of ``=2**`` math-verify reports the text ``2**`` (which it failed to parse) and the
    value 2 (read after).
    """
    pred = parse(text, config)
    extracted = printed(pred)
    if not pred or not getattr(pred[0], "is_Number", False) or extracted is None:
        return pred, extracted
    lead = _LEADING_NUMBER.match(extracted)
    if normalize_number(extracted) is not None:
        number = extracted
    elif lead and _PLAIN_EXPRESSION.fullmatch(extracted) and normalize_number(lead.group()) == float(pred[0]):
        number = lead.group()
    else:
        return pred, extracted
    return (pred, extracted) if stands_alone(text, number) else ([], None)


# --------------------------------------------------------------------------- gsm8k

_GSM8K_REL_TOL = 1e-6


def _as_number(answer: str) -> float | None:
    """``answer`` as a number; else the one number inside it, if it stands alone and no other digit is
    there ("$18 a day" -> 18, "18 or 19" and "18 \\boxed{19}" -> None); else None."""
    value = normalize_number(answer)
    if value is not None:
        return value
    numbers = standalone_numbers(answer)
    if len(numbers) != 1 or any(ch.isdigit() for ch in answer.replace(numbers[0], "", 1)):
        return None
    return normalize_number(numbers[0])


@VERIFIERS.register("gsm8k")
def gsm8k_verifier(response: str, reference: str) -> Score:
    """Numeric match of the response's final answer with a GSM8K reference.

    Reference: read by `rlkit.reward.extract.reference_answer` (a GSM8K solution ending
    ``#### 72``, a boxed answer or a bare number); it must be one number. Prediction: the
    answer after the last ``####`` if present, else the final group of boxes, else the last
    number that stands alone (not the ``2`` of ``1/2`` or ``x^2``). Numbers are read
    strictly: ``$``, a trailing ``.`` and ``%`` are dropped, commas only as thousands
    separators (``1,000`` but not ``1,2,3``), a ``-`` sign counts; an answer with words around
    one number ("18 dollars") counts as that number, one with two numbers ("3/4", "1, 2")
    as none. Correct when ``|pred - gold| <= 1e-6 * max(1, |gold|)``. Reward 1.0 / 0.0.
    """
    response, reference = normalize_text(response), normalize_text(reference)
    extracted = gsm8k_answer(response)
    if extracted is None:
        extracted = boxed_answer(response)
    if extracted is None:
        extracted = last_number(response)
    gold_text = reference_answer(reference)
    gold = normalize_number(gold_text) if gold_text is not None else None
    if gold is None:
        return Score(None, False, extracted, "bad_reference")
    if extracted is None or not extracted.strip():
        return Score(0.0, False, None, "no_answer")
    pred = _as_number(extracted)
    correct = pred is not None and abs(pred - gold) <= _GSM8K_REL_TOL * max(1.0, abs(gold))
    return Score(1.0 if correct else 0.0, correct, extracted, None)
