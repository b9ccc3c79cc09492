"""Verifier core on CPU: answer extraction, the math and gsm8k verifiers, score_one's error contract."""
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from math_verify import parse, verify

from rlkit.reward import VERIFIERS, Score, score_one
from rlkit.reward.extract import find_numbers, gsm8k_reference, last_boxed, last_number, normalize_number

FIXTURES = "verifier_fixtures"


@pytest.fixture
def fixtures_importable(monkeypatch):
    """Make tests/verifier_fixtures.py importable by name, however pytest set up sys.path."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}", "3"),  # last wins
        ("\\fbox{7}", "7"),
        ("\\boxed {5}", "5"),  # space before the brace
        ("$\\boxed{\\{1\\pm\\sqrt{5},-2\\}}.$", "\\{1\\pm\\sqrt{5},-2\\}"),  # escaped braces inside
        ("\\boxed{\\boxed{3}}", "\\boxed{3}"),  # the box that closes last is the outer one
        ("\\boxed{5} and then a truncated \\boxed{12", "5"),  # unclosed trailing box
        ("\\boxed{12 then \\boxed{5}", "5"),  # unclosed outer box: the inner one closed
        ("\\boxed{}", ""),
        ("no box here: 42", None),
        ("\\boxed{12", None),
        ("}}}{{{\\boxed", None),
        ("", None),
        ("\\\\boxed{3}", None),  # "\\" is a LaTeX line break, then plain text "boxed"
        ("\\boxedx{3}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def _last_boxed_slow(text: str):
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
def test_last_boxed_matches_character_loop(text):
    assert last_boxed(text) == _last_boxed_slow(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a 1 b 22 c 333", "333"),
        ("costs $1,000.", "1,000"),
        ("1,234,567.89 total", "1,234,567.89"),
        ("x = -3.5", "-3.5"),
        ("about .5 of it", ".5"),
        ("3/4", "4"),
        ("list 1,2,3", "3"),
        ("1,2345", "2345"),  # not a thousands group
        ("no digits", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_find_numbers_in_order():
    assert find_numbers("9 apples, 1,000 pears and -2.5 kg") == ["9", "1,000", "-2.5"]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.text(alphabet="abc xyz=.:\n", max_size=20),
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
        ("#### 1,000\n", "1,000"),
        ("#### 5 apples\nmore text", "5 apples"),
        ("a #### 1 then #### 2", "2"),
        ("####   ", None),
        ("no marker 72", None),
    ],
)
def test_gsm8k_reference(text, expected):
    assert gsm8k_reference(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("72", 72.0),
        (" $1,000. ", 1000.0),
        ("\\$18.90", 18.9),
        ("50\\%", 50.0),
        ("-3", -3.0),
        ("\u22123", -3.0),
        ("1e3", 1000.0),
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
    # an unclosed box (a truncated response) falls back to the last number only when allowed
    assert _math("\\boxed{12", "12").reward == 1.0
    assert _math("\\boxed{12", "12", fallback_last_number=False).error == "no_answer"


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
        ("#### $1,000.", "1000", "$1,000."),
        ("so \\boxed{72}", "#### 72", "72"),
        ("so \\boxed{18 \\text{ dollars}}", "18", "18 \\text{ dollars}"),  # one number inside the box
        ("first 3, then 5, so 72.", "72", "72"),
        ("#### 0.5", "0.5000001", "0.5"),  # within 1e-6 of max(1, |gold|)
        ("#### 2000000.5", "2000000", "2000000.5"),  # relative: |0.5| <= 1e-6 * 2e6
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
        ("the #### answer is 18 \\boxed{19}", "18"),  # the #### answer wins
    ],
)
def test_gsm8k_incorrect(response, reference):
    score = _gsm8k(response, reference)
    assert score.reward == 0.0 and not score.correct and score.error is None


def test_gsm8k_tolerance_is_relative_for_large_numbers():
    assert _gsm8k("#### 2000001", "2000000").correct is True  # |diff| = 1 <= 1e-6 * 2e6 = 2
    assert _gsm8k("#### 2000003", "2000000").correct is False


@pytest.mark.parametrize("response", ["", "no digits at all", "}}}{{{", "\\boxed{}"])
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
