"""IFPO as specified in docs/method.md section 5, one test per property."""

import ast
import math
from pathlib import Path

import pytest
import torch

from ifpo import group_advantages, ifpo_advantages, inverse_frequency_weights, policy_loss


def random_groups(num_groups=50, group_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_groups * group_size, generator=g) < torch.rand(
        num_groups, generator=g
    ).repeat_interleave(group_size)


def test_weights_average_to_one_before_clipping():
    m = random_groups()
    w = inverse_frequency_weights(m, 8, tau=0.5, w_min=0.0, w_max=math.inf)
    assert torch.allclose(w.reshape(-1, 8).mean(1), torch.ones(50), atol=1e-6)


@pytest.mark.parametrize("value", [True, False])
def test_single_behaviour_group_is_plain_grpo(value):
    m = torch.full((8,), value)
    assert torch.equal(inverse_frequency_weights(m, 8), torch.ones(8))
    r = torch.rand(8)
    assert torch.allclose(ifpo_advantages(r, m, 8), group_advantages(r, 8))


def test_tau_zero_is_grpo():
    m, r = random_groups(), torch.rand(400)
    assert torch.equal(ifpo_advantages(r, m, 8, tau=0.0), group_advantages(r, 8))


def test_tau_one_gives_both_behaviours_equal_total_weight():
    m = random_groups()
    w = inverse_frequency_weights(m, 8, tau=1.0, w_min=0.0, w_max=math.inf).reshape(-1, 8)
    mg = m.reshape(-1, 8)
    mixed = (mg.sum(1) > 0) & (mg.sum(1) < 8)
    assert mixed.sum() > 10
    tool_total = (w * mg).sum(1)[mixed]
    direct_total = (w * ~mg).sum(1)[mixed]
    assert torch.allclose(tool_total, direct_total, atol=1e-5)


@pytest.mark.parametrize("n_tool,w_tool,w_direct", [(6, 0.845, 1.464), (7, 0.829, 2.194)])
def test_paper_worked_examples(n_tool, w_tool, w_direct):
    m = torch.tensor([True] * n_tool + [False] * (8 - n_tool))
    w = inverse_frequency_weights(m, 8, tau=0.5)
    assert w[0].item() == pytest.approx(w_tool, abs=1e-3)
    assert w[-1].item() == pytest.approx(w_direct, abs=1e-3)


def test_weights_are_clipped_to_bounds():
    m = torch.tensor([True] * 7 + [False])
    w = inverse_frequency_weights(m, 8, tau=1.0, w_min=0.6, w_max=2.0)
    assert w.max().item() == pytest.approx(2.0) and w.min().item() == pytest.approx(0.6)


def test_rarer_behaviour_gets_larger_weight():
    m = random_groups()
    w = inverse_frequency_weights(m, 8).reshape(-1, 8)
    mg = m.reshape(-1, 8)
    for wg, g in zip(w, mg):
        n = int(g.sum())
        if 0 < n < 4:
            assert wg[g].min() > wg[~g].max()
        elif 4 < n < 8:
            assert wg[~g].min() > wg[g].max()


def test_group_advantages_hand_computed():
    a = group_advantages(torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 5.0]), 3, eps=0.0)
    s = math.sqrt(2 / 3)
    assert torch.allclose(a[:3], torch.tensor([-1 / s, 0.0, 1 / s]))


def test_zero_spread_group_gets_zero_advantage():
    a = ifpo_advantages(torch.tensor([1.5, 1.5, 1.5, 1.5]), torch.tensor([1, 1, 0, 0]).bool(), 4)
    assert torch.equal(a, torch.zeros(4))


# rewards Eq. 1 can give (sums of 1.5, 0.5, 1.0 and -0.4 steps, -0.2 tool penalties) and arbitrary floats
EQUAL_REWARDS = sorted(
    {round(1.5 - 0.4 * k - 0.2 * j, 2) for k in range(6) for j in range(6)}
    | {0.1, 0.3, 0.6, 0.7, 0.9, 1.9, 2.5, 1 / 3, math.pi, -1e-3, 12345.678, 1e-7}
)


@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 5, 7, 8, 12, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equal_rewards_give_exactly_zero_advantage_for_any_value(group_size, dtype):
    """In float32 a group of eight 0.7s used to get advantage +0.056 (the mean's rounding error / eps)."""
    values = torch.tensor(EQUAL_REWARDS, dtype=dtype)
    rewards = values.repeat_interleave(group_size)  # one group per value
    m = torch.arange(rewards.numel()) % 2 == 0  # mixed behaviours, so IFPO weights are not all 1
    assert torch.equal(group_advantages(rewards, group_size), torch.zeros(rewards.numel()))
    assert torch.equal(ifpo_advantages(rewards, m, group_size), torch.zeros(rewards.numel()))


def test_a_tied_group_beside_a_spread_one_stays_zero_and_the_other_is_standardised():
    a = group_advantages(torch.tensor([0.7] * 8 + [0.0] * 4 + [1.5] * 4), 8)
    assert torch.equal(a[:8], torch.zeros(8))
    assert a[8:].mean().abs().item() < 1e-6 and a[8:].std(correction=0).item() == pytest.approx(1.0, abs=1e-5)


def test_ifpo_advantage_is_weight_times_grpo_advantage():
    m, r = random_groups(), torch.rand(400)
    assert torch.allclose(ifpo_advantages(r, m, 8), inverse_frequency_weights(m, 8) * group_advantages(r, 8))


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="groups of 8"):
        group_advantages(torch.rand(10), 8)
    with pytest.raises(ValueError, match="1-d"):
        inverse_frequency_weights(torch.ones(2, 8).bool(), 8)


def test_policy_loss_equals_hand_computation():
    lp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -0.1, -0.7]])
    old = torch.tensor([[-1.0, -1.0, -1.0], [-0.3, -0.5, -0.2]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    loss, stats = policy_loss(lp, old, adv, mask, clip_eps=0.2)
    # hand: token (0,1) ratio e^0.5=1.6487 -> clipped 1.2, A=1: min(1.6487, 1.2) = 1.2
    #       token (0,2) ratio e^-1=0.3679, A=1: min(0.3679, 0.8) = 0.3679 (unclipped)
    #       token (1,0) ratio 1, A=-2: -2
    #       token (1,1) ratio e^0.4=1.4918, A=-2: min(-2.9836, -2.4) = -2.9836 (unclipped)
    expected = -(1.2 + math.exp(-1) - 2.0 - 2 * math.exp(0.4)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["clip_frac"] == pytest.approx(1 / 4)  # only (0,1) lost its gradient to the clip
    assert stats["num_tokens"] == 4


def test_masked_tokens_get_no_gradient():
    lp = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert torch.all(lp.grad[mask == 0] == 0)
    assert torch.all(lp.grad[mask == 1] != 0)


def test_token_mean_counts_every_trained_token_of_the_batch():
    """DAPO: a long rollout weighs in proportion to its length, not 1/B."""
    lp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor([1.0, 1.0]), mask)
    loss.backward()
    assert torch.allclose(lp.grad[mask == 1], torch.full((5,), -1 / 5))


def test_micro_batches_with_num_tokens_sum_to_full_batch_loss():
    lp, old = torch.randn(4, 6), torch.randn(4, 6)
    adv = torch.randn(4)
    mask = (torch.rand(4, 6) > 0.3).long()
    full, _ = policy_loss(lp, old, adv, mask)
    n = float(mask.sum())
    parts = [
        policy_loss(lp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], num_tokens=n)[0]
        for i in (0, 2)
    ]
    assert torch.allclose(full, sum(parts))


def test_on_policy_loss_is_minus_mean_advantage():
    lp = torch.randn(3, 4)
    adv = torch.tensor([1.0, -1.0, 0.5])
    mask = torch.ones(3, 4)
    loss, stats = policy_loss(lp, lp, adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert stats["approx_kl"] == pytest.approx(0.0) and stats["ratio_mean"] == pytest.approx(1.0)


def test_kl_penalty_uses_k3_and_needs_a_reference():
    lp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1)
    loss, stats = policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, beta=0.1)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert stats["kl_ref"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(0.1 * k3, rel=1e-5)


def test_ifpo_imports_nothing_but_torch_and_stdlib():
    tree = ast.parse((Path(__file__).resolve().parents[1] / "ifpo.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"torch", "__future__", "math", "typing", "dataclasses"}
