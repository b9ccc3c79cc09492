"""Which layers of a causal LM LoRA may adapt: the linear projections inside its decoder layers (docs/lora.md).

Pure model-structure checks, shared by the up-front validation (on a model built on the meta device) and the
Learner (on the loaded model), so a target that matches nothing is refused before anything heavy loads.
"""
from __future__ import annotations

import torch

TARGETS_KEY = "model.lora.target_modules"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of an HF model: modules of the classes its `_no_split_modules` names."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def projection_names(model: torch.nn.Module) -> list[str]:
    """Sorted distinct names (last part) of the linear layers inside the decoder layers: q_proj, ..., down_proj.
    These are the default LoRA targets, and the only ones allowed."""
    names = set()
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("base_layer"):
                names.add(name.rpartition(".")[2])
    return sorted(names)


def targets_problem(model: torch.nn.Module, targets: list[str] | None) -> str | None:
    """"key: problem. Fix: ..." when `targets` (None: every projection) cannot be adapted in `model`, else None."""
    existing = projection_names(model)
    if not existing:
        return (f"{TARGETS_KEY}: {type(model).__name__} has no linear layer inside decoder layers that its "
                f"_no_split_modules name ({getattr(model, '_no_split_modules', None)}). Fix: train this model "
                "without LoRA (model.lora.enabled=false)")
    if targets is None:
        return None
    if isinstance(targets, str) or not len(targets):
        return (f"{TARGETS_KEY}: must be a non-empty list of layer names or null, got {targets!r}. Fix: set "
                f"{TARGETS_KEY}=null (every projection) or a list of these: [{','.join(existing)}]")
    unknown = [t for t in targets if t not in existing]
    if unknown:
        return (f"{TARGETS_KEY}: {', '.join(map(str, unknown))} matches no linear layer inside the decoder layers "
                f"of {type(model).__name__}; these exist: {', '.join(existing)}. Fix: set {TARGETS_KEY} to a list "
                f"of them (e.g. [{','.join(existing)}]) or null (all of them)")
    return None
