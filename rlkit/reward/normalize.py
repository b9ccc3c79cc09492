"""Text as the verifiers read it: one spelling for characters and numbers that look alike.

A response or reference is normalised before any answer is taken from it, so that full-width
digits (``４``), other scripts' digits (``٤``) and LaTeX thousands separators (``32,\\!349``,
``32{,}349``, ``32\\,349``) reach math-verify as the plain number they show. Pure string code.
"""
from __future__ import annotations

import functools
import re
import unicodedata

# Compatibility forms NFKC would fuse with their neighbours: "x²" is not "x2", "1½" is not "11⁄2".
_KEPT_FORMS = ("<super>", "<sub>", "<fraction>")

# Digit groups of three joined by a LaTeX thin space or a protected comma: ",\!", "{,}", "\,", "\!".
_GROUP_SEPARATOR = r"(?:\{,\}|,\s*\\!|\\[,!])\s*"
_GROUPED_NUMBER = re.compile(rf"(?<![\d.,])\d{{1,3}}(?:{_GROUP_SEPARATOR}\d{{3}})+(?!\d)")
_SEPARATOR = re.compile(_GROUP_SEPARATOR)


@functools.lru_cache(maxsize=4096)
def _fold(ch: str) -> str:
    """One character in its NFKC form (kept as is if it is a superscript, subscript or vulgar fraction);
    a decimal digit of any script as its ASCII digit."""
    if unicodedata.decomposition(ch).startswith(_KEPT_FORMS):
        return ch
    folded = unicodedata.normalize("NFKC", ch)
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in folded)


def fold_unicode(text: str) -> str:
    """``text`` in NFKC form, except superscripts, subscripts and vulgar fractions, with every decimal digit ASCII.

    ``"\\boxed{４}"`` -> ``"\\boxed{4}"``, ``"１９"`` -> ``"19"``, ``"٤٢"`` -> ``"42"``; ``"x²"`` stays.
    """
    if text.isascii():
        return text
    return "".join(ch if ch.isascii() else _fold(ch) for ch in text)


def join_digit_groups(text: str) -> str:
    """``text`` with LaTeX separators removed from numbers whose digits group by three.

    ``"32,\\! 349"``, ``"32{,}349"`` and ``"32\\,349"`` -> ``"32349"``; ``"(1,\\!5)"`` and ``"2\\,x"`` stay.
    A plain comma stays (``"1,000"``): math-verify and `split_list` read it as a separator already.
    """
    return _GROUPED_NUMBER.sub(lambda match: _SEPARATOR.sub("", match.group()), text)


def normalize_text(text: str) -> str:
    """`fold_unicode`, then `join_digit_groups`: the text every verifier reads answers from."""
    return join_digit_groups(fold_unicode(text))
