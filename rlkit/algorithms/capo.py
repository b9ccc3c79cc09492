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
(the reference code instead leaves e_a all zero for such tokens); capo/swapped_frac counts them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from rlkit.algorithms.plugins import TOKEN_MASKS, TokenMaskInputs

CHUNK_TOKENS = 256  # tokens per chunk: bounds the [chunk,V] logits and the [chunk,k,d] Adam tensors
DIRECTIONS = ("adam", "sgd")
ZERO_ADVANTAGE = ("judge", "keep")  # A = 0 tokens: judged by the shift tests (reference) | always kept


def topk_distribution(hidden: Tensor, lm_head: Tensor, sampled: Tensor, k: int, temperature: float = 1.0):
    """The trainer's distribution at each position, restricted to its top-k and renormalised.

    hidden [N,d], lm_head [V,d], sampled [N] token ids -> (ids [N,k], probs [N,k], index [N], swapped [N])
    where ids[i, index[i]] == sampled[i]. Logits are (h W^T) / temperature, as the trainer's logprobs.
    A sampled token outside the top-k takes the place of the lowest top-k entry (swapped: True).
    """
    logits = (hidden.to(lm_head.dtype) @ lm_head.T).float() / temperature
    top, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    hit = ids == sampled[:, None]
    inside = hit.any(-1)
    last = ids.shape[-1] - 1
    index = torch.where(inside, hit.int().argmax(-1), last)
    ids[~inside, last] = sampled[~inside]
    top[~inside, last] = logits.gather(-1, sampled[:, None])[~inside, 0]
    return ids, torch.softmax(top, dim=-1), index, ~inside


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


def _adam_logit_change(weights: Tensor, hidden: Tensor, first_moment: Tensor, second_moment: Tensor, step: int,
                       betas: tuple[float, float], eps: float) -> Tensor:
    """u = G h, G = m_hat / (sqrt(v_hat) + eps) from the prospective moments m' = b1 m + (1-b1) g and
    v' = b2 v + (1-b2) g^2, bias-corrected at step+1, with g = weights (x) hidden.

    weights = A v [n,k], hidden [n,d], moments [n,k,d] (overwritten) -> [n,k]. g is never formed:
    g and g^2 enter as broadcast products.
    """
    (beta1, beta2), t = betas, step + 1
    first = first_moment.mul_(beta1 / (1 - beta1**t)).addcmul_(
        weights[..., None], hidden[:, None, :], value=(1 - beta1) / (1 - beta1**t))
    second = second_moment.mul_(beta2 / (1 - beta2**t)).addcmul_(
        weights.square()[..., None], hidden.square()[:, None, :], value=(1 - beta2) / (1 - beta2**t))
    direction = first.div_(second.sqrt_().add_(eps))
    return torch.bmm(direction, hidden[:, :, None])[..., 0]


def adam_curvature_shifts(hidden: Tensor, topk_probs: Tensor, sampled_index: Tensor, advantages: Tensor, lr: float, *,
                          first_moment: Tensor, second_moment: Tensor, step: int, betas: tuple[float, float],
                          eps: float) -> tuple[Tensor, Tensor]:
    """Objective and policy shifts along the Adam-preconditioned direction, for a bounded chunk of tokens.

    hidden [n,d], topk_probs [n,k], sampled_index [n], advantages [n]; first_moment, second_moment
    [n,k,d]: the Adam model's moments of each token's top-k rows (zeros for rows it has not seen);
    step: the optimizer steps the moments have seen; betas, eps: Adam's -> (m_h, m_f) [n].
    Works on [n,k,d] tensors: call it on bounded chunks of tokens.
    """
    v = _score_direction(topk_probs, sampled_index)
    weights = advantages[:, None] * v
    u = _adam_logit_change(weights, hidden, first_moment.clone(), second_moment.clone(), step, betas, eps)
    return _shifts(u, topk_probs, v, advantages, lr)


def curvature_keep(m_h: Tensor, m_f: Tensor, tau_h: float, tau_f: float, symmetric: bool = True) -> Tensor:
    """Keep mask: m_h, m_f [...] -> bool [...]; -tau_h < m_h < tau_h (symmetric) or 0 <= m_h < tau_h, and m_f < tau_f."""
    hessian_ok = m_h.abs() < tau_h if symmetric else (m_h >= 0) & (m_h < tau_h)
    return hessian_ok & (m_f < tau_f)


@TOKEN_MASKS.register("capo", needs_hidden=True, reads_lm_head=True)
class CapoMask:
    """CAPO's token-level curvature mask (docs/algorithms.md, "CAPO").

    Options: direction "adam" (the paper's recipe: a sparse Adam model with its own per-vocabulary-row
    moments, updated after every optimizer step with the mean gradient of the accepted tokens; the SGD
    direction while it has no moments) or "sgd"; top_k rows of the LM head per token; thresholds tau_h,
    tau_f; symmetric Hessian clipping; zero_advantage "judge" (the reference: an A = 0 token, whose m_f
    under Adam's momentum need not be 0, is judged and, if rejected, left out of the loss and of the Adam
    model's means) or "keep" (always kept and counted). The top-k distribution is taken at the trainer's
    temperature (``inputs.temperature``). Adam's betas and eps are the optimizer's (param_groups[0]).

    Memory: [CHUNK_TOKENS, V] logits and [CHUNK_TOKENS, k, d] tensors at a time; with Adam, the moments of
    the rows seen so far and, during a step, one LM-head-sized buffer that sums the accepted gradients.
    """

    def __init__(self, *, direction: str = "adam", top_k: int = 50, tau_h: float = 0.01, tau_f: float = 1e-4,
                 symmetric: bool = True, zero_advantage: str = "judge"):
        key = "algorithm.token_mask.options"
        if direction not in DIRECTIONS:
            raise ValueError(f"{key}.direction: {direction!r} is not a direction model. Fix: one of {list(DIRECTIONS)}")
        if top_k < 2:
            raise ValueError(f"{key}.top_k: {top_k} leaves no curvature (v = 0). Fix: top_k >= 2 (paper: 50)")
        if not (tau_h > 0 and tau_f > 0):
            raise ValueError(f"{key}: tau_h and tau_f must be > 0, got {tau_h}, {tau_f}. "
                             f"Fix: e.g. tau_h=0.01 tau_f=1e-4 (use inf to switch one off)")
        if zero_advantage not in ZERO_ADVANTAGE:
            raise ValueError(f"{key}.zero_advantage: {zero_advantage!r} is not a rule. Fix: one of {list(ZERO_ADVANTAGE)}")
        self.direction, self.top_k, self.judge_zero = direction, top_k, zero_advantage == "judge"
        self.tau_h, self.tau_f, self.symmetric = tau_h, tau_f, symmetric
        self.step = 0  # optimizer steps the Adam model has taken
        self.rows = torch.zeros(0, dtype=torch.long)  # sorted vocabulary rows that have moments [R]
        self._moments_of_rows: tuple[Tensor, Tensor] | None = None  # first, second [R+1,d]; last row: zeros
        self._adam: tuple[tuple[float, float], float] | None = None  # the optimizer's (betas, eps)
        self._accepted: tuple[Tensor, Tensor] | None = None  # this step's accepted gradient sums [V,d], counts [V]
        self._tally = torch.zeros(7, dtype=torch.float64)  # rejected, tokens; for A>0; for A<0; swapped in

    def __call__(self, inputs: TokenMaskInputs) -> Tensor:
        """keep [b,T] = response mask x curvature mask."""
        selected = inputs.mask > 0
        hidden, targets = inputs.hidden[selected], inputs.response_ids[selected]
        advantages = inputs.advantages[selected].float()
        lm_head = inputs.lm_head.detach()
        keep = torch.ones(len(targets), dtype=torch.bool, device=hidden.device)
        swapped = torch.zeros((), dtype=torch.long, device=hidden.device)  # sampled tokens outside the top-k
        adam = self.direction == "adam"
        if adam:
            self._adam = self._optimizer_settings(inputs.optimizer)
            self._prepare(lm_head.shape[0], hidden.shape[-1], hidden.device)
        with torch.no_grad():
            for start in range(0, len(targets), CHUNK_TOKENS):
                part = slice(start, start + CHUNK_TOKENS)
                h, a = hidden[part].float(), advantages[part]
                ids, probs, index, outside = topk_distribution(hidden[part], lm_head, targets[part], self.top_k,
                                                               inputs.temperature)
                swapped = swapped + outside.sum()
                if not adam:
                    keep[part] = curvature_keep(*curvature_shifts(h, probs, index, a, inputs.lr), self.tau_h,
                                                self.tau_f, self.symmetric)
                    continue
                v = _score_direction(probs, index)
                weights = a[:, None] * v  # the token's gradient is weights (x) h
                judged = (a != 0) | self.judge_zero  # with "keep", A = 0 (no gradient of its own) is kept
                kept = ~judged
                if len(self.rows):
                    u = _adam_logit_change(weights[judged], h[judged], *self._moments(ids[judged]), self.step,
                                           *self._adam)
                else:
                    u = (a * h.pow(2).sum(-1))[judged, None] * v[judged]  # no moments yet: the SGD direction
                kept[judged] = curvature_keep(*_shifts(u, probs[judged], v[judged], a[judged], inputs.lr), self.tau_h,
                                              self.tau_f, self.symmetric)
                keep[part] = kept
                self._add_accepted(ids[kept], weights[kept], h[kept])
        self._count(keep, advantages, swapped)
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

    def _prepare(self, vocab: int, dim: int, device: torch.device) -> None:
        """Moments on `device` (with their zero row), and this step's accepted-gradient buffers."""
        if self._moments_of_rows is None:
            self._moments_of_rows = (torch.zeros(1, dim), torch.zeros(1, dim))
        self.rows = self.rows.to(device)
        self._moments_of_rows = tuple(m.to(device) for m in self._moments_of_rows)
        if self._accepted is None:
            self._accepted = (torch.zeros(vocab, dim, device=device), torch.zeros(vocab, device=device))

    def _add_accepted(self, ids: Tensor, weights: Tensor, hidden: Tensor) -> None:
        """Add accepted tokens' gradients A v (x) h to their rows' sums: ids, weights = A v [n,k], hidden [n,d].

        Each row's sum is (weights over the tokens that hold it) @ hidden: one [U,n] x [n,d] product over the
        chunk's U distinct rows, without forming the [n,k,d] gradients.
        """
        rows, where = torch.unique(ids, return_inverse=True)
        per_row = torch.zeros(len(rows), len(ids), dtype=weights.dtype, device=weights.device)
        per_row[where, torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)] = weights
        sums, counts = self._accepted
        sums.index_add_(0, rows, per_row @ hidden)
        counts.index_add_(0, rows, torch.bincount(where.reshape(-1), minlength=len(rows)).to(counts.dtype))

    def _moments(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The moments of rows `ids` [n,k] -> two [n,k,d] tensors, zeros for rows never updated."""
        pos = torch.searchsorted(self.rows, ids).clamp(max=len(self.rows) - 1)
        pos = torch.where(self.rows[pos] == ids, pos, len(self.rows)).reshape(-1)  # else the zero row
        return tuple(m.index_select(0, pos).view(*ids.shape, m.shape[-1]) for m in self._moments_of_rows)

    def after_optimizer_step(self) -> None:
        """One Adam step of the model's moments with the mean accepted gradient per row (rows it saw only)."""
        if self._accepted is None:
            return
        (sums, counts), self._accepted = self._accepted, None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)  # every rank's Adam model takes the same step
            dist.all_reduce(counts)
        self.step += 1
        seen = counts.nonzero()[:, 0]
        grad = sums[seen] / counts[seen, None]
        union = torch.unique(torch.cat([self.rows, seen]))
        (beta1, beta2), _ = self._adam
        first, second = (torch.zeros(len(union) + 1, sums.shape[-1], device=sums.device) for _ in range(2))
        old, new = torch.searchsorted(union, self.rows), torch.searchsorted(union, seen)
        first[old], second[old] = self._moments_of_rows[0][:-1], self._moments_of_rows[1][:-1]
        first[new] = beta1 * first[new] + (1 - beta1) * grad
        second[new] = beta2 * second[new] + (1 - beta2) * grad * grad
        self.rows, self._moments_of_rows = union, (first, second)

    @property
    def first_moment(self) -> Tensor:
        """[R,d] first moments of `rows`."""
        return self._moments_of_rows[0][:-1] if self._moments_of_rows is not None else torch.zeros(0, 0)

    @property
    def second_moment(self) -> Tensor:
        """[R,d] second moments of `rows`."""
        return self._moments_of_rows[1][:-1] if self._moments_of_rows is not None else torch.zeros(0, 0)

    # ------------------------------------------------------------------ state and metrics
    def state_dict(self) -> dict:
        return {"step": self.step, "rows": self.rows.cpu(), "first_moment": self.first_moment.cpu(),
                "second_moment": self.second_moment.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.rows, self._accepted = state["step"], state["rows"], None
        first, second = state["first_moment"], state["second_moment"]
        zero = torch.zeros(1, first.shape[-1]) if first.numel() else None
        self._moments_of_rows = None if zero is None else (torch.cat([first, zero]), torch.cat([second, zero]))

    def _count(self, keep: Tensor, advantages: Tensor, swapped: Tensor) -> None:
        rejected = ~keep
        pos, neg = advantages > 0, advantages < 0
        counts = [rejected.sum(), keep.new_tensor(len(keep), dtype=torch.long), (rejected & pos).sum(), pos.sum(),
                  (rejected & neg).sum(), neg.sum(), swapped.to(pos.device)]
        self._tally += torch.stack(counts).cpu().double()

    def step_metrics(self) -> dict[str, float]:
        """Rejected fraction of the step's response tokens: all, A > 0, A < 0 (0 where there are none); the
        fraction whose sampled token was outside the top-k (swapped in)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # every rank's tokens
            tally = self._tally.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(tally)
            self._tally = tally.cpu()
        t = self._tally.tolist()
        self._tally.zero_()
        frac = [t[i] / t[j] if t[j] else 0.0 for i, j in ((0, 1), (2, 3), (4, 5), (6, 1))]
        return {"capo/rejected_frac": frac[0], "capo/rejected_frac_pos": frac[1], "capo/rejected_frac_neg": frac[2],
                "capo/swapped_frac": frac[3]}
