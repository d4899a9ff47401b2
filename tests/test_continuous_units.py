"""Unit tests for the pieces of gac_continuous.py that can be wrong quietly."""

import dataclasses
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import gac_continuous as gac


def tiny_args(**overrides) -> gac.Args:
    defaults = dict(d_model=16, n_layer=2, n_head=2, prior_layers=1, n_latent=3, context_len=4, dropout=0.0)
    return gac.Args(**(defaults | overrides))


def tiny_model(obs_dim=3, act_dim=2, max_len=16, **overrides) -> gac.GAC:
    """A small random model whose return head is initialised wide enough that E[y | z] varies with z."""
    torch.manual_seed(0)
    model = gac.GAC(obs_dim, act_dim, tiny_args(**overrides), max_len)
    for layer in model.return_head:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.5)
    return model


# ---- returns, normalised scores, state normalisation ----


def test_episode_returns_are_undiscounted_sums():
    rewards = [np.array([1.0, 2.0, 3.0]), np.array([-1.0]), np.full(1000, 0.1, dtype=np.float32)]
    np.testing.assert_allclose(gac.episode_returns(rewards), [6.0, -1.0, 100.0], rtol=1e-6)


def test_normalised_score_maps_reference_scores_to_0_and_1():
    y = gac.normalize_returns(np.array([-20.0, 3000.0, 1490.0]), ref_min=-20.0, ref_max=3000.0)
    np.testing.assert_allclose(y, [0.0, 1.0, 0.5])


def test_reference_scores_come_from_metadata_or_the_dataset_range():
    class Storage:
        metadata = {"ref_min_score": -5.0, "ref_max_score": 15.0}

    class Dataset:
        storage = Storage()

    assert gac.reference_scores(Dataset(), np.array([1.0, 2.0]))[:2] == (-5.0, 15.0)
    Storage.metadata = {}
    ref_min, ref_max, text = gac.reference_scores(Dataset(), np.array([1.0, 4.0, 2.0]))
    assert (ref_min, ref_max) == (1.0, 4.0) and "no reference scores" in text


def test_state_normaliser_standardises_and_keeps_constant_dimensions_finite():
    rng = np.random.default_rng(0)
    states = np.concatenate([rng.normal(5.0, 3.0, size=(1000, 2)), np.full((1000, 1), 7.0)], axis=1)
    normalize = gac.StateNormalizer(states.astype(np.float32))
    out = normalize(states)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, :2].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(out[:, :2].std(0), 1.0, atol=1e-4)
    assert np.all(out[:, 2] == 0.0)
    # a dimension constant in the data that moves online: divided by the floor 1e-3, large but finite
    assert normalize(np.array([[5.0, 5.0, 8.0]], dtype=np.float32))[0, 2] == pytest.approx(1000.0)


# ---- padding and masks ----


def test_action_scaling_is_the_identity_on_unit_boxes_and_inverts_on_others():
    unit = gac.ActionScaler(gym.spaces.Box(-1.0, 1.0, (3,), np.float32))
    actions = np.array([[1e-9, -0.3, 1.0], [-1.0, -0.0, 0.7]], dtype=np.float32)
    assert np.array_equal(unit.to_model(actions), actions) and np.array_equal(unit.to_env(actions), actions)
    box = gac.ActionScaler(gym.spaces.Box(np.array([-0.4, 0.0], np.float32), np.array([0.4, 4.0], np.float32)))
    assert np.allclose(box.to_env(np.array([[-1.0, -1.0], [0.0, 0.5], [1.0, 1.0]])), [[-0.4, 0], [0, 3], [0.4, 4]])
    some = np.array([[0.1, 3.9], [-0.39, 0.2]], dtype=np.float32)
    np.testing.assert_allclose(box.to_env(box.to_model(some)), some, rtol=1e-6)
    assert box.to_model(some).dtype == np.float32


def test_padding_and_mask_keep_every_step_and_nothing_more():
    states = [np.ones((3, 2)), 2 * np.ones((5, 2))]
    actions = [np.ones((3, 1)), 2 * np.ones((5, 1))]
    padded_states, padded_actions, lengths = gac.pad_trajectories(states, actions, 8, torch.device("cpu"))
    assert padded_states.shape == (2, 8, 2) and padded_actions.shape == (2, 8, 1)
    assert lengths.tolist() == [3, 5]
    mask = gac.valid_mask(lengths, 8)
    assert mask.sum(1).tolist() == [3.0, 5.0]
    assert torch.equal(padded_actions[..., 0] != 0, mask.bool())
    assert padded_states[0, 3:].abs().sum() == 0 and padded_states[1, :5].eq(2).all()


# ---- the KL and free bits ----


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gac.gaussian_kl(mu, logvar), expected)
    assert gac.gaussian_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)).abs().max() == 0


def test_free_bits_clamp_each_token_and_stop_its_gradient():
    kl = torch.tensor([[0.2, 3.0], [0.4, 5.0]], requires_grad=True)  # token 0 averages 0.3 nats, token 1 4.0
    total = gac.free_bits_kl(kl, free_bits=1.0)
    assert total.item() == pytest.approx(1.0 + 4.0)
    (grad,) = torch.autograd.grad(total, kl)
    assert torch.all(grad[:, 0] == 0) and torch.allclose(grad[:, 1], torch.tensor(0.5))
    assert gac.free_bits_kl(kl, 0.0).item() == pytest.approx(0.3 + 4.0)
    # the floor is on the batch average, not on each trajectory: a token at 0.2 and 2.2 nats (mean 1.2) is free of it
    straddling = torch.tensor([[0.2], [2.2]], requires_grad=True)
    assert gac.free_bits_kl(straddling, 1.0).item() == pytest.approx(1.2)  # 1.6 if each row were clamped first
    (grad,) = torch.autograd.grad(gac.free_bits_kl(straddling, 1.0), straddling)
    assert torch.allclose(grad, torch.tensor([[0.5], [0.5]]))


# ---- the exploration target ----


def test_exploration_target_is_quantile_plus_delta():
    returns = torch.arange(101, dtype=torch.float32) / 100  # 0.00 .. 1.00
    assert gac.exploration_target(returns, 0.8, 0.1) == pytest.approx(0.9)
    assert gac.exploration_target(returns, 1.0, 0.0) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    values = rng.normal(size=37)
    assert gac.exploration_target(torch.tensor(values), 0.3, -0.2) == pytest.approx(np.quantile(values, 0.3) - 0.2)


# ---- the model ----


def test_block_time_embedding_is_the_position_in_the_block():
    model = tiny_model(time_embedding="block", max_len=16).eval()
    assert model.generator.embed_timestep.num_embeddings == 4  # the context, not the episode length
    states, actions, plan = torch.randn(1, 8, 3), torch.randn(1, 8, 2), torch.randn(1, 3, 16)
    with torch.no_grad():
        early = model.generator(states, actions, torch.arange(8)[None], plan)
        late = model.generator(states, actions, torch.arange(400, 408)[None], plan)  # far past any training length
    assert torch.equal(early, late)


def test_generator_is_causal_within_a_block_and_blind_across_blocks():
    model = tiny_model().eval()
    B, T = 1, 8  # two blocks of context_len=4
    states, actions = torch.randn(B, T, 3), torch.randn(B, T, 2)
    timesteps = torch.arange(T).expand(B, T)
    plan = torch.randn(B, 2, 16)
    base = model.generator(states, actions, timesteps, plan)
    changed = states.clone()
    changed[0, 5] += 1.0  # a state in the second block
    out = model.generator(changed, actions, timesteps, plan)
    assert torch.equal(out[0, :5], base[0, :5])  # the past never sees the future
    assert not torch.allclose(out[0, 5:], base[0, 5:])  # later steps of the block do see it
    changed_action = actions.clone()
    changed_action[0, 1] += 1.0  # a_1 may change a_2, a_3 but not a_0, a_1 (a_t is read from s_t) nor block 2
    out = model.generator(states, changed_action, timesteps, plan)
    assert torch.equal(out[0, :2], base[0, :2]) and torch.equal(out[0, 4:], base[0, 4:])
    assert not torch.allclose(out[0, 2:4], base[0, 2:4])


def gac_nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_plan_depends_on_the_initial_state_and_the_latent():
    model = tiny_model().eval()
    z0, s0 = torch.randn(2, 3, 16), torch.randn(2, 3)
    y = model.predicted_return(z0, s0)
    assert y.shape == (2,)
    assert not torch.allclose(model.predicted_return(z0, s0 + 1.0), y)
    assert not torch.allclose(model.predicted_return(z0 + 1.0, s0), y)


# ---- inference ----


def test_gradient_ascent_raises_the_expected_return():
    model = tiny_model().eval()
    args = tiny_args(num_candidates=8, exploit_steps=30, exploit_lr=0.05, exploit_kl_weight=0.0)
    s0 = torch.randn(5, 3)
    torch.manual_seed(1)
    z0, trace, best = gac.exploit_plans(model, s0, args, gac_nullcontext)
    assert trace.shape == (31, 5, 8) and z0.shape == (5, 3, 16)
    assert (trace[-1].mean() > trace[0].mean() + 1e-3).item()
    chosen = trace[-1, torch.arange(5), best]
    assert torch.equal(chosen, trace[-1].max(1).values)  # with no penalty the best is the highest E[y | z]
    torch.testing.assert_close(model.predicted_return(z0, s0), chosen, atol=1e-5, rtol=1e-5)
    # the KL penalty lambda/2 ||z0||^2 pulls the plans towards the prior's mode, and ranks the candidates with E[y | z]
    torch.manual_seed(1)
    near, trace, best = gac.exploit_plans(model, s0, dataclasses.replace(args, exploit_kl_weight=1.0), gac_nullcontext)
    assert near.pow(2).sum((1, 2)).mean() < z0.pow(2).sum((1, 2)).mean()
    torch.manual_seed(1)
    start = torch.randn(5 * 8, 3, 16)  # the same candidates before the ascent: the penalty shrank every one
    candidates_norm = start.pow(2).sum((1, 2)).view(5, 8)
    assert (near.pow(2).sum((1, 2)) < candidates_norm[torch.arange(5), best]).all()


def test_prior_ablation_uses_one_unoptimised_prior_sample():
    model = tiny_model().eval()
    args = tiny_args(num_candidates=1, exploit_steps=0)
    torch.manual_seed(3)
    z0, trace, _ = gac.exploit_plans(model, torch.randn(4, 3), args, gac_nullcontext)
    torch.manual_seed(3)
    torch.randn(4, 3)
    assert trace.shape == (1, 4, 1) and torch.equal(z0, torch.randn(4, 3, 16))


def test_local_variational_inference_raises_the_elbo():
    torch.manual_seed(0)
    target = torch.randn(6, 3, 16)

    def log_likelihood(z0):  # a Gaussian likelihood around `target`
        return -0.5 * ((z0 - target) ** 2).sum((1, 2)) / 0.1

    def elbo(mu, logvar, eps):
        z0 = mu + (0.5 * logvar).exp() * eps
        return (log_likelihood(z0) - gac.gaussian_kl(mu, logvar).sum(1)).mean()

    mu, logvar, eps = torch.zeros(6, 3, 16), torch.full((6, 3, 16), -5.0), torch.randn(6, 3, 16)
    new_mu, new_logvar = gac.fit_local_posteriors(mu, logvar, eps, log_likelihood, steps=20, lr=0.1, free_bits=0.0)
    assert elbo(new_mu, new_logvar, eps) > elbo(mu, logvar, eps) + 10
    assert ((new_mu - target).norm() < (mu - target).norm()).item()


def test_exploration_plans_move_the_prediction_towards_the_target():
    model = tiny_model().eval()
    s0 = torch.randn(16, 3)
    with torch.no_grad():
        prior_prediction = model.predicted_return(torch.randn(16, 3, 16), s0)
    target = float(prior_prediction.mean() + 2 * prior_prediction.std())
    args = tiny_args(explore_steps=60, explore_lr=0.1, return_std=0.01)
    z0 = gac.explore_plans(model, s0, target, args, gac_nullcontext)
    assert z0.shape == (16, 3, 16)
    error_after = (model.predicted_return(z0, s0) - target).abs().mean()
    assert error_after < (prior_prediction - target).abs().mean()


def test_prior_targets_are_per_state_quantiles_of_the_prior_predictive():
    model = tiny_model().eval()
    s0 = torch.randn(5, 3) * 3
    args = tiny_args(quantile=0.8, delta_y=0.1)
    torch.manual_seed(3)
    targets = gac.prior_exploration_targets(model, s0, args, gac_nullcontext, samples=64)
    torch.manual_seed(3)
    z0 = torch.randn(5 * 64, 3, 16)
    with torch.no_grad():
        y_hat = model.predicted_return(z0, s0.repeat_interleave(64, dim=0)).view(5, 64)
    for i in range(5):  # row i holds the 64 plans of state i
        assert targets[i].item() == pytest.approx(np.quantile(y_hat[i].numpy(), 0.8) + 0.1, abs=1e-5)
    assert targets.std() > 0  # the start state matters to this model, so the targets differ


def test_exploration_plans_follow_a_target_per_state():
    model = tiny_model().eval()
    s0 = torch.randn(16, 3)
    with torch.no_grad():
        prior_prediction = model.predicted_return(torch.randn(16, 3, 16), s0)
    spread = prior_prediction.std()
    target = prior_prediction.mean() + torch.where(torch.arange(16) < 8, -spread, spread)
    args = tiny_args(explore_steps=60, explore_lr=0.1, return_std=0.01)
    z0 = gac.explore_plans(model, s0, target, args, gac_nullcontext)
    with torch.no_grad():
        reached = model.predicted_return(z0, s0)
    assert reached[8:].mean() - reached[:8].mean() > spread  # low targets low, high targets high


def test_train_iteration_fills_the_local_posteriors_and_returns_every_term():
    torch.manual_seed(0)
    model = tiny_model(max_len=8)
    args = tiny_args(batch_size=3, inner_steps=2)
    states, actions, lengths = gac.pad_trajectories(
        [np.random.randn(n, 3) for n in (3, 8, 5)], [np.random.rand(n, 2) * 2 - 1 for n in (3, 8, 5)], 8, "cpu"
    )
    buffer = gac.TrajectoryBuffer(
        states, actions, lengths, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1, 0.5, 0.9])
    )
    mu, logvar = torch.zeros(3, 3, 16), torch.full((3, 3, 16), -5.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    sampler, generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(0)
    losses = gac.train_iteration(
        model, optimizer, scheduler, buffer, 3, mu, logvar, args, sampler, generator, gac_nullcontext
    )
    assert not any(key.startswith("charts/plan_gain") for key in losses)  # measured only when asked
    expected = {"losses/action_nll_per_step", "losses/return_nll", "losses/return_mse", "losses/kl",
                "losses/kl_free_bits", "losses/elbo", "charts/posterior_std", "charts/tokens"}  # fmt: skip
    assert set(losses) == expected
    assert all(torch.isfinite(torch.as_tensor(v)) for v in losses.values())
    kl = float(losses["losses/kl"])
    assert float(losses["losses/kl_free_bits"]) >= kl - 1e-5 * max(1.0, abs(kl))  # float32 sums of ~100
    assert mu.abs().sum() > 0  # the batch's posteriors moved and were written back
    assert buffer.lengths.device.type == "cpu"  # batches are drawn on the host: see train_iteration
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_plan_gain_measures_how_much_the_generator_reads_the_plan():
    """charts/plan_gain_*: log-likelihoods with the posterior plan minus with a prior one. Zero for the actions
    where the generator cannot read the plan (its cross-attention outputs zeroed), not zero where it can."""
    gains = []
    for reads_plan in (False, True):
        model = tiny_model(max_len=8)
        if not reads_plan:
            for block in model.generator.blocks:  # cross-attention adds nothing: the plan cannot reach the actions
                torch.nn.init.zeros_(block.cross_attn.proj.weight)
                torch.nn.init.zeros_(block.cross_attn.proj.bias)
        for weight in model.generator.parameters() if reads_plan else ():
            torch.nn.init.normal_(weight, std=0.3)  # a plan that moves the actions visibly
        args = tiny_args(batch_size=3, inner_steps=2)
        states, actions, lengths = gac.pad_trajectories(
            [np.random.randn(n, 3) for n in (3, 8, 5)], [np.random.rand(n, 2) * 2 - 1 for n in (3, 8, 5)], 8, "cpu"
        )
        buffer = gac.TrajectoryBuffer(states, actions, lengths, torch.ones(3), torch.tensor([0.1, 0.5, 0.9]))
        mu, logvar = torch.randn(3, 3, 16), torch.full((3, 3, 16), -5.0)  # posteriors already away from the prior
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the measurement sees the model as it was
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
        losses = gac.train_iteration(
            model, optimizer, scheduler, buffer, 3, mu, logvar, args, torch.Generator().manual_seed(1),
            torch.Generator().manual_seed(0), gac_nullcontext, measure_plan=True,
        )  # fmt: skip
        gains.append((float(losses["charts/plan_gain_action_per_step"]), float(losses["charts/plan_gain_return"])))
        assert model.training  # as after any update
    (ignored_action, ignored_return), (read_action, _) = gains
    assert ignored_action == 0.0 and ignored_return != 0.0  # the return head still reads the plan
    assert abs(read_action) > 1e-3


def test_sample_batch_weights_by_length_and_gives_online_data_its_share():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([100, 0, 300, 50, 50])  # 3 dataset trajectories, then 2 collected online
    # offline phase: the buffer is all dataset, indices in proportion to length (a length-0 one never drawn)
    idx = gac.sample_batch(lengths[:3], 3, 4000, 0.5, generator)
    assert idx.max() <= 2 and not (idx == 1).any()
    assert abs((idx == 2).float().mean().item() - 0.75) < 0.03
    # online phase: exactly half the batch from the online trajectories, the rest from the dataset
    idx = gac.sample_batch(lengths, 3, 4000, 0.5, generator)
    assert (idx >= 3).sum() == 2000 and (idx[:2000] < 3).all()
    assert (gac.sample_batch(lengths, 3, 10, 1.0, generator) >= 3).all()
    assert (gac.sample_batch(lengths, 3, 10, 0.0, generator) < 3).all()
    # the default share, 0.1, of a batch of 64 is 6 rows; of a small batch it is still one, not none
    assert (gac.sample_batch(lengths, 3, 64, 0.1, generator) >= 3).sum() == 6
    assert (gac.sample_batch(lengths, 3, 4, 0.1, generator) >= 3).sum() == 1
    # --sample-by uniform: every non-empty trajectory equally likely
    idx = gac.sample_batch(lengths[:3], 3, 4000, 0.5, generator, by_length=False)
    assert not (idx == 1).any() and abs((idx == 2).float().mean().item() - 0.5) < 0.03


def test_sample_blocks_draws_valid_blocks_and_weights_them():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([32, 9, 3])  # 8, 3 and 1 valid blocks of 4 steps
    index, weight = gac.sample_blocks(lengths, 4, 8, 2, generator)
    assert index.shape == (3, 2)
    assert (index[0] < 8).all() and index[0, 0] != index[0, 1] and (index[1] < 3).all()
    assert index[2, 0] == 0  # the only valid block comes first; the second pick is padding (masked)
    assert torch.allclose(weight, torch.tensor([4.0, 1.5, 1.0]))


def test_log_likelihood_of_random_blocks_is_unbiased():
    """Blocks are independent given the plan, so weight x (log-likelihood of the drawn blocks) averages to the
    whole trajectory's log-likelihood."""
    model = tiny_model(max_len=32).eval()
    generator = torch.Generator().manual_seed(1)
    states, actions, lengths = gac.pad_trajectories(
        [np.random.randn(n, 3) for n in (32, 13)], [np.random.rand(n, 2) * 2 - 1 for n in (32, 13)], 32, "cpu"
    )
    mask, timesteps = gac.valid_mask(lengths, 32), torch.arange(32).expand(2, 32)
    z0, y = torch.randn(2, 3, 16), torch.zeros(2)
    with torch.no_grad():
        full, _, _ = gac.log_likelihoods(model, z0, states[:, 0], states, actions, timesteps, mask, y, 0.1)
        rows, estimates = torch.arange(2)[:, None], []
        for _ in range(400):
            blocks, weight = gac.sample_blocks(lengths, 4, 8, 3, generator)
            picked = [x.reshape(2, 8, 4, *x.shape[2:])[rows, blocks].flatten(1, 2)
                      for x in (states, actions, timesteps, mask)]  # fmt: skip
            part, _, _ = gac.log_likelihoods(model, z0, states[:, 0], *picked, y, 0.1)
            estimates.append(weight * part)
    estimate = torch.stack(estimates)
    assert torch.allclose(estimate.mean(0), full, atol=4 * estimate.std(0).max().item() / 20)
    assert estimate.std(0).min() > 0  # the estimate does vary: the test would see a bias


def test_train_iteration_with_inner_blocks_runs_and_is_deterministic():
    results = []
    for _ in range(2):
        model = tiny_model(max_len=32)
        args = tiny_args(batch_size=4, inner_steps=2, inner_blocks=2)
        states, actions, lengths = gac.pad_trajectories(
            [np.ones((n, 3)) * n for n in (32, 20, 7)], [np.zeros((n, 2)) for n in (32, 20, 7)], 32, "cpu"
        )
        buffer = gac.TrajectoryBuffer(states, actions, lengths, torch.zeros(3), torch.tensor([0.1, 0.5, 0.9]))
        mu, logvar = torch.zeros(3, 3, 16), torch.full((3, 3, 16), -5.0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
        sampler, generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(0)
        losses = gac.train_iteration(
            model, optimizer, scheduler, buffer, 3, mu, logvar, args, sampler, generator, gac_nullcontext
        )
        results.append((float(losses["losses/elbo"]), mu.clone()))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0


def test_active_latent_dims_sees_collapse():
    assert gac.active_latent_dims(torch.zeros(50, 2, 4)) == 0
    mu = torch.zeros(50, 2, 4)
    mu[:, 0, 1] = torch.linspace(-1, 1, 50)
    assert gac.active_latent_dims(mu) == 1


# ---- checkpoints ----


def test_read_episodes_caches_and_notices_a_rewritten_dataset(minari_root):
    import os

    import minari
    from tiny_datasets import make_tiny_dataset

    dataset = make_tiny_dataset("test/hopper/cache-v0", episodes=3, seed=0)
    fresh = gac.read_episodes(dataset, cache=False)
    first, second = gac.read_episodes(dataset), gac.read_episodes(dataset)  # writes the cache, then reads it
    for a, b, c in zip(fresh, first, second, strict=True):
        assert len(a) == 3
        for x, y, z in zip(a, b, c, strict=True):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)
    folder = minari.storage.get_dataset_path("test/hopper/cache-v0")
    path = os.path.join(folder, "gac_continuous_cache.npz")
    cached = dict(np.load(path))
    np.savez(path, **(cached | {"states": cached["states"] + 1}))  # a cache that differs from the data
    assert gac.read_episodes(dataset)[0][0][0, 0] == fresh[0][0][0, 0] + 1  # it is what the next run reads
    stored = os.path.join(folder, "data", "main_data.hdf5")  # the dataset rewritten in place: the folder's time stays
    folder_times = os.stat(os.path.join(folder, "data")).st_mtime_ns
    os.utime(stored, (1e9, 1e9))
    assert os.stat(os.path.join(folder, "data")).st_mtime_ns == folder_times
    np.testing.assert_array_equal(gac.read_episodes(dataset)[0][0], fresh[0][0])


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "posterior_mu": torch.randn(4, 3, 16),
             "iteration": 7, "args": {"seed": 1, "fixed_target": None}, "metrics": '{"a": 1}'}  # fmt: skip
    path = str(tmp_path / "checkpoint.pt")
    gac.save_checkpoint(path, state)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    loaded = torch.load(path, weights_only=True)
    other = gac.GAC(3, 2, tiny_args(), 16)
    other.load_state_dict(loaded["model"])
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(loaded["posterior_mu"], state["posterior_mu"]) and loaded["iteration"] == 7


# ---- vectorised rollouts: no step lost or doubled ----


class CountingEnv(gym.Env):
    """Observation = (step in episode, episodes begun so far); reward 1 per step; lengths vary with the seed. It
    keeps the actions it is given."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)

    def __init__(self, low=-1.0, high=1.0):
        self.action_space = gym.spaces.Box(low, high, (1,), np.float32)
        self.episodes_begun, self.received = -1, []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episodes_begun = 0, self.episodes_begun + 1
        self.length = int(self.np_random.integers(2, 9))
        return np.array([self.t, self.episodes_begun], dtype=np.float32), {}

    def step(self, action):
        self.received.append(float(action[0]))
        self.t += 1
        obs = np.array([self.t, self.episodes_begun], dtype=np.float32)
        return obs, 1.0, self.t >= self.length, False, {}


@pytest.mark.parametrize("low, high", [(-1.0, 1.0), (0.0, 4.0)])
def test_rollout_records_every_step_of_every_episode_once(low, high):
    """... and with an action box other than [-1, 1], the model acts, and the episode records, in [-1, 1], while
    the environment receives the actions mapped to its box."""
    model = tiny_model(obs_dim=2, act_dim=1, max_len=16).eval()
    for weight in model.generator.parameters():  # large enough that every input moves the action visibly
        torch.nn.init.normal_(weight, std=0.3)
    envs = gym.vector.SyncVectorEnv(
        [lambda: CountingEnv(low, high) for _ in range(3)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )

    def choose_plan(s0):
        return torch.zeros(len(s0), 3, 16), {"s0": s0.clone()}

    episodes = gac.rollout(envs, model, choose_plan, 7, lambda obs: obs.astype(np.float32), 0, gac_nullcontext, "t")
    assert len(episodes["returns_raw"]) == 7
    for states, actions, length, ret, plan in zip(episodes["states"], episodes["actions"], episodes["lengths"],
                                                  episodes["returns_raw"], episodes["plan"], strict=True):  # fmt: skip
        assert len(states) == len(actions) == length == ret  # reward 1 per step
        assert states[:, 0].tolist() == list(range(length))  # consecutive steps from the reset
        assert torch.equal(plan["s0"], torch.as_tensor(states[0]))  # the plan was chosen from this episode's s0
        # each action is the one the training forward gives the recorded episode: the acting context was right
        states, actions = (
            torch.nn.functional.pad(torch.as_tensor(x), (0, 0, 0, 8 - length)) for x in (states, actions)
        )
        with torch.no_grad():
            plan_tokens = model.plan(plan["z0"][None], states[None, 0])[1]
            expected = model.generator(states[None], actions[None], torch.arange(8)[None], plan_tokens)[0, :length]
        torch.testing.assert_close(actions[:length], expected)
    counters = sorted(float(s[0, 1]) for s in episodes["states"])
    assert counters == [0, 0, 0, 1, 1, 1, 2]  # quotas 3, 2, 2: each env's first episodes, none skipped
    recorded = sorted(a for actions in episodes["actions"] for a in actions[:, 0].tolist())
    received = sorted(a for env in envs.envs for a in env.received)  # the envs also began unfinished episodes
    assert all(-1 < a < 1 for a in recorded) and len({round(a, 4) for a in recorded}) > 10
    assert set(np.round((np.array(recorded) + 1) / 2 * (high - low) + low, 4)) <= set(np.round(received, 4))
    envs.close()


def test_rollout_with_action_noise_acts_on_and_records_the_draws():
    """--explore-actions sample: each action is the mean that the training forward gives the recorded context (the
    drawn a_{t-1}, not the mean, is the next step's input) plus std x the generator's next normal draw, and the
    environment gets that action."""
    model = tiny_model(obs_dim=2, act_dim=1, max_len=16).eval()
    for weight in model.generator.parameters():
        torch.nn.init.normal_(weight, std=0.3)
    with torch.no_grad():
        model.generator.action_log_std.fill_(math.log(0.2))
    envs = gym.vector.SyncVectorEnv([CountingEnv for _ in range(3)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)

    def choose_plan(s0):
        return torch.zeros(len(s0), 3, 16), {}

    episodes = gac.rollout(envs, model, choose_plan, 12, lambda obs: obs.astype(np.float32), 0, gac_nullcontext, "t",
                           action_noise=torch.Generator().manual_seed(0))  # fmt: skip
    received = [env.received for env in envs.envs]  # every env stepped at every step of the loop
    replay = torch.Generator().manual_seed(0)
    noise = torch.stack([torch.randn(3, 1, generator=replay)[:, 0] for _ in received[0]])  # [loop step, env]
    for states, actions, length, plan in zip(episodes["states"], episodes["actions"], episodes["lengths"],
                                             episodes["plan"], strict=True):  # fmt: skip
        (env, start), *_ = [(i, k) for i, r in enumerate(received) for k in range(len(r))
                            if r[k : k + length] == actions[:, 0].tolist()]  # fmt: skip
        states, actions = (
            torch.nn.functional.pad(torch.as_tensor(x), (0, 0, 0, 8 - length)) for x in (states, actions)
        )
        with torch.no_grad():
            plan_tokens = model.plan(plan["z0"][None], states[None, 0])[1]
            expected = model.generator(states[None], actions[None], torch.arange(8)[None], plan_tokens)[0, :length]
        drawn = (expected[:, 0] + 0.2 * noise[start : start + length, env]).clamp(-1, 1)
        torch.testing.assert_close(actions[:length, 0], drawn)
        assert (actions[:length, 0] - expected[:, 0]).abs().max() > 0.01  # not the mean
    envs.close()


def test_replanning_starts_a_block_with_a_plan_from_the_current_state():
    model = tiny_model(obs_dim=2, act_dim=1, max_len=16).eval()  # context_len 4
    for weight in model.generator.parameters():
        torch.nn.init.normal_(weight, std=0.3)
    envs = gym.vector.SyncVectorEnv([CountingEnv for _ in range(3)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    calls = []

    def choose_plan(s0):  # a different plan at every call
        calls.append(s0.clone())
        return torch.randn(len(s0), 3, 16), {"s0": s0.clone()}

    episodes = gac.rollout(envs, model, choose_plan, 9, lambda obs: obs.astype(np.float32), 0, gac_nullcontext, "t", 4)
    assert any(length > 4 for length in episodes["lengths"]) and any(length <= 4 for length in episodes["lengths"])
    chosen_at = [tuple(s.tolist()) for batch in calls for s in batch]
    for states, actions, length, plan in zip(episodes["states"], episodes["actions"], episodes["lengths"],
                                             episodes["plan"], strict=True):  # fmt: skip
        assert len(plan.get("replans", [])) == (length - 1) // 4  # at steps 4, 8, ... of the episode
        if length > 4:
            assert tuple(states[4].tolist()) in chosen_at  # the new plan was chosen from the state at step 4
        states, actions = (
            torch.nn.functional.pad(torch.as_tensor(x), (0, 0, 0, 8 - length)) for x in (states, actions)
        )
        with torch.no_grad():  # the first block acts on the first plan, the second on the plan made at step 4
            for z0, s0, steps in [(plan["z0"], states[0], slice(0, 4))] + [
                (z0, states[4], slice(4, 8)) for z0 in plan.get("replans", [])
            ]:
                tokens = model.plan(z0[None], s0[None])[1]
                expected = model.generator(states[None], actions[None], torch.arange(8)[None], tokens)[0]
                torch.testing.assert_close(
                    actions[steps][: length - steps.start], expected[steps][: length - steps.start]
                )
    envs.close()
    with pytest.raises(SystemExit, match="--replan-every must be 0 or a multiple of --context-len"):
        gac.check_args(gac.Args(replan_every=10))


def test_a_bad_flag_and_an_unknown_env_end_with_one_line():
    with pytest.raises(SystemExit, match="--quantile must be in"):
        gac.check_args(gac.Args(quantile=1.5))
    with pytest.raises(SystemExit, match="valid: Hopper, Walker2d, HalfCheetah, Ant"):
        gac.resolve_dataset_id(gac.Args(env_id="Pendulum"))
    assert gac.resolve_dataset_id(gac.Args(env_id="walker2d", dataset="expert")) == "mujoco/walker2d/expert-v0"


def test_gaussian_log_prob_is_the_normal_density():
    x, mean = torch.randn(7, 3), torch.randn(7, 3)
    log_std = torch.randn(3)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(x)
    torch.testing.assert_close(gac.gaussian_log_prob(x, mean, log_std), expected)
    torch.testing.assert_close(
        gac.gaussian_log_prob(x, mean, math.log(0.1)), torch.distributions.Normal(mean, 0.1).log_prob(x)
    )


def test_progress_bar_writes_its_line_to_a_log_before_the_loop_ends(capsys):
    """Redirected output (a cluster job's log) is not a terminal: rich alone would print nothing until the end."""
    with gac.ProgressBar(every_s=0.0) as progress:
        task = progress.add_task("offline training", total=4, info="")
        progress.advance(task)
        progress.update(task, info="elbo 12.5")
        during = capsys.readouterr().out
    assert "offline training" in during and "1/4" in during and "elbo 12.5" in during


def test_a_download_without_network_fails_at_once(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves
    with pytest.raises(ConnectionError, match="no network: hub.invalid does not resolve"):
        gac.local_or_downloaded("mujoco/hopper/medium-v0")  # not ~25 s of huggingface_hub's retries
