"""The job's launch as its launcher's environment describes it, read before anything starts (docs/distributed.md):
how many processes, how the trained model is laid out over them, and what that refuses."""
from __future__ import annotations

import os

LAUNCH_KEY = "accelerate launch config"  # the refusals of the launch name its file's keys
LORA_FSDP2 = (f"model.lora.enabled: LoRA is not supported under FSDP2 ({LAUNCH_KEY} fsdp_version: 2): the merged "
              "weights pushed to the engine and the adapter's checkpoint would need the sharded LoRA factors "
              "gathered, which rlkit does not do (untested). Fix: launch LoRA data-parallel "
              "(configs/accelerate/ddp.yaml, or torchrun on CPU), where every rank holds the small adapter whole")


def world_size() -> int:
    """Processes of this job, as its launcher (accelerate launch, torchrun) sets WORLD_SIZE; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharding() -> str | None:
    """"fsdp2", "fsdp1" or "deepspeed" as `accelerate launch` says in the environment it gives each process
    (ACCELERATE_USE_FSDP with FSDP_VERSION, ACCELERATE_USE_DEEPSPEED); None: every rank holds the whole model."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    return None


def launch_problem(cfg, plugins: dict[str, tuple[str, object]]) -> str | None:
    """The first thing this launch refuses in `cfg` ("key: problem. Fix: ..."), or None.

    plugins: config key -> (name, `rlkit.registry.Capabilities`) of every plug point's choice. Refused: DeepSpeed,
    FSDP1; prompts that do not split over the ranks; a single-process plug-in on several ranks; under FSDP2, fp16
    and a plug-in that reads the LM head or the optimizer state, and LoRA.
    """
    world, shard, prompts = world_size(), sharding(), cfg.trainer.prompts_per_step
    if shard == "deepspeed":
        return (f"{LAUNCH_KEY} (distributed_type: DEEPSPEED): DeepSpeed ZeRO reduces and partitions each gradient "
                "inside backward, and accelerate's backward steps its optimizer, so rlkit cannot divide the "
                "mini-batch's gradient by its global normaliser (known after the last micro-batch's token mask). "
                "Fix: launch with configs/accelerate/fsdp2.yaml, which shards the same state and keeps the gradient")
    if shard not in (None, "fsdp2"):
        return (f"{LAUNCH_KEY} (fsdp_version): {shard} is not supported, rlkit shards with FSDP2 (fully_shard). "
                "Fix: set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
    if shard == "fsdp2" and cfg.trainer.mixed_precision == "fp16":
        return ("trainer.mixed_precision: fp16 needs accelerate's loss scaler, which the FSDP2 path does not use. "
                "Fix: set trainer.mixed_precision=bf16")
    if shard == "fsdp2" and cfg.model.lora.enabled:
        return LORA_FSDP2
    if prompts % world:
        return (f"trainer.prompts_per_step: the step's {prompts} prompts must split evenly over the job's {world} "
                f"processes (each rank samples its share). Fix: set trainer.prompts_per_step to a multiple of {world}, "
                f"or launch a number of processes that divides {prompts}")
    for key, (name, caps) in plugins.items():
        reads = [what for what, read in (("the LM head's weight [V,d]", caps.reads_lm_head),
                                         ("the optimizer's state", caps.reads_optimizer_state)) if read]
        if shard == "fsdp2" and reads:
            return (f"{key}: {name} reads {' and '.join(reads)}, which FSDP2 shards over the ranks (each holds "
                    f"1/{world} of it). Fix: train {key}={name} without FSDP (configs/accelerate/ddp.yaml)")
        if world > 1 and caps.single_process:
            return (f"{key}: {name} keeps state updated from one process's tokens, which {world} processes would "
                    f"each update apart. Fix: train {key}={name} in one process")
    return None


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1")
