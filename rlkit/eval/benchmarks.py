"""Benchmarks by name: rows and prompt ids for each entry of `eval.benchmarks` (docs/eval.md).

A name is a key of `eval.suite` (arithmetic, gsm8k, math500, math, or one added in the config), or a
local .jsonl/.json/.parquet path or Hugging Face dataset name, read with the `eval.file` keys.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from rlkit.errors import ConfigError
from rlkit.data import build_prompt, format_question, load_rows
from rlkit.data.sources import LOCAL_SUFFIXES

RESERVED = "overall"  # the metrics key of the mean over benchmarks


@dataclass(frozen=True)
class Benchmark:
    """One benchmark, ready to sample.

    name: the metrics key (`eval/<name>/...`).
    key: the config node it was read from (`eval.suite.gsm8k`, `eval.file`).
    rows: [P] dataset rows {"question", "answer", "meta"}.
    prompts: [P] prompt token ids; texts: [P] the user message of each prompt (template applied).
    """

    name: str
    key: str
    rows: list[dict]
    prompts: list[list[int]]
    texts: list[str]


def resolve(name: str, suite: Mapping, file: Mapping) -> tuple[str, str, dict]:
    """(metrics name, config key, data settings) of benchmark `name`; ConfigError naming the known ones."""
    if name in suite:
        return name, f"eval.suite.{name}", dict(suite[name])
    if name.lower().endswith(LOCAL_SUFFIXES) or Path(name).is_file():
        return _metric_name(Path(name).stem), "eval.file", {**file, "source": name}
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", name):
        return _metric_name(name), "eval.file", {**file, "source": name}
    raise ConfigError(
        f"eval.benchmarks: unknown benchmark {name!r}; known: {', '.join(sorted(suite))}. Fix: use a known name, "
        f"a .jsonl/.json/.parquet path or an HF dataset name (owner/name, read with eval.file.*), "
        f"or define it with +eval.suite.{name}.source=..."
    )


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "file"


def subset(rows: list[dict], limit: int | None, *, shuffle: bool, seed: int) -> list[dict]:
    """At most `limit` rows: the first ones, or (shuffle) a random subset fixed by `seed`, kept in source order."""
    if limit is None or limit >= len(rows):
        return rows
    if not shuffle:
        return rows[:limit]
    keep = sorted(random.Random(f"rlkit-eval:{seed}").sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


# load_rows names the training keys (data.answer_column, ...); an eval benchmark reads them from its own node.
_DATA_KEY = re.compile(r"(?<![\w/.-])data\.(?=source|split|prompt_column|answer_column|answer_format|skip_invalid|limit|template|options)")


def load_benchmark(name: str, eval_cfg: Mapping, tokenizer) -> Benchmark:
    """Rows and prompts of benchmark `name` under the settings of the `eval:` block (a plain mapping)."""
    metric_name, key, data = resolve(name, eval_cfg["suite"], eval_cfg["file"])
    if metric_name == RESERVED:
        raise ConfigError(f"{key}: the name {RESERVED!r} is taken by the mean over benchmarks. Fix: rename it")
    try:
        rows = load_rows(data["source"], split=data["split"], prompt_column=data["prompt_column"],
                         answer_column=data["answer_column"], answer_format=data["answer_format"],
                         limit=data["limit"], seed=eval_cfg["seed"], skip_invalid=data["skip_invalid"],
                         options=data["options"])
        rows = subset(rows, eval_cfg["limit"], shuffle=eval_cfg["shuffle"], seed=eval_cfg["seed"])
        texts = [format_question(row["question"], data["template"]) for row in rows]
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        message = _DATA_KEY.sub(key + ".", str(err))
        raise ConfigError(message if message.startswith(key) else f"{key}: {message}") from None
    if not rows:
        raise ConfigError(f"{key}: benchmark {name!r} has no rows. Fix: check its source, split and limit")
    prompts = [build_prompt(tokenizer, row["question"], template=data["template"], system_prompt=data["system_prompt"],
                            use_chat_template=data["use_chat_template"]) for row in rows]
    return Benchmark(metric_name, key, rows, prompts, texts)
