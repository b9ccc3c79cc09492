"""`python -m rlkit.train` as a user meets it: its own --help, resolved --cfg, one-line refusals."""
import re
import subprocess
import sys

import pytest

from rlkit.cli import hydra_argv, refusal
from rlkit.config import compose
from rlkit.train import EXAMPLES, help_text


def _cli(*args, **env):
    import os

    return subprocess.run([sys.executable, "-m", "rlkit.train", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_help_lists_groups_recipes_examples_and_run_directory():
    result = _cli("--help")
    assert result.returncode == 0 and "Powered by Hydra" not in result.stdout
    text = result.stdout
    for choice in ("data=arithmetic *", "data=file", "data=gsm8k", "rollout=vllm *", "rollout=hf", "reward=math *"):
        assert f"\n  {choice} " in text
    assert "+recipe=dapo" in text and "DAPO (arXiv 2503.14476)" in text and "@package" not in text
    assert len(EXAMPLES) == 5 and all(f"  python -m rlkit.train {o}\n" in text for o, _ in EXAMPLES)
    assert "logging.output_dir" in text and "logging.run_name" in text
    assert "--cfg job" in text and "docs" in text and "--hydra-help" in text


def test_every_choice_and_recipe_is_described():
    text = help_text()
    start, end = text.index("Config groups"), text.index("Examples")
    entries = [line.split(maxsplit=2) for line in text[start:end].splitlines() if line.startswith("  ")]
    assert len(entries) >= 10
    undescribed = [e[0] for e in entries if len(e) < 2 or (e[1] == "*" and len(e) < 3)]
    assert not undescribed, f"give these files a first comment line: {undescribed}"


def test_help_loads_no_model_code():
    code = ("import sys; sys.argv = ['rlkit.train', '-h']; from rlkit.train import main; main(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_help_reads_new_choices_and_recipes_from_disk(tmp_path):
    configs, recipes = tmp_path / "configs", tmp_path / "recipes"
    for folder in (configs / "data", configs / "base", configs / "logging", recipes):
        folder.mkdir(parents=True)
    (configs / "config.yaml").write_text("defaults:\n  - data: tiny  # the data\n  - logging: plain  # logs\n")
    (configs / "logging" / "plain.yaml").write_text("output_dir: out  # root\nrun_name: x-${seed}  # name\n")
    (configs / "data" / "tiny.yaml").write_text("# Ten rows for smoke tests.\nsource: x  # where\n")
    (configs / "data" / "big.yaml").write_text("# A million rows.\nsource: y  # where\n")
    (configs / "base" / "data.yaml").write_text("# Keys shared by data choices.\nsplit: train  # split\n")
    (recipes / "mine.yaml").write_text("# @package _global_\n# My method (my paper, 2026).\nseed: 1  # seed\n")
    text = help_text(configs, recipes)
    assert re.search(r"\n  data=tiny \* +Ten rows for smoke tests\.\n", text)
    assert re.search(r"\n  data=big +A million rows\.\n", text)
    assert re.search(r"\n  \+recipe=mine +My method \(my paper, 2026\)\.\n", text)
    assert "base=" not in text  # shared base files are not choices
    assert "(default: out/x-${seed}/)" in text


@pytest.mark.parametrize("overrides, what", EXAMPLES)
def test_every_help_example_composes(overrides, what):
    compose(overrides.split())


def test_hydra_help_still_works():
    result = _cli("--hydra-help")
    assert result.returncode == 0 and "== Flags ==" in result.stdout and "--cfg" in result.stdout


def test_cfg_job_shows_resolved_values(tmp_path):
    result = _cli("--cfg", "job", RLKIT_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "${" not in result.stdout and f"path: {tmp_path}/models/" in result.stdout


def test_hydra_argv_adds_resolve_to_cfg_only():
    assert hydra_argv(["--cfg", "job", "rollout.n=4"]) == ["--cfg", "job", "rollout.n=4", "--resolve"]
    assert hydra_argv(["-c", "all", "--resolve"]) == ["-c", "all", "--resolve"]
    assert hydra_argv(["rollout.n=4"]) == ["rollout.n=4"]


def test_refusal_is_one_line():
    err = ValueError("data.answer_column: column 'answer' not in my.jsonl (columns: question, solution).\n"
                     "Fix: set data.answer_column=solution")
    assert refusal("bad config/data", err) == ("rlkit: bad config/data: data.answer_column: column 'answer' not in "
                                               "my.jsonl (columns: question, solution). Fix: set "
                                               "data.answer_column=solution")


def test_data_error_is_one_line_before_any_model_loads(tmp_path):
    data = tmp_path / "qs.jsonl"
    data.write_text('{"question": "1+1?", "solution": "2"}\n')
    not_a_model = tmp_path / "model"  # passes validation, fails any tokenizer or model load
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    result = _cli(f"model.path={not_a_model}", "data=file", f"data.source={data}", f"logging.output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rlkit: bad config/data: data.answer_column: ") and "solution" in last and "Fix: " in last

