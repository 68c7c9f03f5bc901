"""The math of Prefix-RFT as small pure functions (spec: shared docs, prefix-rft.md).

Naming: `demo_prefix_*` is the demonstration prefix of a hybrid rollout; the key/value prefix of
a prefix-tuning adapter is `kv_prefix_*` and lives in core/adapters.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lr_factor(step: int, steps: int, warmup_steps: int = 0, shape: str = "constant") -> float:
    """Learning-rate multiplier at `step`: linear warm-up to 1, then `constant`, `cosine` to 0 or `linear` to 0."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "linear":
        return 1.0 - progress
    if shape != "constant":
        raise ValueError(f"unknown learning-rate shape {shape!r}")
    return 1.0


def demo_prefix_low(step: int, decay_steps: int, start: float = 0.95, end: float = 0.05) -> float:
    """Lower bound of the demonstration-prefix ratio at `step`: cosine from `start` to `end`, then flat."""
    t = min(max(step, 0), decay_steps)
    return end + 0.5 * (1.0 + math.cos(math.pi * t / decay_steps)) * (start - end)


def demo_prefix_length(ratio: float, demo_len: int) -> int:
    """Tokens of the demonstration given to a hybrid rollout: floor(ratio * len) in [1, len - 1].

    At least one demonstration token is given and at least one response token is generated.
    """
    if demo_len < 2:
        raise ValueError("a demonstration needs at least 2 tokens to cut a prefix from")
    return min(max(math.floor(ratio * demo_len), 1), demo_len - 1)


def group_advantages(rewards: torch.Tensor, is_hybrid: torch.Tensor, mode: str = "dr_grpo") -> torch.Tensor:
    """Per-rollout advantages of one prompt's group.

    The baseline is the mean reward of the on-policy rollouts only (hybrids would bias it
    upward); every rollout, hybrid or not, gets `r - baseline`. `grpo` also divides by the
    on-policy std (+1e-6); `dr_grpo` does not.
    """
    on_policy = rewards[~is_hybrid]
    if on_policy.numel() == 0:
        raise ValueError("a group needs at least one on-policy rollout for its baseline")
    advantages = rewards - on_policy.mean()
    if mode == "grpo":
        std = on_policy.std(unbiased=False) if on_policy.numel() > 1 else on_policy.new_zeros(())
        advantages = advantages / (std + 1e-6)
    elif mode != "dr_grpo":
        raise ValueError(f"unknown advantage mode {mode!r}")
    return advantages


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v over the last dimension, computed in float32."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def entropy_keep_mask(
    entropy: torch.Tensor, demo_prefix_mask: torch.Tensor, keep_fraction: float = 0.2
) -> torch.Tensor:
    """Which tokens keep their advantage under entropy clipping of the demonstration prefix.

    Among all demonstration-prefix tokens of the batch exactly ceil(keep_fraction * n) with the
    highest entropy are kept (ties broken by position); every token outside the prefix is kept.
    `topk` instead of `quantile`: quantile refuses tensors over 16.7M elements.
    """
    keep = ~demo_prefix_mask
    n_prefix = int(demo_prefix_mask.sum())
    if n_prefix == 0:
        return keep
    k = math.ceil(keep_fraction * n_prefix)
    prefix_positions = demo_prefix_mask.flatten().nonzero().squeeze(1)
    top = torch.topk(entropy.flatten()[prefix_positions].float(), k).indices
    keep = keep.flatten().clone()
    keep[prefix_positions[top]] = True
    return keep.view_as(demo_prefix_mask)


def sample_categorical(log_probs: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from softmax-normalised `log_probs` [rows, V], by inverting the CDF.

    Exact, and one uniform number per row: torch.multinomial draws an exponential variate per
    vocabulary entry (1.5M per step for 32 rows of a 49k vocabulary), a fifth of decode time on CPU.
    `uniform` [rows] in [0, 1) gives the draws (a seeded request brings its own); else torch.rand.
    """
    cdf = log_probs.exp().cumsum(-1, dtype=torch.float64)
    if uniform is None:
        uniform = torch.rand(log_probs.shape[0], dtype=torch.float64, device=log_probs.device)
    u = uniform.to(torch.float64)[:, None] * cdf[:, -1:]
    # side="right": the first index whose cdf exceeds u, so zero-probability tokens are never drawn.
    return torch.searchsorted(cdf, u, side="right").squeeze(1).clamp(max=log_probs.shape[-1] - 1)


def per_token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log p(token) from logits [..., V] and ids [...], in float32."""
    logits = logits.float()
    return logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # already divided by the constant normaliser
    clipped_tokens: torch.Tensor  # how many tokens the clip (or dual clip) bound
    tokens: torch.Tensor


def clipped_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    normaliser: float,
    clip_epsilon: float = 0.2,
    dual_clip: float = 3.0,
    clip_epsilon_high: float | None = None,
) -> PolicyLoss:
    """Dual-clip PPO surrogate, summed over valid tokens and divided by a constant.

    Per token: max(-A r, -A clip(r, 1-eps, 1+eps_high)), and for A < 0 at most -A * dual_clip;
    eps_high is eps unless given. The constant (max_completion_tokens * num_sequences, Dr. GRPO)
    keeps long and short responses from being weighted differently.
    """
    high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    dual_bound = -advantages * dual_clip
    per_token = torch.where(advantages < 0, torch.minimum(per_token, dual_bound), per_token)
    bound = (clipped > unclipped) | ((advantages < 0) & (per_token == dual_bound) & (dual_bound < unclipped))
    mask = mask.to(per_token.dtype)
    return PolicyLoss(
        loss=(per_token * mask).sum() / normaliser,
        clipped_tokens=(bound.to(mask.dtype) * mask).sum().detach(),
        tokens=mask.sum().detach(),
    )


def proximal_sft_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    mask: torch.Tensor,
    tokens: float,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
) -> PolicyLoss:
    """Proximal SFT (Zhu et al. 2025): SFT as a policy gradient with advantage 1 on every
    demonstration token, through PPO's clipped ratio against the policy that started the batch.

    Per token -min(r, clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old, averaged over
    `tokens`. With A = 1 only the upper clip acts: a token whose probability has already risen
    past (1 + eps_high) * p_old gets no more gradient. At r = 1 the gradient is SFT's.
    """
    advantages = torch.ones_like(log_probs)
    return clipped_policy_loss(
        log_probs, old_log_probs, advantages, mask, tokens, epsilon_low, clip_epsilon_high=epsilon_high
    )


def kl_to_reference(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, always >= 0."""
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1.0
