"""One `python -m rlkit.eval` job from a composed config: model, engine, verifier, evaluation, outputs."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlkit.config import CONFIG_DIR, ConfigError, register_resolvers, spec_at
from rlkit.eval.evaluator import BenchmarkResult, Evaluator, eval_settings, load_benchmarks
from rlkit.eval import report
from rlkit.logs import route_library_logs


def compose(overrides: list[str] = ()) -> DictConfig:
    """The config `python -m rlkit.eval OVERRIDES...` would run, for use from Python (tests, notebooks)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("eval", overrides=list(overrides))


def resolve_model_path(path: str) -> str:
    """The folder holding the model's config.json: `path` itself (an HF folder or a run's final/), its model/
    (a checkpoints/step_N/ folder), its final/ (a run directory), or the merged/ of either (a LoRA run exported
    with model.lora.merge_on_export=true). A string that is no local path is an HF name."""
    local = Path(path).expanduser()
    if not local.exists():
        if path.startswith(("/", ".", "~")) or path.count("/") != 1:
            raise ConfigError(f"model.path: {path} does not exist. Fix: give an HF model folder or name, a run's "
                              f"final/ or a runs/<name>/checkpoints/step_N/ folder")
        return path
    for folder in (local, local / "model", local / "final", local / "merged", local / "final" / "merged"):
        if (folder / "config.json").is_file():
            return str(folder)
    adapter = next((f for f in (local, local / "final", local / "model") if (f / "adapter_config.json").is_file()), None)
    if adapter is not None:
        raise ConfigError(f"model.path: {adapter} holds a LoRA adapter, not a model. Fix: train with "
                          "model.lora.merge_on_export=true and evaluate its final/merged/ folder")
    raise ConfigError(f"model.path: {path} holds no config.json, nor does its model/ or final/. Fix: point "
                      f"model.path at an HF model folder, a run's final/ or a checkpoints/step_N/ folder")


def run_job(cfg: DictConfig, *, progress: bool = True) -> list[BenchmarkResult]:
    """Evaluate `cfg.model.path` on `cfg.eval.benchmarks`; print the table and write the outputs to
    `cfg.eval.output_dir`. Settings, model path and benchmarks are checked before the engine starts."""
    settings = eval_settings(cfg)
    model_path = resolve_model_path(cfg.model.path)
    from transformers import AutoTokenizer  # heavy imports after the checks: a refusal comes back at once

    from rlkit.reward.scorer import make_scorer
    from rlkit.rollout import GenerationShape, make_engine

    out_dir = Path(settings.block["output_dir"])
    route_library_logs(out_dir)  # vLLM and transformers chatter goes to <output_dir>/train.log
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    benchmarks = load_benchmarks(settings, tokenizer)
    sampling = settings.sampling
    scorer = make_scorer(spec_at(cfg, "reward.verifier"), OmegaConf.to_container(cfg.reward, resolve=True))
    try:
        shape = GenerationShape(tuple(len(p) for b in benchmarks for p in b.prompts), settings.batch_size, sampling.n,
                                sampling.max_tokens)  # one call: batch_size prompts x n (sizes an auto KV cache)
        engine = make_engine(spec_at(cfg, "rollout.engine"), model_path, cfg.rollout.dtype or cfg.model.dtype, shape)
        try:
            results = Evaluator(cfg, tokenizer, engine, scorer, benchmarks=benchmarks, progress=progress).evaluate()
        finally:
            engine.close()
    finally:
        scorer.close()
    report.write(out_dir, results, config=OmegaConf.to_container(cfg, resolve=True), settings={
        "model_path": cfg.model.path, "resolved_model_path": model_path, "benchmarks": list(settings.benchmarks),
        "n": sampling.n, "k": list(settings.ks), "temperature": sampling.temperature, "top_p": sampling.top_p,
        "top_k": sampling.top_k, "max_tokens": sampling.max_tokens, "limit": settings.block["limit"],
        "shuffle": settings.block["shuffle"], "seed": sampling.seed,
        "engine": spec_at(cfg, "rollout.engine").name, "verifier": spec_at(cfg, "reward.verifier").name,
    })
    print(report.table(results))
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'samples.jsonl'}")
    return results
