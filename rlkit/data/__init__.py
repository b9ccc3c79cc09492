"""Dataset rows, prompts and the resumable prompt stream."""
from rlkit.data.arithmetic import load_arithmetic
from rlkit.data.prompts import BOXED_TEMPLATE, build_prompt, format_question
from rlkit.data.sources import DataError, load_rows
from rlkit.data.stream import PromptStream

__all__ = [
    "BOXED_TEMPLATE",
    "DataError",
    "PromptStream",
    "build_prompt",
    "format_question",
    "load_arithmetic",
    "load_rows",
]
