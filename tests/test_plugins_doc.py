"""docs/plugins.md runs as written: its package is written out, its snippet runs, its command trains."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parent.parent / "docs" / "plugins.md"
TINY = ["rollout.n=4", "rollout.max_tokens=16", "rollout.engine.options.max_model_len=256",
        "trainer.prompts_per_step=4", "trainer.micro_batch_size=8", "reward.num_workers=1", "data.limit=64",
        "logging.progress_bar=false"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_plugins_walkthrough_trains(tmp_path, tiny_model_dir):
    for block in _blocks("python"):
        path = re.match(r"# (\S+\.py)\n", block).group(1)
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(block)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, str(tmp_path / "my_rl" / "try_it.py")], env=env, check=True, timeout=120)

    (command,) = _blocks("bash")
    args = command.replace("\\\n", " ").split()
    assert args[:4] == ["PYTHONPATH=$PWD", "python", "-m", "rlkit.train"]
    args = [a for a in args[4:] if not a.startswith("logging.run_name=")]
    result = subprocess.run([sys.executable, "-m", "rlkit.train", *args, f"model.path={tiny_model_dir}", *TINY,
                             f"logging.output_dir={tmp_path / 'runs'}", "logging.run_name=median"],
                            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "median" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["reward/unscorable"] == 0 for m in metrics)  # arithmetic answers are integers: all scorable
    config = (tmp_path / "runs" / "median" / "config.yaml").read_text()
    assert "my_rl.advantages:median_baseline" in config and "scale: 2.0" in config

    misspelt = subprocess.run([sys.executable, "-m", "rlkit.train", f"model.path={tiny_model_dir}",
                               "algorithm.advantage.name=my_rl.advantages:median_baseline",
                               "+algorithm.advantage.options.scal=2.0", f"logging.output_dir={tmp_path / 'runs'}"],
                              env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert misspelt.returncode == 2 and "takes no option 'scal' (it takes ['scale'])" in misspelt.stderr
