"""Dataset rows, prompts and the resumable prompt stream."""
from rlkit.data.arithmetic import load_arithmetic
from rlkit.data.prompts import BOXED_TEMPLATE, build_prompt, format_question
from rlkit.data.sources import extract_gsm8k_answer, extract_last_boxed, load_rows
from rlkit.data.stream import PromptStream

__all__ = [
    "BOXED_TEMPLATE",
    "PromptStream",
    "build_prompt",
    "extract_gsm8k_answer",
    "extract_last_boxed",
    "format_question",
    "load_arithmetic",
    "load_rows",
]
