"""FSDP2 for the Learner (docs/distributed.md, "FSDP2"): the policy sharded with `fully_shard`, gradients summed
by its reduce-scatter, the full weights gathered one tensor at a time, full state dicts for checkpoints.

Every function here that gathers is a collective: every rank calls it, in the same order.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

from rlkit.trainer.logprobs import policy_logprobs

# Gathered state dicts: whole tensors, on rank 0 only, in CPU memory.
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


class LogprobsForward(torch.nn.Module):
    """`policy_logprobs` of the wrapped HF model as a module's forward (same arguments, PolicyOutputs [b,T]).

    The trainer's forward runs the base model and then the LM head in chunks, never `model.forward`; as the
    sharded root, this module's forward is what FSDP2 gathers the parameters outside the decoder layers for
    (embeddings, final norm, LM head). Unsharded it is a plain call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return policy_logprobs(self.model, *args, **kwargs)


def shard(model: torch.nn.Module, device: torch.device) -> LogprobsForward:
    """`fully_shard` each decoder layer of `model` (the classes in its `_no_split_modules`), then a
    `LogprobsForward` over it as the root; parameters become DTensors sharded on dim 0 over every rank.

    Every rank's shards are cut from rank 0's weights, parameters and buffers alike: `accelerate launch` with FSDP
    sets FSDP_CPU_RAM_EFFICIENT_LOADING=true by default, under which transformers reads the checkpoint on local rank
    0 only and fills the other ranks' models with zeros.
    Gradients are reduce-scattered as sums over ranks (divide factor 1), the same gradient the data-parallel path
    all-reduces. Each unit reshards after its forward, so between passes every rank holds only its shards.
    One process without a process group gets a world-size-1 gloo group.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model, mesh = model.to(device), init_device_mesh(device.type, (dist.get_world_size(),))
    rank0_weights = dict(model.state_dict()) if dist.get_rank() == 0 else {}  # the full tensors, before sharding
    for buffer in model.buffers():  # not sharded, and the non-persistent ones (rotary frequencies) are in no state dict
        dist.broadcast(buffer, src=0)
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    units = [fully_shard(layer, mesh=mesh, reshard_after_forward=True) for layer in layers]
    units.append(fully_shard(LogprobsForward(model), mesh=mesh, reshard_after_forward=True))
    for unit in units:  # a plain SUM (gloo has no pre-multiplied sum)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    set_model_state_dict(model, rank0_weights,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    return units[-1]


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of `model.state_dict()`, each sharded tensor all-gathered as it is reached: one
    whole tensor at a time on top of the shards (the consumer decides how many it keeps)."""
    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the (sharded) gradients to a total 2-norm of `max_norm`; the norm before clipping, over every rank."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF-named full state dict on rank 0's CPU (empty on the other ranks)."""
    return get_model_state_dict(model, options=FULL_ON_RANK0)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state, keyed by parameter name, on rank 0's CPU (empty on the other ranks)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)


def load_full_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]):
    """Each rank keeps its shard of the full `weights` (every rank holds them) -> (missing, unexpected) names."""
    return set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Each rank keeps its shard of a `full_optimizer_state` (every rank holds it)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
