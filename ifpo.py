"""IFPO: Inverse Frequency Policy Optimization, in four functions (torch only).

Copy this file into any GRPO-style trainer. The chain is

    rewards, used_tool --ifpo_advantages--> advantages --policy_loss--> loss

Shapes: a batch holds `num_groups * group_size` rollouts, the `group_size`
rollouts of one prompt contiguous: rollout i belongs to group i // group_size.
Equation numbers are those of ASCL (Wang et al., arXiv 2602.13562).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage: A_i = (R_i - mean(R_G)) / (std(R_G) + eps), per group G.

    rewards: (num_groups * group_size,) float.  Returns the same shape.
    std is the population std (divide by |G|); a group whose rewards are all
    equal gets advantage exactly 0: it carries no learning signal. (In float32
    the mean of eight 0.7s is not 0.7, and the rounding error divided by
    std + eps is an advantage of about +0.06; so the statistics are taken in
    float64 and tied groups are zeroed outright.) Returns float32.

    >>> group_advantages(torch.tensor([1., 0., 2., 2.]), group_size=2)
    tensor([ 1.0000, -1.0000,  0.0000,  0.0000])
    >>> group_advantages(torch.full((8,), 0.7), group_size=8).abs().max().item()
    0.0
    """
    r = _grouped(rewards, group_size).double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, correction=0)
    tied = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    adv = ((r - mean) / (std + eps)).masked_fill(tied, 0.0)
    return adv.float().reshape(-1)


def inverse_frequency_weights(
    used_tool: torch.Tensor,
    group_size: int,
    tau: float = 0.5,
    w_min: float = 0.1,
    w_max: float = 10.0,
) -> torch.Tensor:
    """Eq. 3: w_i = clip((|G|/N_m_i)^tau / mean_j (|G|/N_m_j)^tau, w_min, w_max).

    used_tool: (num_groups * group_size,) bool, m_i = 1 if rollout i called the tool.
    N_m_i counts the rollouts of i's group that share its behaviour m_i, so the
    rarer behaviour gets the larger weight. Before clipping the weights of a
    group average to 1; a group with one behaviour only gets w = 1 (plain GRPO);
    tau = 0 gives w = 1 everywhere; tau = 1 gives both behaviours equal total weight.

    >>> m = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)  # 6 tool, 2 direct
    >>> inverse_frequency_weights(m, group_size=8)
    tensor([0.8453, 0.8453, 0.8453, 0.8453, 0.8453, 0.8453, 1.4641, 1.4641])
    """
    m = _grouped(used_tool, group_size).bool()
    n_tool = m.sum(dim=1, keepdim=True)
    n_same = torch.where(m, n_tool, group_size - n_tool).float()  # N_m_i, never 0
    raw = (group_size / n_same) ** tau
    w = raw / raw.mean(dim=1, keepdim=True)
    return w.clamp(w_min, w_max).reshape(-1)


def ifpo_advantages(
    rewards: torch.Tensor,
    used_tool: torch.Tensor,
    group_size: int,
    tau: float = 0.5,
    w_min: float = 0.1,
    w_max: float = 10.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Eq. 4: A_i = w_i * (R_i - mean(R_G)) / (std(R_G) + eps).

    rewards: (num_groups * group_size,) float; used_tool: same shape, bool.
    Returns (num_groups * group_size,). With tau = 0 this is group_advantages.

    >>> r = torch.tensor([1., 1., 1., 0.])           # 3 tool rollouts, 1 direct
    >>> ifpo_advantages(r, torch.tensor([1, 1, 1, 0]).bool(), group_size=4)
    tensor([ 0.4880,  0.4880,  0.4880, -2.5359])
    """
    w = inverse_frequency_weights(used_tool, group_size, tau, w_min, w_max)
    return w * group_advantages(rewards, group_size, eps)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped surrogate with token-mean aggregation (DAPO).

    logprobs, old_logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens.
    advantages: (B,), one per rollout, broadcast to its tokens.
    action_mask: (B, T), 1 on tokens the model wrote (trained), 0 elsewhere.
    num_tokens: divide the summed token losses by this instead of
        action_mask.sum(); pass the trained-token count of the whole batch when
        it is split into micro-batches, so the sum of micro-batch losses is the
        token-mean over the batch.

    per token: ratio = exp(logprobs - old_logprobs)
               loss  = -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A)
                       + beta * k3(ref || policy)
    Returns (scalar loss, diagnostics). Loss near 0 is normal on-policy: the
    ratio is 1 and the advantages of a group sum to about 0.

    >>> lp = torch.tensor([[-1.0, -2.0, -3.0]])
    >>> loss, d = policy_loss(lp, lp, torch.tensor([2.0]), torch.tensor([[0, 1, 1]]))
    >>> loss, d["clip_frac"]
    (tensor(-2.), 0.0)
    """
    mask = action_mask.to(logprobs.dtype)
    denom = mask.sum().clamp(min=1.0) if num_tokens is None else float(num_tokens)
    high = clip_eps if clip_eps_high is None else clip_eps_high

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    token_loss = -torch.min(unclipped, clipped)

    kl_ref = None
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("policy_loss: beta != 0 needs ref_logprobs")
        d = ref_logprobs - logprobs  # k3 estimator of KL(policy || ref), always >= 0
        kl_ref = torch.exp(d) - d - 1.0
        token_loss = token_loss + beta * kl_ref

    loss = (token_loss * mask).sum() / denom

    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        was_clipped = (clipped < unclipped).to(mask.dtype)  # the clip is what the min picked: no gradient
        stats = {
            "clip_frac": float((was_clipped * mask).sum() / n),
            # k3 estimate of KL(old || new), the "approx_kl" PPO people watch
            "approx_kl": float((((ratio - 1.0) - log_ratio) * mask).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "num_tokens": float(mask.sum()),
        }
        if kl_ref is not None:
            stats["kl_ref"] = float((kl_ref * mask).sum() / n)
    return loss, stats


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.dim() != 1:
        raise ValueError(f"expected a 1-d tensor of per-rollout values, got shape {tuple(x.shape)}")
    if group_size < 1 or x.numel() % group_size:
        raise ValueError(f"{x.numel()} rollouts do not split into groups of {group_size}")
    return x.reshape(-1, group_size)
