"""Set-up of the trained policy: tokenizer, model, optional frozen reference, optimizer and LR schedule."""
from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler


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
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return tokenizer, model, reference, optimizer, scheduler
