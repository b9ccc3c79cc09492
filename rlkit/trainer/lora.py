"""LoRA for the Learner (docs/lora.md): the policy as a frozen base model plus a peft adapter.

- `wrap`: the adapter on the linear projections of the decoder layers; only its parameters train.
- `merged_weights`: what the rollout engine receives after each update: W + (alpha/r) B @ A of every projection,
  computed per layer without touching the trained base, under the HF names the engine loads (no `base_model.model.`,
  no `.base_layer`). Only the decoder layers' projections are pushed (embeddings, norms and the LM head never change):
  every weight of every projection, adapted or not, since vLLM fuses q/k/v and gate/up into one layer that it
  reloads only whole.
- `AdapterOff`: the frozen reference for KL, the same model with the adapter disabled (no second copy).
- `adapter_dropout`: the adapter's dropout acts in training forwards only (the model stays in eval mode).
- `adapter_state` / `load_adapter_state`: what a checkpoint holds of the model; `save_merged`: base + adapter as a
  plain HF model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from rlkit.errors import ConfigError
from rlkit.models.lora import decoder_layers, projection_names, targets_problem

ADAPTER = "default"  # peft's name of the one adapter


def wrap(model: torch.nn.Module, lora: DictConfig) -> PeftModel:
    """`model` with a LoRA adapter (model.lora: r, alpha, dropout, target_modules) injected in place; every base
    parameter frozen. ConfigError when the targets match no projection (also checked by validate)."""
    targets = None if lora.target_modules is None else list(OmegaConf.to_container(lora.target_modules, resolve=True))
    if problem := targets_problem(model, targets):
        raise ConfigError(problem)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=targets or projection_names(model), task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, config)
    if getattr(model, "is_gradient_checkpointing", False):  # the frozen embeddings' output must carry a gradient
        model.enable_input_require_grads()
    return wrapped


def trainable_summary(model: PeftModel) -> str:
    """"N trainable of M parameters (targets ...)", for the start-up log."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targets = sorted(model.peft_config[ADAPTER].target_modules)
    return f"{trainable:,} trainable of {total:,} parameters (targets {', '.join(targets)})"


def _projections(base: torch.nn.Module) -> set[str]:
    """Full names of the linear layers (LoRA-wrapped or not) inside the decoder layers of `base`."""
    inside = {id(m) for layer in decoder_layers(base) for m in layer.modules()}
    return {name for name, m in base.named_modules()
            if id(m) in inside and (isinstance(m, LoraLayer) or isinstance(m, torch.nn.Linear))
            and not name.endswith(".base_layer") and ".lora_" not in name}


def merged_weights(model: PeftModel, *, every_weight: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, W + scale * B @ A) of every linear projection in the decoder layers, one layer at a time (a new
    tensor: the base weight is never modified); biases unchanged. every_weight: also every other weight of the
    model unchanged (the whole merged model, as `save_merged` writes)."""
    base = model.get_base_model()
    projections = _projections(base)
    adapted = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for key, tensor in base.state_dict().items():
            if ".lora_" in key:
                continue
            module, _, leaf = key.rpartition(".")
            owner = module.removesuffix(".base_layer")
            if not every_weight and owner not in projections:
                continue
            if owner in adapted and leaf == "weight" and ADAPTER in adapted[owner].lora_A:
                tensor = tensor + adapted[owner].get_delta_weight(ADAPTER).to(tensor.dtype)
            yield f"{owner}.{leaf}", tensor


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's weights (peft's names, as `PeftModel.save_pretrained` writes them)."""
    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def load_adapter_state(model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    """Load an `adapter_state` (a checkpoint's adapter_model.safetensors); RuntimeError when an adapter weight is
    missing or a name is not the adapter's."""
    expected = set(adapter_state(model))
    if set(weights) != expected:
        raise RuntimeError(f"the adapter does not match the model's: missing {sorted(expected - set(weights))[:4]}, "
                           f"unexpected {sorted(set(weights) - expected)[:4]} (a checkpoint of another LoRA setting, "
                           "or of a full-model run?)")
    set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)


def save_merged(model: PeftModel, out: Path) -> None:
    """Base + adapter as a plain HF model directory (weights only; the caller adds the tokenizer)."""
    base = model.get_base_model()
    state = {k: v.contiguous() for k, v in merged_weights(model, every_weight=True)
             if k not in base.all_tied_weights_keys}
    base.save_pretrained(out, state_dict=state, safe_serialization=True)


class AdapterOff(torch.nn.Module):
    """`forward` (a LogprobsForward over `model`) run with the adapter disabled: the frozen initial policy, the
    reference for KL, without a second copy of the model. Call it without grad."""

    def __init__(self, forward: torch.nn.Module, model: PeftModel):
        super().__init__()
        self.inner, self._model = forward, [model]  # a list: not a submodule (its parameters are the policy's)

    def forward(self, *args, **kwargs):
        with self._model[0].disable_adapter():
            return self.inner(*args, **kwargs)


@contextlib.contextmanager
def adapter_dropout(model: PeftModel):
    """The adapter's dropout layers in training mode inside (the rest of the model stays in eval mode)."""
    drops = [m for name, m in model.named_modules() if name.rpartition(".")[2] == ADAPTER
             and isinstance(m, torch.nn.Dropout)]
    for m in drops:
        m.train()
    try:
        yield
    finally:
        for m in drops:
            m.eval()
