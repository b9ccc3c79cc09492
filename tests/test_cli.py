"""`python -m rlkit.train` as a user meets it: its own --help, resolved --cfg, one-line refusals."""
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from rlkit.cli import hydra_argv, refusal
from rlkit.config import compose
from rlkit.reward.client import RewardClient, RewardServiceError
from rlkit.reward.service import ServiceSettings
from rlkit.train import EXAMPLES, help_text


def _cli(*args, **env):
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


def _described(text: str) -> dict[str, str]:
    """{choice or recipe: its description} from --help's two-column rows, wrapped lines joined."""
    start, end = text.index("Config groups"), text.index("Examples")
    rows = {}
    for line in text[start:end].splitlines():
        if line.startswith("   "):  # a wrapped description goes on under its row
            rows[last] += " " + line.strip()
        elif line.startswith("  "):
            last, _, what = line.strip().partition(" ")
            rows[last] = what.strip().removeprefix("* ")
    return rows


def test_every_choice_and_recipe_is_described():
    rows = _described(help_text())
    assert len(rows) >= 10
    undescribed = [left for left, what in rows.items() if not what]
    assert not undescribed, f"give these files a first comment line: {undescribed}"


def test_help_shows_whole_sentences():
    rows = _described(help_text())
    assert rows["+recipe=fr3e"].endswith("explore from the uncertain positions of a few base responses.")
    assert rows["+recipe=grpo_lambda"].endswith("a length reward for the best-solved groups, then GRPO.")
    assert rows["+recipe=dr_grpo"].startswith("Dr. GRPO (arXiv 2503.20783): no std normalisation")
    cut = [left for left, what in rows.items() if not what.endswith((".", ".)"))]
    assert not cut, f"descriptions cut mid-sentence: {cut}"
    text = help_text()
    assert max(len(line) for line in text[text.index("Config groups"):text.index("Examples")].splitlines()) <= 120


def test_help_states_the_default_jobs_time_memory_and_disk():
    text = " ".join(help_text().split())
    assert compose([]).trainer.total_steps == 40  # the job these numbers were measured on
    for fact in ("40 steps", "about 25 minutes of steps", "peak RSS of about 7.5 GiB", "3.8 GB on disk", "2-core CPU"):
        assert fact in text
    assert "WANDB_MODE=offline" in text


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


def _not_a_model(tmp_path):
    """Passes validation, fails any tokenizer or model load: a refusal that comes after a load shows a traceback."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_reward_service_without_a_server_is_refused_in_seconds_before_any_model_loads(tmp_path):
    port = _free_port()
    code = ("import sys; from rlkit.train import main\ntry: main()\nexcept SystemExit as e: code = e.code\n"
            "assert 'transformers' not in sys.modules and 'vllm' not in sys.modules; sys.exit(code)")
    argv = ["rlkit.train", f"model.path={_not_a_model(tmp_path)}", f"logging.output_dir={tmp_path}",
            f"reward.url=http://127.0.0.1:{port}"]
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = {argv!r}\n{code}"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - start < 20  # was 40 s: 28 of them retrying the refused connection
    assert result.stderr.strip().splitlines() == [
        f"rlkit: bad config: reward.url: nothing is listening at http://127.0.0.1:{port} (connection refused). "
        f"Fix: start `python -m rlkit.reward.serve --port {port}` there first, or set reward.url=null to score "
        f"in-process"]


def test_client_check_does_not_retry_a_refused_connection():
    with RewardClient(f"http://127.0.0.1:{_free_port()}", verifier="math", retries=3, backoff_s=5.0) as client:
        with pytest.raises(RewardServiceError, match="cannot be reached") as caught:
            client.check()
        assert caught.value.refused and client.stats["retries"] == 0


@pytest.mark.parametrize("token, problem", [(None, "wants a token and $RLKIT_REWARD_TOKEN is unset"),
                                            ("wrong", "refused the token in $RLKIT_REWARD_TOKEN")])
def test_reward_service_token_refusal_names_the_variable(tmp_path, token, problem):
    from test_reward_service import running

    env = {k: v for k, v in os.environ.items() if k != "RLKIT_REWARD_TOKEN"}
    if token:
        env["RLKIT_REWARD_TOKEN"] = token
    with running(ServiceSettings(workers=1, token="s3cret-token")) as (url, _):
        result = subprocess.run([sys.executable, "-m", "rlkit.train", f"model.path={_not_a_model(tmp_path)}",
                                 f"logging.output_dir={tmp_path}", f"reward.url={url}"], capture_output=True,
                                text=True, timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not result.stdout.strip(), result.stdout  # was: httpx's "HTTP Request: POST ... 401" line
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"rlkit: bad config: reward.token_env: the reward service at {url} {problem}. Fix: "
                           f"export RLKIT_REWARD_TOKEN=") and "as token=" not in line
