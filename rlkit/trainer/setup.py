"""Set-up of the trained policy: the accelerator, tokenizer, model, optional frozen reference, optimizer and LR schedule."""
from __future__ import annotations

import copy
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

# Where rlkit sums the gradients itself (one all-reduce per optimizer step); other types shard (FSDP, DeepSpeed).
DATA_PARALLEL = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def make_accelerator(cfg: DictConfig) -> Accelerator:
    """The job's accelerator; over several processes every collective times out after trainer.collective_timeout_s,
    so a rank that died stops the others instead of leaving them waiting."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.trainer.collective_timeout_s))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.trainer.mixed_precision,
                       kwargs_handlers=[timeout])


def load_policy(cfg: DictConfig, accelerator: Accelerator, *, needs_reference: bool):
    """(tokenizer, model, reference model or None, optimizer, scheduler), prepared by `accelerator`.

    The scheduler counts optimizer steps: total_steps x ppo_epochs x mini_batches.
    """
    t = cfg.trainer
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=getattr(torch, cfg.model.dtype))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    reference = None
    if needs_reference:
        reference = copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=t.total_steps * t.ppo_epochs * t.mini_batches)
    # Data parallel: the Learner sums gradients over ranks once per optimizer step, so the model is not wrapped
    # in DDP (its per-backward hooks would need every micro-batch to go through DDP.forward). The scheduler is
    # never prepared: accelerate would step it once per process at every optimizer step.
    if accelerator.distributed_type in DATA_PARALLEL:
        model = model.to(accelerator.device)
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    return tokenizer, model, reference, optimizer, scheduler
