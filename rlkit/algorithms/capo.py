"""CAPO: curvature-aware token masking (arXiv 2510.00819), token level, last layer only.

Per response token the LM head W is treated as the only trained parameter, restricted to the rows
of the top-k tokens of the trainer's distribution at that position. With h the final hidden state,
pi the top-k probabilities renormalised over the top-k, e_a the one-hot of the sampled token,
v = e_a - pi and A the advantage, the token's gradient is g = A * v (x) h ([k,d]). For an update
direction G ([k,d]; G = g for SGD, Adam-preconditioned for Adam) and u = G h ([k], the logit change
per unit step), at learning rate eta:

    objective shift  m_h = eta * <g,G> + 1/2 eta^2 * A * ((v.u)^2 - u^T F u),  F = diag(pi) - pi pi^T
    policy shift     m_f = 1/2 eta^2 * (v.u)^2

Since g's rows are A * v_j * h, <g,G> = A * v.u for any G, so everything reduces to u.
A token is kept iff -tau_h < m_h < tau_h (symmetric; one-sided: 0 <= m_h < tau_h) and m_f < tau_f.

A sampled token outside the top-k replaces the lowest top-k entry, so the set always holds the
sampled token and v is the exact gradient of log pi_a under the top-k-truncated distribution
(the reference code instead leaves e_a all zero for such tokens).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from rlkit.algorithms.plugins import TOKEN_MASKS, TokenMaskInputs

CHUNK_TOKENS = 256  # tokens per chunk: bounds the [chunk,V] logits and the [chunk,k,d] Adam tensors
DIRECTIONS = ("adam", "sgd")


def topk_distribution(hidden: Tensor, lm_head: Tensor, sampled: Tensor, k: int, temperature: float = 1.0):
    """The trainer's distribution at each position, restricted to its top-k and renormalised.

    hidden [N,d], lm_head [V,d], sampled [N] token ids -> (ids [N,k], probs [N,k], index [N]) where
    ids[i, index[i]] == sampled[i]. Logits are (h W^T) / temperature, as the trainer's logprobs.
    A sampled token outside the top-k takes the place of the lowest top-k entry.
    """
    logits = (hidden.to(lm_head.dtype) @ lm_head.T).float() / temperature
    top, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    hit = ids == sampled[:, None]
    inside = hit.any(-1)
    last = ids.shape[-1] - 1
    index = torch.where(inside, hit.int().argmax(-1), last)
    ids[~inside, last] = sampled[~inside]
    top[~inside, last] = logits.gather(-1, sampled[:, None])[~inside, 0]
    return ids, torch.softmax(top, dim=-1), index


def _shifts(u: Tensor, probs: Tensor, v: Tensor, advantages: Tensor, lr: float) -> tuple[Tensor, Tensor]:
    """u, probs, v [...,k], advantages [...] -> (m_h, m_f) [...]."""
    vu = (v * u).sum(-1)
    u_f_u = (probs * u * u).sum(-1) - (probs * u).sum(-1) ** 2
    m_h = lr * advantages * vu + 0.5 * lr**2 * advantages * (vu**2 - u_f_u)
    return m_h, 0.5 * lr**2 * vu**2


def _score_direction(probs: Tensor, sampled_index: Tensor) -> Tensor:
    """v = e_a - pi: probs [...,k], sampled_index [...] -> [...,k]."""
    return torch.nn.functional.one_hot(sampled_index, probs.shape[-1]).to(probs.dtype) - probs


def curvature_shifts(hidden: Tensor, topk_probs: Tensor, sampled_index: Tensor, advantages: Tensor,
                     lr: float) -> tuple[Tensor, Tensor]:
    """Objective and policy shifts of each token's own SGD step (G = g).

    hidden [b,T,d], topk_probs [b,T,k] (renormalised over the top-k), sampled_index [b,T] (the sampled
    token's position in the top-k), advantages [b,T], lr: the scheduled learning rate -> (m_h, m_f) [b,T].
    With G = g, u = A |h|^2 v: no [k,d] tensor is formed.
    """
    v = _score_direction(topk_probs, sampled_index)
    u = (advantages * hidden.pow(2).sum(-1))[..., None] * v
    return _shifts(u, topk_probs, v, advantages, lr)


def token_gradients(hidden: Tensor, topk_probs: Tensor, sampled_index: Tensor, advantages: Tensor) -> Tensor:
    """g = A * v (x) h: hidden [n,d], topk_probs [n,k], sampled_index [n], advantages [n] -> [n,k,d]."""
    v = _score_direction(topk_probs, sampled_index)
    return (advantages[:, None] * v)[..., None] * hidden[:, None, :]


def adam_direction(grad: Tensor, first_moment: Tensor, second_moment: Tensor, step: int,
                   betas: tuple[float, float], eps: float) -> Tensor:
    """Adam's step direction from prospective moments, without changing them.

    grad, first_moment, second_moment [...]; step: optimizer steps the moments have seen ->
    m_hat / (sqrt(v_hat) + eps) with m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, bias-corrected at step+1.
    """
    beta1, beta2 = betas
    m = (beta1 * first_moment + (1 - beta1) * grad) / (1 - beta1 ** (step + 1))
    v = (beta2 * second_moment + (1 - beta2) * grad * grad) / (1 - beta2 ** (step + 1))
    return m / (v.sqrt() + eps)


def adam_curvature_shifts(hidden: Tensor, topk_probs: Tensor, sampled_index: Tensor, advantages: Tensor, lr: float, *,
                          first_moment: Tensor, second_moment: Tensor, step: int, betas: tuple[float, float],
                          eps: float) -> tuple[Tensor, Tensor]:
    """Objective and policy shifts along the Adam-preconditioned direction, for a bounded chunk of tokens.

    hidden [n,d], topk_probs [n,k], sampled_index [n], advantages [n]; first_moment, second_moment
    [n,k,d]: the Adam model's moments of each token's top-k rows (zeros for rows it has not seen);
    step: the Adam model's step count -> (m_h, m_f) [n]. Forms [n,k,d] tensors: call it on chunks.
    """
    grad = token_gradients(hidden, topk_probs, sampled_index, advantages)
    direction = adam_direction(grad, first_moment, second_moment, step, betas, eps)
    u = torch.einsum("nkd,nd->nk", direction, hidden)
    return _shifts(u, topk_probs, _score_direction(topk_probs, sampled_index), advantages, lr)


def curvature_keep(m_h: Tensor, m_f: Tensor, tau_h: float, tau_f: float, symmetric: bool = True) -> Tensor:
    """Keep mask: m_h, m_f [...] -> bool [...]; -tau_h < m_h < tau_h (symmetric) or 0 <= m_h < tau_h, and m_f < tau_f."""
    hessian_ok = m_h.abs() < tau_h if symmetric else (m_h >= 0) & (m_h < tau_h)
    return hessian_ok & (m_f < tau_f)


def _sum_rows(rows: Tensor, values: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sum `values` [n,d] and `counts` [n] over equal `rows` [n] -> (unique sorted rows [U], sums [U,d], counts [U])."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    sums = torch.zeros(len(unique), values.shape[-1], dtype=values.dtype, device=values.device)
    totals = torch.zeros(len(unique), dtype=counts.dtype, device=counts.device)
    return unique, sums.index_add_(0, inverse, values), totals.index_add_(0, inverse, counts)


@TOKEN_MASKS.register("capo", needs_hidden=True)
class CapoMask:
    """CAPO's token-level curvature mask (docs/algorithms.md, "CAPO").

    Options: direction "adam" (the paper's recipe: a sparse Adam model with its own per-vocabulary-row
    moments, updated after every optimizer step with the mean gradient of the accepted tokens; the SGD
    direction while it has no moments) or "sgd"; top_k rows of the LM head per token; thresholds tau_h,
    tau_f; symmetric Hessian clipping; temperature: the sampling temperature the trainer's logprobs use
    (set it to ${rollout.temperature}). Adam's betas and eps are the optimizer's (param_groups[0]).
    """

    def __init__(self, *, direction: str = "adam", top_k: int = 50, tau_h: float = 0.01, tau_f: float = 1e-4,
                 symmetric: bool = True, temperature: float = 1.0):
        key = "algorithm.token_mask.options"
        if direction not in DIRECTIONS:
            raise ValueError(f"{key}.direction: {direction!r} is not a direction model. Fix: one of {list(DIRECTIONS)}")
        if top_k < 2:
            raise ValueError(f"{key}.top_k: {top_k} leaves no curvature (v = 0). Fix: top_k >= 2 (paper: 50)")
        if not (tau_h > 0 and tau_f > 0 and temperature > 0):
            raise ValueError(f"{key}: tau_h, tau_f and temperature must be > 0, got {tau_h}, {tau_f}, {temperature}. "
                             f"Fix: e.g. tau_h=0.01 tau_f=1e-4 (use .inf to switch one off)")
        self.direction, self.top_k, self.temperature = direction, top_k, temperature
        self.tau_h, self.tau_f, self.symmetric = tau_h, tau_f, symmetric
        self.step = 0  # optimizer steps the Adam model has taken
        self.rows = torch.zeros(0, dtype=torch.long)  # sorted vocabulary rows with moments [R]
        self.first_moment = self.second_moment = torch.zeros(0, 0)  # [R,d]
        self._adam: tuple[tuple[float, float], float] | None = None  # the optimizer's (betas, eps)
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None  # accepted gradient: rows, sums [U,d], counts
        self._tally = torch.zeros(6, dtype=torch.float64)  # rejected, tokens; for A>0; for A<0

    def __call__(self, inputs: TokenMaskInputs) -> Tensor:
        """keep [b,T] = response mask x curvature mask."""
        selected = inputs.mask > 0
        hidden = inputs.hidden[selected]
        advantages = inputs.advantages[selected].float()
        targets = inputs.response_ids[selected]
        keep = torch.ones(len(targets), dtype=torch.bool, device=hidden.device)
        adam = self.direction == "adam"
        if adam:
            self._adam = self._optimizer_settings(inputs.optimizer)
            self._to_device(hidden.device)
        with torch.no_grad():
            for start in range(0, len(targets), CHUNK_TOKENS):
                part = slice(start, start + CHUNK_TOKENS)
                h, a = hidden[part].float(), advantages[part]
                ids, probs, index = topk_distribution(hidden[part], inputs.lm_head.detach(), targets[part], self.top_k,
                                                      self.temperature)
                if adam and len(self.rows):
                    first, second = self._moments(ids)
                    m_h, m_f = adam_curvature_shifts(h, probs, index, a, inputs.lr, first_moment=first,
                                                     second_moment=second, step=self.step, betas=self._adam[0],
                                                     eps=self._adam[1])
                else:
                    m_h, m_f = curvature_shifts(h, probs, index, a, inputs.lr)
                keep[part] = curvature_keep(m_h, m_f, self.tau_h, self.tau_f, self.symmetric)
                if adam:
                    kept = keep[part]
                    self._accumulate(ids[kept], token_gradients(h[kept], probs[kept], index[kept], a[kept]))
        self._count(keep, advantages)
        out = torch.zeros_like(inputs.mask)
        out[selected] = keep.to(out.dtype)
        return out

    # ------------------------------------------------------------------ the Adam model
    @staticmethod
    def _optimizer_settings(optimizer) -> tuple[tuple[float, float], float]:
        group = optimizer.param_groups[0]
        if "betas" not in group or "eps" not in group:
            raise ValueError("algorithm.token_mask.options.direction: 'adam' reads betas and eps from the optimizer, "
                             "which has none. Fix: algorithm.token_mask.options.direction=sgd")
        return tuple(group["betas"]), group["eps"]

    def _to_device(self, device: torch.device) -> None:
        self.rows = self.rows.to(device)
        self.first_moment, self.second_moment = self.first_moment.to(device), self.second_moment.to(device)

    def _moments(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The moments of rows `ids` [n,k] -> two [n,k,d] tensors, zeros for rows never updated."""
        pos = torch.searchsorted(self.rows, ids).clamp(max=len(self.rows) - 1)
        found = (self.rows[pos] == ids)[..., None]
        return self.first_moment[pos] * found, self.second_moment[pos] * found

    def _accumulate(self, ids: Tensor, grads: Tensor) -> None:
        """Add accepted tokens' gradients (ids [n,k], grads [n,k,d]) to this optimizer step's per-row sums."""
        rows, sums, counts = ids.reshape(-1), grads.reshape(-1, grads.shape[-1]), torch.ones(ids.numel(), device=ids.device)
        if self._pending is not None:
            rows, sums, counts = (torch.cat([p, n]) for p, n in zip(self._pending, (rows, sums, counts)))
        self._pending = _sum_rows(rows, sums, counts)

    def after_optimizer_step(self) -> None:
        """One Adam step of the model's moments with the mean accepted gradient per row (rows it saw only)."""
        if self.direction != "adam" or self._adam is None:
            return
        pending, self._pending = self._pending, None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            pending = _gather_rows(pending)
        self.step += 1
        if pending is None:
            return
        rows, sums, counts = pending
        grad = sums / counts[:, None]
        union = torch.unique(torch.cat([self.rows, rows]))
        first = torch.zeros(len(union), grad.shape[-1], dtype=grad.dtype, device=grad.device)
        second = torch.zeros_like(first)
        if len(self.rows):
            old = torch.searchsorted(union, self.rows)
            first[old], second[old] = self.first_moment, self.second_moment
        new = torch.searchsorted(union, rows)
        (beta1, beta2), _ = self._adam
        first[new] = beta1 * first[new] + (1 - beta1) * grad
        second[new] = beta2 * second[new] + (1 - beta2) * grad * grad
        self.rows, self.first_moment, self.second_moment = union, first, second

    # ------------------------------------------------------------------ state and metrics
    def state_dict(self) -> dict:
        return {"step": self.step, "rows": self.rows.cpu(), "first_moment": self.first_moment.cpu(),
                "second_moment": self.second_moment.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.rows = state["step"], state["rows"]
        self.first_moment, self.second_moment = state["first_moment"], state["second_moment"]
        self._pending = None

    def _count(self, keep: Tensor, advantages: Tensor) -> None:
        rejected = ~keep
        pos, neg = advantages > 0, advantages < 0
        counts = [rejected.sum(), keep.new_tensor(len(keep), dtype=torch.long), (rejected & pos).sum(), pos.sum(),
                  (rejected & neg).sum(), neg.sum()]
        self._tally += torch.stack(counts).cpu().double()

    def step_metrics(self) -> dict[str, float]:
        """Rejected fraction of the step's response tokens: all, A > 0, A < 0 (0 where there are none)."""
        t = self._tally.tolist()
        self._tally.zero_()
        frac = [t[i] / t[i + 1] if t[i + 1] else 0.0 for i in (0, 2, 4)]
        return {"capo/rejected_frac": frac[0], "capo/rejected_frac_pos": frac[1], "capo/rejected_frac_neg": frac[2]}


def _gather_rows(pending: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """Every rank's accepted per-row sums and counts, summed: each rank's Adam model takes the same step."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, None if pending is None else tuple(t.cpu() for t in pending))
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    device = pending[0].device if pending is not None else torch.device("cpu")
    return _sum_rows(*(torch.cat([p[i] for p in parts]).to(device) for i in range(3)))
