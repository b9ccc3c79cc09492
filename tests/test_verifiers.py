"""Verifier core on CPU: answer extraction, the math and gsm8k verifiers, score_one's error contract."""
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from math_verify import parse, verify

from rlkit.reward import VERIFIERS, Score, score_one
from rlkit.reward.extract import (
    boxed_answer,
    boxes,
    gsm8k_answer,
    last_number,
    normalize_number,
    reference_answer,
    reference_parts,
    split_list,
    standalone_numbers,
    unevaluated_arithmetic,
    unescape_boxes,
    unwrap_math,
)

FIXTURES = "verifier_fixtures"


@pytest.fixture
def fixtures_importable(monkeypatch):
    """Make tests/verifier_fixtures.py importable by name, however pytest set up sys.path."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


# --------------------------------------------------------------------------- extraction


def _last_box(text: str):
    found = boxes(text)
    return found[-1][2] if found else None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\fbox{7}", "7"),
        ("\\boxed {5}", "5"),  # space before the brace
        ("our answer is $\\boxed 2$.", "2"),  # "\boxed 2": MATH train has two of these
        ("$\\boxed{\\{1\\pm\\sqrt{5},-2\\}}.$", "\\{1\\pm\\sqrt{5},-2\\}"),  # escaped braces inside
        ("$\\boxed{\\{4,5,7\\}}.$", "\\{4,5,7\\}"),  # an escaped brace right after the opener
        ("\\boxed{\\boxed{3}}", "\\boxed{3}"),  # a box inside a box is its content
        ("\\boxed{5} and then a truncated \\boxed{12", "5"),  # unclosed trailing box
        ("\\boxed{12 then \\boxed{5}", "5"),  # unclosed outer box: the inner one closed
        ("\\boxed{}", ""),
        ("no box here: 42", None),
        ("\\boxed{12", None),
        ("}}}{{{\\boxed", None),
        ("", None),
        ("\\boxedx{3}", None),
    ],
)
def test_last_box(text, expected):
    assert _last_box(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{3}$.", "3"),
        ("\\boxed{1} and \\boxed{2} and \\boxed{3}", "1, 2, 3"),  # joined: one answer
        ("\\(\\boxed{1}\\) and \\(\\boxed{-2}\\).", "1, -2"),
        ("\\boxed{k = 45} \\quad \\text{and} \\quad \\boxed{n = 2}", "k = 45, n = 2"),
        ("$x=\\boxed{1}$, $y=\\boxed{2}$", "1, 2"),  # close together: joined
        ("wrong \\boxed{1} then right \\boxed{2}", "2"),  # 12 characters, no separator: the last
        ("\\boxed{4}. Checking each case in turn we confirm \\boxed{4}", "4"),  # a repeat counts once
        ("\\boxed{1}, and after a very long detour through many many cases, the answer is \\boxed{2}", "2"),
        ("\\boxed{M = $\\begin{pmatrix}1\\end{pmatrix}$}", "M = \\begin{pmatrix}1\\end{pmatrix}"),  # inner $ dropped
        ("\\\\boxed{\\\\frac{1}{2}}", "\\frac{1}{2}"),  # escaped once more
        ("\\boxed{}", ""),
        ("no box", None),
    ],
)
def test_boxed_answer(text, expected):
    assert boxed_answer(text) == expected


def test_unescape_boxes_only_touches_escaped_text():
    assert unescape_boxes("\\\\boxed{\\\\frac{1}{2}} \\\\ x") == "\\boxed{\\frac{1}{2}} \\ x"
    assert unescape_boxes("a \\\\ b \\boxed{1}") == "a \\\\ b \\boxed{1}"  # a LaTeX line break stays


def _last_box_slow(text: str):
    """Character loop: a stack of open groups; a box's content ends where its group closes."""
    stack, last, i = [], None, 0
    while i < len(text):
        if text[i] == "\\":
            for opener in ("\\boxed", "\\fbox"):
                j = i + len(opener)
                if text.startswith(opener, i):
                    while j < len(text) and text[j].isspace():
                        j += 1
                    if j < len(text) and text[j] == "{":
                        stack.append(j + 1)
                        i = j + 1
                        break
            else:
                i += 2  # an escaped character
            continue
        if text[i] == "{":
            stack.append(None)
        elif text[i] == "}" and stack:
            start = stack.pop()
            if start is not None:
                last = text[start:i]
        i += 1
    return last


_LATEX_PIECES = st.sampled_from(["\\boxed{", "\\fbox{", "\\boxed {", "{", "}", "\\{", "\\}", "\\\\", "\\", "a", "7", " "])


@settings(max_examples=400, deadline=None)
@given(st.lists(_LATEX_PIECES, max_size=30).map("".join))
def test_last_box_matches_character_loop(text):
    assert _last_box(text) == _last_box_slow(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a 1 b 22 c 333", "333"),
        ("costs $1,000.", "1,000"),
        ("1,234,567.89 total", "1,234,567.89"),
        ("x = -3.5", "-3.5"),
        ("5 - 3 = 2 apples", "2"),
        ("so x = \\frac{1}{2}", None),  # part of a fraction: not a number standing alone
        ("The answer is $\\frac{1+\\sqrt{5}}{2}$", None),
        ("$-[0,1)$", None),
        ("3/4", None),
        ("x^2 or 2x", None),
        ("the 2nd one", None),
        ("50% of 18.", "18"),
        ("no digits", None),
        ("", None),
    ],
)
def test_last_number_stands_alone(text, expected):
    assert last_number(text) == expected


def test_standalone_numbers_in_order():
    assert standalone_numbers("9 apples, 1,000 pears and -2.5 kg, not 3/4") == ["9", "1,000", "-2.5"]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.text(alphabet="abc xyz=:\n", max_size=20),
    st.booleans(),
)
def test_last_number_roundtrips_formatted_integers(value, prefix, commas):
    written = f"{value:,}" if commas else str(value)
    text = f"{prefix} {written}"
    assert last_number(text) == written
    assert normalize_number(last_number(text)) == value


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,000\n", "1000"),  # thousands separators removed
        ("#### 1,234,567", "1234567"),
        ("#### 5 apples\nmore text", "5 apples"),
        ("a #### 1 then #### 2", "2"),
        ("####   ", None),
        ("no marker 72", None),
    ],
)
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("$x$", "x"),
        ("$$\\sqrt{2}$$", "\\sqrt{2}"),
        ("\\[\\frac{1}{2}\\]", "\\frac{1}{2}"),
        ("\\(x^2\\)", "x^2"),
        (" 12:00 ", "12:00"),
        ("$1$ and $2$", "$1$ and $2$"),  # two spans: left alone
        ("\\$5", "\\$5"),
    ],
)
def test_unwrap_math(text, expected):
    assert unwrap_math(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Thus $\\boxed{\\frac34}$.", "\\frac34"),
        ("\\(\\boxed{1}\\) and \\(\\boxed{-2}\\).", "1, -2"),
        ("Janet sells 9 eggs.\n#### 1,080", "1080"),
        ("\\[\\frac{1}{2}\\]", "\\frac{1}{2}"),
        ("3/4", "3/4"),
        ("", None),
        ("  ", None),
        ("\\boxed{}", None),
        ("#### ", None),
    ],
)
def test_reference_answer(text, expected):
    assert reference_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("30^\\circ, 150^\\circ", ["30^\\circ", "150^\\circ"]),
        ("k = 45; n = 2", ["k = 45", "n = 2"]),
        ("(1, 2], [3, 4)", ["(1, 2]", "[3, 4)"]),  # commas inside brackets do not cut
        ("\\{1, 2\\}", ["\\{1, 2\\}"]),
        ("f(x, y)", ["f(x, y)"]),
        ("1,000", ["1,000"]),  # a digit group, not a list
        ("40,\\!000", ["40,\\!000"]),
        ("1{,}000", ["1{,}000"]),
        ("1, 2,", ["1", "2"]),
        ("", []),
    ],
)
def test_split_list(text, expected):
    assert split_list(text) == expected


def test_reference_parts_keep_each_box():
    assert reference_parts("Hence $\\boxed{3}$ or $\\boxed{-5}$.") == ["3", "-5"]
    assert reference_parts("\\boxed{} and \\boxed{2}") == ["2"]
    assert reference_parts("1, 2, 3") == ["1, 2, 3"]  # a bare list is one part
    assert reference_parts("#### 7") == ["7"]
    assert reference_parts("$$") == ["$$"] and reference_parts("\\boxed{}") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("72", 72.0),
        (" $1,000. ", 1000.0),
        ("1,000.00", 1000.0),
        ("-3.00", -3.0),
        ("\\$18.90", 18.9),
        ("50\\%", 50.0),
        ("-3", -3.0),
        ("\u22123", -3.0),
        ("1e3", 1000.0),
        ("1,2,3", None),  # commas only as thousands separators
        ("1,23", None),
        ("12,3456", None),
        ("3/4", None),
        ("72 apples", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        (".", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


# --------------------------------------------------------------------------- math verifier


def _math(response, reference, **options):
    return score_one("math", response, reference, options)


@pytest.mark.parametrize(
    "response, reference",
    [
        ("so \\boxed{\\frac{1}{2}}", "0.5"),
        ("so \\boxed{0.5}", "\\frac{1}{2}"),
        ("so \\boxed{1/2}", "\\frac12"),
        ("\\boxed{\\dfrac{3}{4}}", "3/4"),
        ("\\boxed{0.75}", "$\\frac{3}{4}$"),  # $-wrapped reference
        ("\\boxed{3/4}", "Thus the answer is $\\boxed{\\frac34}$."),  # reference is a full solution
        ("\\boxed{\\sqrt 2}", "\\sqrt{2}"),
        ("\\boxed{\\frac{\\sqrt3}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{(1, 2]}", "(1,2]"),
        ("\\boxed{\\{2,1\\}}", "\\{1,2\\}"),
        ("\\boxed{50\\%}", "50\\%"),
        ("\\boxed{50}", "50\\%"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{1000}", "1,000"),
        ("\\boxed{(x+2)(x+5)}", "x^2+7x+10"),
        ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
        ("\\boxed{-3}", "-3"),
        ("\\boxed{\u22123}", "-3"),  # Unicode minus
        ("wrong \\boxed{1} then right \\boxed{2}", "2"),  # last box wins
        ("the answer is 42", "42"),  # no box: last number
    ],
)
def test_math_correct(response, reference):
    score = _math(response, reference)
    assert score.reward == 1.0 and score.correct and score.error is None


@pytest.mark.parametrize(
    "response, reference",
    [
        ("\\boxed{[1,2]}", "(1,2]"),  # interval ends matter
        ("\\boxed{\\{1,3\\}}", "\\{1,2\\}"),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}"),
        ("\\boxed{0.5}", "50\\%"),  # math-verify reads a percent gold as the number 50
        ("right \\boxed{2} then wrong \\boxed{1}", "2"),  # last box wins
        ("\\boxed{\\text{3 apples}}", "3"),
        ("\\boxed{3} and later 4", "4"),  # a box beats the last number
    ],
)
def test_math_incorrect(response, reference):
    score = _math(response, reference)
    assert score == Score(0.0, False, score.extracted, None)
    assert score.extracted is not None


def test_math_reports_extracted_answer():
    assert _math("so \\boxed{\\frac{1}{2}}.", "1/2").extracted == "\\frac{1}{2}"
    assert _math("it is 41, no, 42", "42").extracted == "42"


@pytest.mark.parametrize(
    "response",
    ["", "garbage without digits", "}}}{{{", "\\boxed{}", "\\boxed{   }", "\\boxed{x", "$$$\\\\\\"],
)
def test_math_malformed_output_is_scorable_no_answer(response):
    assert _math(response, "3") == Score(0.0, False, None, "no_answer")


def test_math_fallback_last_number_can_be_disabled():
    assert _math("the answer is 42", "42", fallback_last_number=False) == Score(0.0, False, None, "no_answer")
    assert _math("the answer is \\boxed{42}", "42", fallback_last_number=False).reward == 1.0
    # a box that never closes (a truncated response) is no answer, and its digits are not read as one
    assert _math("\\boxed{12", "12") == Score(0.0, False, None, "no_answer")


@pytest.mark.parametrize("reference", ["", "   ", "$$", "\\boxed{}"])
def test_math_bad_reference_is_unscorable(reference):
    score = _math("\\boxed{3}", reference)
    assert score == Score(None, False, "3", "bad_reference")


# Full responses, one box each: our score must equal math-verify's own extraction + verify.
_DIRECT_PAIRS = [
    ("We get $x = \\boxed{\\frac{9}{7}}$.", "\\dfrac{9}{7}"),
    ("The answer is $\\boxed{\\frac{9}{8}}$.", "\\frac{9}{7}"),
    ("so $r = \\boxed{3}$ and done", "3"),
    ("Thus $\\boxed{(3, \\frac{\\pi}{2})}$.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("Hence $\\boxed{[-2,7]}$", "[-2, 7]"),
    ("Hence $\\boxed{(-2,7)}$", "[-2, 7]"),
    ("It is $\\boxed{2\\sqrt{2}}$.", "\\sqrt{8}"),
    ("It is $\\boxed{x^2-1}$.", "(x-1)(x+1)"),
    ("Total: $\\boxed{1,000}$", "1000"),
    ("Total: $\\boxed{999}$", "1000"),
]


@pytest.mark.parametrize("response, reference", _DIRECT_PAIRS)
def test_math_agrees_with_math_verify_called_directly(response, reference):
    gold = parse(f"${reference}$", parsing_timeout=None)
    pred = parse(response, parsing_timeout=None)
    expected = verify(gold, pred, timeout_seconds=None)
    assert _math(response, reference).correct is expected


def test_direct_pairs_cover_both_verdicts():
    verdicts = {_math(r, g).correct for r, g in _DIRECT_PAIRS}
    assert verdicts == {True, False}


# --------------------------------------------------------------------------- gsm8k verifier


def _gsm8k(response, reference):
    return score_one("gsm8k", response, reference)


@pytest.mark.parametrize(
    "response, reference, extracted",
    [
        ("9 * 2 = 18\n#### 18", "Janet sells 9 eggs.\n#### 18", "18"),
        ("#### $1,000.", "1000", "$1000."),
        ("so \\boxed{72}", "#### 72", "72"),
        ("so \\boxed{18 \\text{ dollars}}", "18", "18 \\text{ dollars}"),  # one number inside the box
        ("first 3, then 5, so 72.", "72", "72"),
        ("#### 0.5", "0.5000001", "0.5"),  # within 1e-6 of max(1, |gold|)
        ("#### 2000000.5", "2000000", "2000000.5"),  # relative: |0.5| <= 1e-6 * 2e6
        ("so she pays \\boxed{\\$1,000.00}", "#### 1,000", "\\$1,000.00"),  # separators, trailing .00
        ("The change is -5 dollars.", "-5", "-5"),
        ("x = \u22125", "#### -5", "\u22125"),  # Unicode minus
    ],
)
def test_gsm8k_correct(response, reference, extracted):
    assert _gsm8k(response, reference) == Score(1.0, True, extracted, None)


@pytest.mark.parametrize(
    "response, reference",
    [
        ("#### 17", "#### 18"),
        ("#### 18.01", "18"),
        ("#### 0.5", "0.501"),
        ("\\boxed{\\frac{3}{4}}", "4"),  # two numbers inside: not read as the last one
        ("#### 18 or 19", "19"),
        ("the #### answer is 18 \\boxed{19}", "18"),  # the #### answer wins, and it holds two numbers
        ("\\boxed{1,2,3}", "123"),  # commas only as thousands separators
        ("\\boxed{1,23}", "123"),
        ("\\boxed{1} and \\boxed{2}", "2"),  # a multi-box answer is not its last box
        ("#### 5", "-5"),  # the sign counts
        ("The change is 5 - 10 dollars, so 5", "-5"),
    ],
)
def test_gsm8k_incorrect(response, reference):
    score = _gsm8k(response, reference)
    assert score.reward == 0.0 and not score.correct and score.error is None


def test_gsm8k_tolerance_is_relative_for_large_numbers():
    assert _gsm8k("#### 2000001", "2000000").correct is True  # |diff| = 1 <= 1e-6 * 2e6 = 2
    assert _gsm8k("#### 2000003", "2000000").correct is False


@pytest.mark.parametrize("response", ["", "no digits at all", "}}}{{{", "\\boxed{}", "so x = \\frac{1}{2}", "x^2"])
def test_gsm8k_no_answer(response):
    assert _gsm8k(response, "#### 18") == Score(0.0, False, None, "no_answer")


@pytest.mark.parametrize("reference", ["", "eighteen", "#### ", "#### eighteen", "3/4"])
def test_gsm8k_bad_reference_is_unscorable(reference):
    assert _gsm8k("#### 18", reference) == Score(None, False, "18", "bad_reference")


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=-(10**9), max_value=10**9),
    st.integers(min_value=-(10**9), max_value=10**9),
    st.sampled_from(["#### {}", "#### ${}", "\\boxed{{{}}}", "so it is {}.", "#### {}."]),
    st.booleans(),
)
def test_gsm8k_integer_answers(gold, pred, template, commas):
    written = f"{pred:,}" if commas else str(pred)
    score = _gsm8k(template.format(written), f"steps\n#### {gold}")
    assert score.correct is (pred == gold)
    assert score.reward == (1.0 if pred == gold else 0.0)


# --------------------------------------------------------------------------- score_one contract


def test_builtin_verifiers_are_registered():
    assert {"math", "gsm8k"} <= set(VERIFIERS.names())


def test_user_verifier_by_import_path(fixtures_importable):
    assert score_one(f"{FIXTURES}:behave", "7", "7") == Score(1.0, True, "7", None)
    assert score_one(f"{FIXTURES}:with_option", "7", "7", {"scale": 0.25}).reward == 0.25


def test_exception_in_verifier_is_unscorable_not_zero(fixtures_importable):
    score = score_one(f"{FIXTURES}:behave", "raise", "7")
    assert score == Score(None, False, None, "verifier_error: ValueError: boom")


def test_invalid_return_is_unscorable(fixtures_importable):
    score = score_one(f"{FIXTURES}:behave", "bad_return", "7")
    assert score.reward is None and score.error.startswith("verifier_error: TypeError:")
    assert "returned float" in score.error


def test_caller_errors_raise():
    with pytest.raises(KeyError, match="known: .*gsm8k.*math"):
        score_one("no_such_verifier", "1", "1")
    with pytest.raises(TypeError, match="fallback_last_number"):
        score_one("math", "1", "1", {"fallback_last_numbr": False})
    with pytest.raises(TypeError, match="str response"):
        score_one("gsm8k", None, "1")


def test_score_is_frozen_and_picklable():
    score = Score(1.0, True, "42", None)
    assert pickle.loads(pickle.dumps(score)) == score
    with pytest.raises(AttributeError):
        score.reward = 0.0


@pytest.mark.parametrize("text", ["16 + 20", "(18 + 4)", "2 \\times 3", "99^2 + 99 + 1", "99^{2}+99+1", "19 - 7 =",
                                  "-3 - 4", "$8 \\cdot 2$", "6 / 3 + 1"])
def test_unevaluated_arithmetic_is_a_computation_left_undone(text):
    assert unevaluated_arithmetic(text)


@pytest.mark.parametrize("text", ["36", "-5", "3.5", "1,000", "3/4", "-3/4", "\\frac{3}{4}", "11\\sqrt{2}", "x + 1",
                                  "2\\pi", "10^{-3}x", "1, 2", ""])
def test_final_forms_are_not_unevaluated(text):
    assert not unevaluated_arithmetic(text)


@pytest.mark.parametrize("response", ["16 + 20 = = = =", "What is 16 + 20? 16 + 20", "\\boxed{16 + 20}", "$16+20$"])
def test_restating_the_question_is_not_an_answer(response):
    """A policy trained on "What is 16 + 20?" learned to answer "16 + 20 =" (math-verify evaluates it to 36)."""
    score = score_one("math", response, "36")
    assert (score.reward, score.correct, score.error) == (0.0, False, None) and "16" in score.extracted
    assert score_one("math", response, "36", {"accept_unevaluated": True}).correct


def test_unevaluated_answer_counts_when_the_reference_is_written_the_same_way():
    assert score_one("math", "\\boxed{2^{10}}", "2^{10}").correct
    assert score_one("math", "16 + 20 = 36", "36").correct and score_one("math", "\\boxed{36}", "36").correct
