"""Set-up of the trained policy: the accelerator, tokenizer, model, optional frozen reference, optimizer and LR schedule."""
from __future__ import annotations

import copy
import logging
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from rlkit.errors import ConfigError
from rlkit.launch import LORA_FSDP2, sharding
from rlkit.trainer.lora import AdapterOff, trainable_summary, wrap as wrap_lora
from rlkit.trainer.sharding import LogprobsForward, shard

log = logging.getLogger("rlkit")


def make_accelerator(cfg: DictConfig) -> Accelerator:
    """The job's accelerator; over several processes every collective times out after trainer.collective_timeout_s,
    so a rank that died stops the others instead of leaving them waiting."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.trainer.collective_timeout_s))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.trainer.mixed_precision,
                       kwargs_handlers=[timeout])


def load_policy(cfg: DictConfig, accelerator: Accelerator, *, needs_reference: bool):
    """(tokenizer, model, forward, reference or None, optimizer, scheduler, sharded) on `accelerator`'s device.

    model: the HF model, whose parameters are DTensor shards when `sharded` (launched with FSDP2), or with
    model.lora.enabled the peft model around it (only the adapter trains); forward: the `LogprobsForward` every
    training and scoring pass runs through; reference: the frozen initial policy's (with LoRA: the same model with
    the adapter disabled, no copy).
    The scheduler counts optimizer steps: total_steps x ppo_epochs x mini_batches.
    """
    t = cfg.trainer
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=getattr(torch, cfg.model.dtype))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    lora = cfg.model.lora.enabled
    if lora:
        if sharding() == "fsdp2":  # also refused by validate, which names the fix
            raise ConfigError(LORA_FSDP2)
        model = wrap_lora(model, cfg.model.lora)
        log.info("LoRA: %s", trainable_summary(model))
    reference = copy.deepcopy(model).requires_grad_(False).eval() if needs_reference and not lora else None
    # Neither path hands the model to accelerator.prepare. Data parallel: the Learner sums gradients over ranks once
    # per optimizer step, so the model is not wrapped in DDP (its per-backward hooks would need every micro-batch to
    # go through DDP.forward). FSDP2: rlkit shards by decoder layer itself, with LogprobsForward as the root, since
    # the trainer's forward is not the HF model's forward. The scheduler is never prepared: accelerate would step
    # it once per process at every optimizer step.
    sharded = sharding() == "fsdp2"
    place = (lambda m: shard(m, accelerator.device)) if sharded else (lambda m: LogprobsForward(m.to(accelerator.device)))
    forward = place(model)
    if reference is not None:
        reference = place(reference)
    elif lora and needs_reference:
        reference = AdapterOff(forward, model)
    trained = [p for p in model.parameters() if p.requires_grad]  # every parameter, or the adapter's
    optimizer = torch.optim.AdamW(trained, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=t.total_steps * t.ppo_epochs * t.mini_batches)
    if not sharded:  # fp16's loss scaler lives in the prepared optimizer (refused under FSDP2)
        optimizer = accelerator.prepare(optimizer)
    return tokenizer, model, forward, reference, optimizer, scheduler, sharded
