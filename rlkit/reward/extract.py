"""Final-answer extraction from model text: pure string functions, no math-verify.

Each returns ``None`` when the text holds no answer of that form, never raises on
malformed text (unbalanced braces, garbage, empty strings).
"""
from __future__ import annotations

import math
import re

# One pass over the text: a box opener, an escaped character (so "\{" and "\}" are
# not group braces, and "\\" is a LaTeX line break), or a bare brace.
_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\.|[{}]", re.DOTALL)

# A number as written in prose: optional sign, thousands separators "1,234,567",
# optional decimals, or a bare decimal ".5". The lookarounds keep "1,2345" from
# reading as "1,234" and keep digits glued to letters/digits out of the group form.
_NUMBER = re.compile(
    r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?![\d])(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)

# What normalize_number accepts once currency, separators and percent are gone.
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    "Last" is the box that closes last, so ``\\boxed{\\boxed{3}}`` gives ``\\boxed{3}``
    and a trailing unclosed box (a truncated response) leaves an earlier complete one
    as the answer. Braces escaped as ``\\{ \\}`` do not count. Returns ``None`` if no
    box closes. The content is returned as written (it may be empty or blank).
    """
    open_groups: list[int | None] = []  # content start for a box, None for a plain "{"
    last: tuple[int, int] | None = None
    for match in _BOX_TOKENS.finditer(text):
        token = match.group()
        if token == "{":
            open_groups.append(None)
        elif token == "}":
            if open_groups:
                start = open_groups.pop()
                if start is not None:
                    last = (start, match.start())
        elif token.startswith(("\\boxed", "\\fbox")):
            open_groups.append(match.end())
        # any other token is an escaped character ("\\{" too): skipped
    if last is None:
        return None
    return text[last[0] : last[1]]


def find_numbers(text: str) -> list[str]:
    """Every number written in ``text``, in order, as it appears ("1,000", "-3.5", ".5")."""
    return _NUMBER.findall(text)


def last_number(text: str) -> str | None:
    """The last number written in ``text`` as it appears, or ``None``.

    Fractions count as their last integer ("3/4" -> "4"): this is the crude fallback for
    answers without a box; use math-verify on a boxed answer for anything richer.
    """
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_reference(text: str) -> str | None:
    """The answer after the last ``####`` in ``text`` (to the end of that line), stripped.

    ``"She makes 9 * 2 = 18 dollars.\\n#### 18"`` -> ``"18"``. ``None`` if there is no
    ``####`` or nothing follows it.
    """
    _, sep, tail = text.rpartition("####")
    if not sep:
        return None
    answer = tail.strip().split("\n", 1)[0].strip()
    return answer or None


def normalize_number(s: str) -> float | None:
    """``s`` as a finite float after removing what surrounds numbers in answers.

    Strips whitespace, thousands separators, ``$`` / ``\\$``, a trailing ``%`` / ``\\%``
    and trailing periods; maps the Unicode minus to ``-``. ``"$1,000."`` -> ``1000.0``.
    ``None`` if what remains is not a plain decimal number (``"3/4"``, ``"72 apples"``,
    ``"nan"``, ``""``).
    """
    cleaned = s.strip().replace("\u2212", "-")
    for junk in ("\\$", "$", ",", "\\!", " "):
        cleaned = cleaned.replace(junk, "")
    cleaned = cleaned.rstrip(".")
    for suffix in ("\\%", "%"):
        if cleaned.endswith(suffix):
            cleaned = cleaned[: -len(suffix)]
            break
    if not _PLAIN_NUMBER.fullmatch(cleaned):
        return None
    value = float(cleaned)
    return value if math.isfinite(value) else None
