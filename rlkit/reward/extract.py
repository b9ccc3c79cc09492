"""Final answers and references as text: pure string functions, shared by the verifiers and the data loaders.

One module reads an answer one way everywhere: a GSM8K ``####`` line, the final group of
``\\boxed{}`` answers, a reference wrapped in math delimiters, a number that stands alone.
Nothing here imports math-verify; nothing raises on malformed text (unbalanced braces,
garbage, empty strings): a function that finds no answer returns ``None``.
"""
from __future__ import annotations

import math
import re

# One pass over the text: a box opener with its brace, a box opener followed by a space (the
# argument is then the next token, "\boxed 5"), an escaped character (so "\{" and "\}" are not
# group braces, "\\" is a LaTeX line break), or a bare brace.
_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\(?:boxed|fbox) +[^\s${}\\]+|\\.|[{}]", re.DOTALL)
# A box opener written with a doubled backslash: the whole text was escaped once more (JSON, a
# Python literal printed as text), so every "\\" in it stands for "\".
_ESCAPED_BOX = re.compile(r"\\\\(?:boxed|fbox)\b")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")

# Two neighbouring boxes belong to one answer ("\boxed{1} and \boxed{2}", "x = \boxed{1}, y = \boxed{2}")
# when little text lies between them, or a list separator within a short stretch of text. The
# rule is the one math-verify applies inside a response, so both read multi-box answers alike.
_JOIN_GAP_CHARS = 10
_JOIN_LIST_GAP_CHARS = 70
_LIST_SEPARATOR = re.compile(r"\b(?:and|or)\b|[,;]")

# A complete math span: $$...$$, \[...\], \(...\), $...$ around the whole (stripped) text.
_WRAPPED = re.compile(r"\$\$(.+)\$\$|\\\[(.+)\\\]|\\\((.+)\\\)|\$(.+)\$", re.DOTALL)

# A number that stands alone: not glued to letters, digits, braces, backslashes or operators
# ("2" in "\frac{1}{2}", "x2", "10^2", "1/2" or "5-3" is not one). Thousands separators must
# group by three ("1,234,567"); a sign belongs to the number only where it cannot be a minus.
_STANDALONE_NUMBER = re.compile(
    r"(?<![\w.,\\/^{}*+\-\u2212])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w/^{}*+\-\u2212]|[.,]\d)"
)
# Markdown bold around a whole word or phrase ("**18**", "**Answer:** 18"): its markers glue to nothing.
_BOLD = re.compile(r"(?<![\w*])\*\*(?=\S)([^*\n]+?)(?<=\S)\*\*(?![\w*])")
# What normalize_number accepts once currency, spaces and percent are gone: commas only as
# thousands separators, so "1,2,3" and "1,23" are not numbers.
_PLAIN_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def unescape_boxes(text: str) -> str:
    """``text`` with one level of backslash escaping removed if it writes its boxes as ``\\\\boxed``.

    ``"\\\\boxed{\\\\frac{1}{2}}"`` -> ``"\\boxed{\\frac{1}{2}}"``; text without such a box is returned as is.
    """
    if not _ESCAPED_BOX.search(text):
        return text
    return text.replace("\\\\", "\\")


def boxes(text: str) -> list[tuple[int, int, str]]:
    """Every complete top-level ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` in ``text``: (start, end, content).

    ``start``/``end`` span the whole box (``text[start:end] == "\\boxed{...}"``), in order of
    position; a box inside another box is part of the outer one's content. Braces escaped as
    ``\\{ \\}`` do not count; a box that never closes (a truncated response) is left out, and an
    outer box that never closes leaves the complete boxes inside it at top level.
    """
    open_groups: list[tuple[int, int] | None] = []  # (box start, content start) for a box, None for "{"
    found: list[tuple[int, int, str]] = []
    for match in _BOX_TOKENS.finditer(text):
        token = match.group()
        if token == "{":
            open_groups.append(None)
        elif token == "}":
            if open_groups:
                box = open_groups.pop()
                if box is not None:
                    found.append((box[0], match.end(), text[box[1] : match.start()]))
        elif token.startswith(("\\boxed", "\\fbox")):
            if token.endswith("{"):
                open_groups.append((match.start(), match.end()))
            else:  # "\boxed 5": the token after the space
                found.append((match.start(), match.end(), token.split(None, 1)[1]))
        # any other token is an escaped character ("\{" too): skipped
    top_level = []
    for start, end, content in sorted(found):
        if not top_level or start >= top_level[-1][1]:
            top_level.append((start, end, content))
    return top_level


def final_boxes(text: str) -> list[str] | None:
    """Contents of the final group of boxes in ``text``: the last box and the boxes joined to it.

    A box joins the next one when fewer than 10 characters lie between them, or fewer than 70
    that hold a list separator (``and``, ``or``, ``,``, ``;``) and the two contents differ; a box
    repeating its neighbour counts once. ``$`` signs inside a box are dropped (the box is math
    already). ``"\\boxed{1} and \\boxed{2}"`` -> ``["1", "2"]``; ``None`` if no box closes.
    """
    source = unescape_boxes(text)
    found = boxes(source)
    if not found:
        return None
    group = [found[-1]]
    for box in reversed(found[:-1]):
        gap = source[box[1] : group[-1][0]]
        same = box[2].strip() == group[-1][2].strip()
        if len(gap) < _JOIN_GAP_CHARS or (
            not same and len(gap) < _JOIN_LIST_GAP_CHARS and _LIST_SEPARATOR.search(gap)
        ):
            if same:
                group[-1] = box
            else:
                group.append(box)
        else:
            break
    return [_UNESCAPED_DOLLAR.sub("", content).strip() for _, _, content in reversed(group)]


def boxed_answer(text: str) -> str | None:
    """The final group of boxes as one answer, contents joined by ``", "``; ``None`` if no box closes.

    ``"so $\\boxed{\\frac{1}{2}}$."`` -> ``"\\frac{1}{2}"``; ``"\\(\\boxed{1}\\) and \\(\\boxed{-2}\\)."`` -> ``"1, -2"``.
    The result may be empty (``"\\boxed{}"``).
    """
    contents = final_boxes(text)
    if contents is None:
        return None
    return ", ".join(c for c in contents if c)


def gsm8k_answer(text: str) -> str | None:
    """The answer after the last ``####`` in ``text`` (to the end of that line), stripped, commas of
    thousands separators removed: ``"... = 1,080 dollars.\\n#### 1,080"`` -> ``"1080"``.

    ``None`` if there is no ``####`` or nothing follows it.
    """
    _, sep, tail = text.rpartition("####")
    if not sep:
        return None
    answer = tail.strip().split("\n", 1)[0].strip()
    answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)
    return answer or None


def unwrap_math(text: str) -> str:
    """``text`` stripped, without math delimiters around the whole of it (``$x$``, ``$$x$$``, ``\\[x\\]``, ``\\(x\\)``).

    Delimiters around only part of the text stay: ``"$1$ and $2$"`` is returned as is.
    """
    text = text.strip()
    match = _WRAPPED.fullmatch(text)
    if match is None:
        return text
    inner = next(group for group in match.groups() if group is not None)
    if inner.endswith("\\") or _UNESCAPED_DOLLAR.search(inner):
        return text  # "$1$ and $2$", "$x\$": not one span
    return inner.strip()


def reference_parts(text: str) -> list[str] | None:
    """The answer a reference states, as its parts, read the same way by every verifier and data loader.

    The final group of boxes if the reference has one (a full solution: one part per box), else
    the GSM8K ``####`` answer if it has that marker, else the reference itself without math
    delimiters around it. Empty parts are dropped; ``None`` if nothing is left (``""``, ``"$$"``,
    ``"\\boxed{}"``, ``"#### "``).
    """
    parts = final_boxes(text)
    if parts is None:
        parts = [gsm8k_answer(text) or ""] if "####" in text else [unwrap_math(text)]
    parts = [part for part in parts if part]
    return parts or None


def reference_answer(text: str) -> str | None:
    """`reference_parts` as one answer, joined by ``", "`` (what the data loaders store), or ``None``."""
    parts = reference_parts(text)
    return ", ".join(parts) if parts else None


# After a comma between digits: the next digit group of a number ("1,000", "40,\!000"), not a list item.
_DIGIT_GROUP = re.compile(r"(?:\\!)?\d")


def split_list(text: str) -> list[str]:
    """``text`` cut at its top-level commas and semicolons, parts stripped, empty ones dropped.

    ``"30^\\circ, 150^\\circ"`` -> ``["30^\\circ", "150^\\circ"]``. A comma inside brackets or braces
    (``(1, 2]``, ``\\{1, 2\\}``, ``f(x, y)``) or between digit groups (``1,000``, ``40,\\!000``) does not cut.
    """
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch in ",;" and depth == 0 and not (text[i - 1 : i].isdigit() and _DIGIT_GROUP.match(text, i + 1)):
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def standalone_numbers(text: str) -> list[str]:
    """Every number in ``text`` that stands alone, in order, as written (``"1,000"``, ``"-3.5"``).

    ``"5 - 3 = 2 apples"`` has ``["5", "3", "2"]``; ``"so x = \\frac{1}{2}"``, ``"-[0,1)"``, ``"x^2"``
    and ``"1/3"`` have none. Markdown bold does not glue: ``"**18**"`` has ``["18"]``, ``"**2**x"`` none.
    """
    return _STANDALONE_NUMBER.findall(_BOLD.sub(r"\1", text))


# A number as math-verify may read one outside a box: a sign, digits, groups of three after a comma or space.
_NUMBER_TOKEN = re.compile(r"(?<![\d.])[-\u2212]?(?:\d+(?:[ ,]\d{3})*(?:\.\d+)?|\.\d+)")


def stands_alone(text: str, number: str) -> bool:
    """Whether the last place ``text`` writes the value of ``number`` holds a number that stands alone.

    ``number`` is what math-verify extracted (``"10455"`` for ``"10,455"``). ``"so it is 2."`` -> True;
    ``"2**undef"``, ``"2 - 0, so 2x"`` and a text without that value -> False.
    """
    value, text = normalize_number(number), _BOLD.sub(r"\1", text)
    spots = [m for m in _NUMBER_TOKEN.finditer(text) if normalize_number(m.group()) == value]
    if value is None or not spots:
        return False
    alone = _STANDALONE_NUMBER.match(text, spots[-1].start())
    return alone is not None and alone.end() == spots[-1].end()


# "The final answer is": the statement math-verify ranks with a box, the later of the two winning.
_FINAL_STATEMENT = re.compile(r"(?i:final answer).{0,100}?\s+is\b")


def final_statement(text: str) -> str | None:
    """The text from the last "final answer ... is" after the last complete box, or ``None`` (no box, or none after it).

    ``"\\boxed{200} ... \\boxed{255}. Final Answer: The final answer is $10,455$."`` -> ``"Final Answer: The final answer is $10,455$."``.
    """
    source = unescape_boxes(text)
    found = boxes(source)
    if not found:
        return None
    statements = list(_FINAL_STATEMENT.finditer(source, found[-1][1]))
    return source[statements[-1].start() :] if statements else None


def last_number(text: str) -> str | None:
    """The last number in ``text`` that stands alone (see `standalone_numbers`), as written, or ``None``."""
    numbers = standalone_numbers(text)
    return numbers[-1] if numbers else None


def normalize_number(s: str) -> float | None:
    """``s`` as a finite float after removing what surrounds numbers in answers.

    Strips whitespace, ``$`` / ``\\$``, ``\\!``, a trailing ``%`` / ``\\%`` and trailing periods;
    maps the Unicode minus to ``-``; commas only as thousands separators. ``"$1,000."`` -> ``1000.0``,
    ``"-3.00"`` -> ``-3.0``. ``None`` if what remains is not one plain decimal number
    (``"3/4"``, ``"1,2,3"``, ``"72 apples"``, ``"nan"``, ``""``).
    """
    cleaned = s.strip().replace("\u2212", "-")
    for junk in ("\\$", "$", "\\!", " "):
        cleaned = cleaned.replace(junk, "")
    cleaned = cleaned.rstrip(".")
    for suffix in ("\\%", "%"):
        if cleaned.endswith(suffix):
            cleaned = cleaned[: -len(suffix)]
            break
    if not _PLAIN_NUMBER.fullmatch(cleaned):
        return None
    value = float(cleaned.replace(",", ""))
    return value if math.isfinite(value) else None


_LITERAL = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_OPERATOR = r"(?:[-+*/^\u00d7\u00f7\u2212\u22c5]|\\times|\\cdot|\\div)"
_UNDONE = re.compile(rf"{_LITERAL}(?:{_OPERATOR}{_LITERAL})+")
_FRACTION = re.compile(rf"{_LITERAL}/{_LITERAL}")


def unevaluated_arithmetic(answer: str) -> bool:
    """Whether ``answer`` is arithmetic on number literals left undone: ``"16 + 20"``, ``"(18 + 4)"``,
    ``"2 \\times 3"``, ``"99^2 + 99 + 1"``, ``"19 - 7 ="``. Such an answer restates a computation
    instead of giving its result (a policy that echoes "What is 16 + 20?" as ``16 + 20`` would
    otherwise be scored right, since math-verify evaluates it). Final forms are not: ``"36"``,
    ``"-5"``, ``"3/4"`` (a plain fraction), ``"\\frac{3}{4}"``, ``"11\\sqrt{2}"``, ``"x + 1"``.
    """
    text = answer.strip().strip("$").rstrip("=. ")
    for junk in ("\\left", "\\right", "\\,", "\\!", " ", "(", ")", "{", "}"):
        text = text.replace(junk, "")
    return bool(_UNDONE.fullmatch(text)) and not _FRACTION.fullmatch(text)
