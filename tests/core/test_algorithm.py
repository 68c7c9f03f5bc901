"""Hand-computed numbers for the pure math of core/algorithm.py."""

import math

import pytest
import torch

from core.algorithm import (
    clipped_policy_loss,
    demo_prefix_length,
    demo_prefix_low,
    entropy_keep_mask,
    group_advantages,
    kl_to_reference,
    lr_factor,
    per_token_log_probs,
    proximal_sft_loss,
    sample_categorical,
    token_entropy,
)


def test_learning_rate_shapes():
    # 10 steps, 2 of warm-up: (step + 1) / 2 during warm-up, then progress p = (step - 2) / 8.
    assert [lr_factor(s, 10, 2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)  # p = 4/8
    assert lr_factor(10, 10, 2, "linear") == 0.0
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # 0.5 * (1 + cos(pi/2))
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(30, 10, 0, "cosine") == pytest.approx(0.0)  # flat after the end
    assert lr_factor(0, 1, 0, "cosine") == 1.0  # one step: progress 0
    with pytest.raises(ValueError, match="shape"):
        lr_factor(0, 10, 0, "triangle")


def test_cosine_schedule_of_the_lower_bound():
    # low_t = 0.05 + 0.5 * (1 + cos(pi * t / T)) * 0.90
    assert demo_prefix_low(0, 10) == pytest.approx(0.95)
    assert demo_prefix_low(5, 10) == pytest.approx(0.50)  # cos(pi/2) = 0
    assert demo_prefix_low(1, 3) == pytest.approx(0.725)  # cos(pi/3) = 0.5 -> 0.05 + 0.675
    assert demo_prefix_low(10, 10) == pytest.approx(0.05)
    assert demo_prefix_low(25, 10) == pytest.approx(0.05)  # flat after the decay
    assert demo_prefix_low(2, 4, start=0.8, end=0.2) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("ratio", "length", "expected"),
    [
        (0.5, 10, 5),
        (0.95, 10, 9),  # floor(9.5)
        (0.99, 10, 9),  # floor(9.9) = 9 = len - 1
        (1.0, 10, 9),  # clamped: one token is always generated
        (0.05, 10, 1),  # floor(0.5) = 0, clamped up: one token is always given
        (0.0, 10, 1),
        (0.5, 2, 1),
        (0.34, 3, 1),  # floor(1.02)
        (0.67, 3, 2),  # floor(2.01)
    ],
)
def test_demo_prefix_length_clamps(ratio, length, expected):
    assert demo_prefix_length(ratio, length) == expected


def test_demo_prefix_length_needs_two_tokens():
    with pytest.raises(ValueError):
        demo_prefix_length(0.5, 1)


def test_dr_grpo_advantages_keep_the_hybrid_out_of_the_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    hybrid = torch.tensor([False, False, False, True])
    # baseline = mean(1, 0, 0) = 1/3 (not 1/2, which would include the hybrid)
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, 2 / 3])
    assert torch.allclose(group_advantages(rewards, hybrid, "dr_grpo"), expected)


def test_grpo_advantages_divide_by_the_on_policy_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    hybrid = torch.tensor([False, False, False, True])
    std = math.sqrt(2 / 9)  # population std of (1, 0, 0)
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, 2 / 3]) / (std + 1e-6)
    assert torch.allclose(group_advantages(rewards, hybrid, "grpo"), expected)


def test_identical_rewards_give_zero_advantage():
    advantages = group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.bool), "grpo")
    assert torch.equal(advantages, torch.zeros(4))


def test_a_group_without_on_policy_rollouts_is_refused():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2), torch.ones(2, dtype=torch.bool))


def test_entropy_mask_keeps_exactly_the_top_fraction_of_prefix_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2], [0.8, 0.7, 0.4, 0.6, 0.05]])
    prefix = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
    # 5 prefix tokens, ceil(0.2 * 5) = 1 kept: the 0.9; every non-prefix token is kept.
    keep = entropy_keep_mask(entropy, prefix, 0.2)
    assert keep.tolist() == [[False, True, False, True, True], [False, False, True, True, True]]
    # ceil(0.5 * 5) = 3 kept: 0.9, 0.8, 0.7
    keep = entropy_keep_mask(entropy, prefix, 0.5)
    assert keep.tolist() == [[False, True, False, True, True], [True, True, True, True, True]]


def test_entropy_mask_with_ties_keeps_exactly_k():
    entropy = torch.ones(2, 5)
    prefix = torch.ones(2, 5, dtype=torch.bool)
    keep = entropy_keep_mask(entropy, prefix, 0.2)
    assert int(keep.sum()) == 2  # ceil(0.2 * 10)


def test_entropy_mask_leaves_rows_without_prefix_untouched():
    entropy = torch.rand(3, 4)
    prefix = torch.zeros(3, 4, dtype=torch.bool)
    assert entropy_keep_mask(entropy, prefix, 0.2).all()


def test_entropy_mask_handles_more_tokens_than_quantile_allows():
    # torch.quantile refuses inputs over 16.7M elements; the mask must not.
    n = 17_000_000
    entropy = torch.rand(1, n)
    prefix = torch.ones(1, n, dtype=torch.bool)
    keep = entropy_keep_mask(entropy, prefix, 0.2)
    assert int(keep.sum()) == math.ceil(0.2 * n)
    threshold = entropy[keep].min()
    assert bool((entropy[~keep] <= threshold).all())


def test_token_entropy_of_uniform_and_one_hot():
    uniform = torch.zeros(1, 4)
    assert token_entropy(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_per_token_log_probs():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert per_token_log_probs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))


def test_dual_clip_loss_hand_computed():
    advantages = torch.tensor([[1.0, -1.0, -1.0, 2.0, 5.0]])
    ratios = torch.tensor([[1.5, 0.5, 5.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token is padding
    old = torch.zeros(1, 5)
    result = clipped_policy_loss(torch.log(ratios), old, advantages, mask, normaliser=8.0)
    # A=1,  r=1.5: max(-1.5, -1.2) = -1.2          (clipped)
    # A=-1, r=0.5: max(0.5, 0.8) = 0.8, min(0.8, 3) (clipped)
    # A=-1, r=5:   max(5, 1.2) = 5 -> dual clip 3   (clipped)
    # A=2,  r=1:   -2
    assert result.loss.item() == pytest.approx((-1.2 + 0.8 + 3.0 - 2.0) / 8.0)
    assert result.clipped_tokens.item() == 3
    assert result.tokens.item() == 4


def test_proximal_sft_loss_hand_computed():
    # Ratios 0.5, 1, 1.5 and 1.2 (masked out), eps 0.2 / 0.28, advantage 1 on every token:
    #   r=0.5: -min(0.5, 0.8)  = -0.5,  gradient d/dlogp = -r = -0.5 (the lower clip never acts)
    #   r=1:   -min(1, 1)      = -1,    gradient -1
    #   r=1.5: -min(1.5, 1.28) = -1.28, gradient 0 (risen past 1.28 p_old: clipped)
    ratios = torch.tensor([[0.5, 1.0, 1.5, 1.2]])
    log_probs = torch.log(ratios).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0]])
    result = proximal_sft_loss(log_probs, torch.zeros(1, 4), mask, tokens=3.0)
    result.loss.backward()
    assert result.loss.item() == pytest.approx(-(0.5 + 1.0 + 1.28) / 3)
    assert log_probs.grad[0].tolist() == pytest.approx([-0.5 / 3, -1 / 3, 0.0, 0.0])
    assert result.clipped_tokens.item() == 1 and result.tokens.item() == 3


def test_proximal_sft_at_ratio_one_has_the_cross_entropy_gradient():
    log_probs = torch.tensor([[-0.3, -2.0], [-1.1, -0.7]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    proximal_sft_loss(log_probs, log_probs.detach(), mask, tokens=3.0).loss.backward()
    proximal = log_probs.grad.clone()
    log_probs.grad = None
    ((-log_probs * mask).sum() / 3.0).backward()
    assert torch.equal(proximal, log_probs.grad)


def test_loss_aggregation_is_a_constant_not_per_sequence_length():
    # Two sequences, 1 and 3 tokens, all with A = 1 and ratio 1: each token's gradient is
    # -1 / normaliser whatever its sequence's length (Dr. GRPO), unlike a per-sequence mean.
    log_probs = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    result = clipped_policy_loss(log_probs, log_probs.detach(), torch.ones(2, 3), mask, normaliser=6.0)
    result.loss.backward()
    expected = -mask.float() / 6.0
    assert torch.allclose(log_probs.grad, expected)
    assert result.loss.item() == pytest.approx(-4 / 6)


def test_k3_kl_estimate():
    log_probs = torch.log(torch.tensor([0.5]))
    reference = torch.log(torch.tensor([0.25]))
    # exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    assert kl_to_reference(log_probs, reference).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_to_reference(log_probs, log_probs).item() == 0.0


def test_categorical_sampling_matches_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    log_probs = torch.log(probs).expand(200_000, -1)
    torch.manual_seed(0)
    draws = sample_categorical(log_probs)
    frequencies = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert frequencies[1] == 0 and frequencies[4] == 0  # zero-probability tokens never drawn
    assert torch.allclose(frequencies, probs.double(), atol=0.005)


def test_categorical_sampling_normalises_unnormalised_log_probs():
    log_probs = torch.tensor([[0.0, 0.0, -1e9], [5.0, -1e9, -1e9]])
    torch.manual_seed(1)
    draws = torch.stack([sample_categorical(log_probs) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {0}


def test_categorical_sampling_inverts_the_cdf_at_given_uniforms():
    # cdf = [0.5, 0.5, 0.8, 1.0]: u below 0.5 -> 0, in (0.5, 0.8) -> 2 (never the empty token 1), above 0.8 -> 3.
    log_probs = torch.log(torch.tensor([0.5, 0.0, 0.3, 0.2])).expand(6, -1)
    uniform = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.999])
    assert sample_categorical(log_probs, uniform).tolist() == [0, 0, 2, 2, 3, 3]
