"""How the verifiers read an answer outside a box, in other scripts, and with LaTeX digit groups (issue 21).

Each case below scored wrong before: garbage rewarded through a number glued to an operator, full-width
digits unscorable, thousands separators and a final statement after intermediate boxes scored 0.
"""
from __future__ import annotations

import logging

import pytest

from rlkit.reward import Score, score_one
from rlkit.reward.extract import final_statement, stands_alone
from rlkit.reward.normalize import fold_unicode, join_digit_groups

logging.getLogger("math_verify").setLevel(logging.ERROR)

# --------------------------------------------------------------------------- 1. an answer must stand alone

# Responses to "What is 2 - 0?": the first two from a 2-step `+recipe=fr3e` run, scored 1.0 (extracted `2`).
GARBAGE = [
    "2**undef\n\\adddots \u2013 [1]",
    "2**undef \u2026 blackface \u2026 +2 ++2 \u2026",
    "2**undef",
    "2abc xyz",
    "2x",
    "=2**",
    "**2**undef",
    "2^undef [[",
    "2-undef",
    "2_undef",
    "What is 2 - 0? 2**undef",  # the question echoed, then the glued number last
    "12**3 2**undef",
    "$$ 2**undef",
    "answer: 2**undef",
    "The answer is 2**undef",
    "Final answer is 2** blah",
]


@pytest.mark.parametrize("response", GARBAGE)
def test_a_number_glued_to_an_operator_or_letter_is_no_answer(response):
    assert score_one("math", response, "2").reward == 0.0
    assert score_one("gsm8k", response, "2").reward == 0.0


@pytest.mark.parametrize(
    "response",
    ["the answer is 2", "so 2.", "**2**", "$2$", "x = 2", "so it is \\(2\\)", "Answer: 2 apples", "we get 2, done",
     "The final answer is 2. I hope it is correct.", "2 - 0 = 2"],
)
def test_a_number_that_stands_alone_is_still_read(response):
    for verifier in ("math", "gsm8k"):
        score = score_one(verifier, response, "2")
        assert score == Score(1.0, True, score.extracted, None), verifier


def test_stands_alone_judges_the_last_place_the_value_is_written():
    assert stands_alone("so it is 10,455.", "10455")
    assert stands_alone("we get -3 now", "-3")
    assert not stands_alone("2 - 0, so 2x", "2")  # stood alone once, glued where it is last written
    assert not stands_alone("no such value", "3")
    assert stands_alone("the answer is **2**.", "2") and not stands_alone("**2**undef", "2")  # bold does not glue


# --------------------------------------------------------------------------- 2. other scripts' digits

@pytest.mark.parametrize(
    "response, reference",
    [("\\boxed{\uff14}", "4"), ("\uff11\uff19", "19"), ("\\boxed{\u0664\u0662}", "42"), ("\\boxed{4}", "\uff14")],
)
def test_full_width_and_other_digits_are_read_as_digits(response, reference):
    for verifier in ("math", "gsm8k"):
        assert score_one(verifier, response, reference).reward == 1.0


UNICODE_HEAVY = [
    "\u7b54\u6848\u662f \uff14\uff12 \U0001f600 \u05e9\u05dc\u05d5\u05dd",  # CJK, full-width digits, emoji, Hebrew
    "\u0627\u0644\u062c\u0648\u0627\u0628 \u0647\u0648 \u0664\u0662",  # Arabic with Arabic-Indic digits
    "\\boxed{\U0001f600}",
    "\u7b54\u3048\uff1a$\\boxed{\uff14\uff12}$\u3002",
    "\u200f\u0664\u0662\u200e \u202e42\u202c",  # RTL marks and overrides
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f 42\u20e3",  # joiners, variation selector, keycap
    "x\u00b2 = \u00bd \u2026 \ufb01",
    "\\boxed{\u5341}",
]


@pytest.mark.parametrize("response", UNICODE_HEAVY)
def test_unicode_heavy_responses_score_zero_or_their_answer_never_an_error(response):
    for verifier in ("math", "gsm8k"):
        score = score_one(verifier, response, "42")
        assert score.reward in (0.0, 1.0) and score.error in (None, "no_answer"), (verifier, score)


def test_fold_unicode_keeps_what_would_fuse_with_its_neighbour():
    assert fold_unicode("\\boxed{\uff14} \uff08\uff11\uff09") == "\\boxed{4} (1)"
    assert fold_unicode("x\u00b2 + 1\u00bd") == "x\u00b2 + 1\u00bd"  # not "x2 + 11/2"


# --------------------------------------------------------------------------- 3. digit groups, final statements

@pytest.mark.parametrize(
    "response, reference",
    [
        ("... is $\\boxed{32,\\! 349}$", "32349"),
        ("$\\boxed{11,\\! 111,\\! 111,\\! 100}$", "11111111100"),
        ("$\\boxed{32{,}349}$", "32349"),
        ("$\\boxed{32\\,349}$", "32349"),  # math-verify: 32 + 349
        ("so the total is $32,\\! 349$.", "32349"),
        ("\\boxed{32349}", "32,\\! 349"),
    ],
)
def test_latex_thousands_separators(response, reference):
    for verifier in ("math", "gsm8k"):
        assert score_one(verifier, response, reference).reward == 1.0


def test_join_digit_groups_only_joins_groups_of_three():
    assert join_digit_groups("32,\\! 349 and 1{,}000{,}000") == "32349 and 1000000"
    assert join_digit_groups("(1,\\!5), 2\\,x, 1,000, 12\\,34") == "(1,\\!5), 2\\,x, 1,000, 12\\,34"


# A solution that boxes partial results and ends with Minerva's final line (the example, shortened).
PARTIAL_BOXES = (
    "The first part is $\\boxed{200}$. Then the second part is $\\boxed{255}$, and the rest follows.\n"
    "Final Answer: The final answer is $10,455$. I hope it is correct."
)


def test_a_final_statement_after_the_last_box_wins():
    assert score_one("math", PARTIAL_BOXES, "10455") == Score(1.0, True, "10,455", None)
    assert score_one("math", PARTIAL_BOXES, "255").reward == 0.0
    assert score_one("math", "\\boxed{4}\nThe final answer is $5$.", "4").reward == 0.0  # a hedge after the box


def test_a_box_after_the_statement_or_an_empty_statement_leaves_the_box():
    assert score_one("math", "The final answer is $3$, no: \\boxed{4}", "4").reward == 1.0
    assert score_one("math", "\\boxed{2}. The final answer is 2**undef", "2").reward == 1.0
    assert score_one("math", PARTIAL_BOXES, "255", {"fallback_last_number": False}).reward == 1.0


def test_final_statement_is_the_text_after_the_last_box():
    assert final_statement(PARTIAL_BOXES).startswith("Final Answer: The final answer is $10,455$.")
    assert final_statement("The final answer is \\boxed{3}") is None
    assert final_statement("The final answer is 3") is None  # no box: read as any unboxed response
