"""The pieces that gac_continuous.py and gac_maze2d.py share line for line, each test run against both scripts."""

import inspect
import io
import json
import math
import os
import re
from contextlib import nullcontext

import pytest
import torch

import gac_continuous
import gac_maze2d


@pytest.fixture(params=[gac_continuous, gac_maze2d], ids=["continuous", "maze2d"])
def gac(request):
    return request.param


def tiny_model(gac, obs_dim=3, act_dim=2, max_len=16, **overrides):
    torch.manual_seed(0)
    sizes = dict(d_model=16, n_layer=2, n_head=2, prior_layers=1, n_latent=3, context_len=4, dropout=0.0)
    return gac.GAC(obs_dim, act_dim, gac.Args(**(sizes | overrides)), max_len)


def test_each_trajectory_reads_its_own_plan_in_every_block(gac):
    """Cross-attention runs once per trajectory over all its blocks: batching must not mix trajectories."""
    model = tiny_model(gac).eval()
    B, T = 3, 12  # three blocks of context_len=4 each
    states, actions = torch.randn(B, T, 3), torch.randn(B, T, 2)
    timesteps = torch.arange(T).expand(B, T)
    plan = torch.randn(B, 2, 16)
    batched = model.generator(states, actions, timesteps, plan)
    for i in range(B):
        alone = model.generator(states[i : i + 1], actions[i : i + 1], timesteps[i : i + 1], plan[i : i + 1])
        torch.testing.assert_close(batched[i], alone[0])
    other = plan.clone()
    other[1] += torch.randn(2, 16)  # not a constant shift, which ln_memory would remove
    out = model.generator(states, actions, timesteps, other)
    assert torch.equal(out[0], batched[0]) and torch.equal(out[2], batched[2])
    assert not torch.allclose(out[1, 8:], batched[1, 8:])  # the last block reads the plan too


def test_skipping_the_padding_blocks_changes_no_likelihood_and_no_gradient(gac):
    """train_iteration hands the generator only the blocks that hold steps: the result must be the same."""
    model = tiny_model(gac, max_len=12)
    lengths = torch.tensor([12, 5, 1])  # 3, 2 and 1 of the 3 blocks of context_len=4 hold steps
    states, actions = torch.randn(3, 12, 3), torch.rand(3, 12, 2) * 2 - 1
    timesteps, mask, y = torch.arange(12).expand(3, 12), gac.valid_mask(lengths, 12), torch.rand(3)
    blocks = torch.tensor([0, 1, 2, 3, 4, 6])
    results = []
    for which in (None, blocks):
        model.zero_grad()
        z0 = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        action_ll, return_ll, _ = gac.log_likelihoods(
            model, z0, states[:, 0], states, actions, timesteps, mask, y, 0.1, which
        )
        (action_ll + return_ll).sum().backward()
        results.append(
            (action_ll.detach(), z0.grad, [p.grad.clone() for p in model.parameters() if p.grad is not None])
        )
    (full_ll, full_z, full_p), (skip_ll, skip_z, skip_p) = results
    torch.testing.assert_close(skip_ll, full_ll)
    torch.testing.assert_close(skip_z, full_z)
    assert len(skip_p) == len(full_p)
    for a, b in zip(skip_p, full_p, strict=True):
        torch.testing.assert_close(a, b)
    padded = model.generator(states, actions, timesteps, torch.randn(3, 2, 16), blocks)
    assert padded[1, 8:].abs().sum() == 0 and padded[2, 4:].abs().sum() == 0  # skipped blocks come back as 0
    assert padded[1, :8].abs().sum() > 0


@pytest.mark.parametrize("time_embedding", ["absolute", "block"])
def test_acting_step_by_step_reproduces_the_training_conditionals(gac, time_embedding):
    """Acting computes two tokens per step and reuses the stored keys and values of the block so far, for
    episodes at different steps: its actions must be those the training forward computes for whole trajectories,
    across block boundaries, and after an episode restarts mid-block with a stale block in the store."""
    model = tiny_model(gac, time_embedding=time_embedding).eval()
    lengths = [[7, 9], [16]]  # env 0 runs two episodes (the second starts at env step 7), env 1 one long one
    episodes = [[(torch.randn(16, 3), torch.rand(16, 2) * 2 - 1, torch.randn(2, 16)) for _ in env] for env in lengths]
    expected = [
        [model.generator(s[None], a[None], torch.arange(16)[None], plan[None])[0] for s, a, plan in env]
        for env in episodes
    ]
    caches = [{} for _ in model.generator.blocks]
    for step in range(16):
        current = [(0, step) if step < 7 else (1, step - 7), (0, step)]  # (episode, t) of each env
        s_t, a_prev, plans = [], [], []
        for env, (e, t) in enumerate(current):
            states, actions, plan = episodes[env][e]
            s_t.append(states[t])
            a_prev.append(actions[t - 1] if t > 0 else torch.full((2,), 9.0))  # no a_{-1}: must not matter
            plans.append(plan)
        t = torch.tensor([t for _, t in current])
        action = gac.act(model, torch.stack(s_t), torch.stack(a_prev), t, torch.stack(plans), caches, nullcontext)
        for env, (e, t) in enumerate(current):
            torch.testing.assert_close(action[env], expected[env][e][t])
    assert caches[0]["k"].shape[1] == 2 * 4  # one block of (s, a) tokens is stored, not the episode


def test_sampled_actions_are_draws_from_the_generators_gaussian(gac):
    """Without a generator, acting gives the mean; with one (exploration with --explore-actions sample), draws from
    N(mean, std^2) clipped to the action box [-1, 1], the same draws from the same seed."""
    model = tiny_model(gac).eval()
    with torch.no_grad():
        model.generator.action_mean.weight.zero_()
        model.generator.action_mean.bias.copy_(torch.tensor([0.2, 0.0]))  # mean (tanh 0.2, 0) for every state
        model.generator.action_log_std.copy_(torch.tensor([0.05, 10.0]).log())
    n = 4000
    states, previous, plans = torch.randn(n, 3), torch.rand(n, 2) * 2 - 1, torch.randn(n, 2, 16)
    t = torch.zeros(n, dtype=torch.long)

    def draw(noise):
        return gac.act(model, states, previous, t, plans, [{} for _ in model.generator.blocks], nullcontext, noise)

    mean = draw(None)
    torch.testing.assert_close(mean, torch.tensor([math.tanh(0.2), 0.0]).expand(n, 2))
    samples = draw(torch.Generator().manual_seed(0))
    assert torch.equal(samples, draw(torch.Generator().manual_seed(0)))
    assert not torch.equal(samples, draw(torch.Generator().manual_seed(1)))
    residual = samples[:, 0] - mean[:, 0]
    assert abs(float(residual.mean())) < 0.005 and abs(float(residual.std()) / 0.05 - 1) < 0.05
    assert samples.abs().max() == 1.0 and (samples[:, 1].abs() == 1.0).float().mean() > 0.9  # std 10: clipped


def test_checkpoints_carry_the_online_trajectories_but_not_the_offline_data(gac):
    states, actions = torch.randn(500, 64, 3), torch.randn(500, 64, 2)
    buffer = gac.TrajectoryBuffer(states, actions, torch.full((500,), 64), torch.zeros(500), torch.zeros(500))
    for n_offline, n_online in [(500, 0), (498, 2)]:
        online = gac.online_part(buffer, n_offline)
        assert len(online["states"]) == n_online and torch.equal(online["states"], states[n_offline:])
        saved = io.BytesIO()
        torch.save(online, saved)
        assert saved.tell() < 10_000 + n_online * 64 * 5 * 4  # not the 640 kB of the whole buffer


def test_a_trajectory_drawn_twice_gets_the_fit_of_its_last_row(gac, monkeypatch):
    """Drawn by length with replacement, a trajectory can fill several rows of a batch, each fitted on its own.
    Writing them all back at once races (several CPU threads or a GPU keep any row, or a mix of rows): the write
    must keep exactly the last row's fit, which is what one thread did."""
    assert torch.equal(gac.last_draws(torch.tensor([3, 1, 3, 0, 1, 3])), torch.tensor([3, 4, 5]))
    n, batch, n_latent, d_model = 20, 256, 4, 64  # rows of 256 numbers: large enough for a parallel write
    model = tiny_model(gac, d_model=d_model, n_latent=n_latent, n_layer=1, max_len=4)
    args = gac.Args(d_model=d_model, n_layer=1, n_head=2, prior_layers=1, n_latent=n_latent, context_len=4,
                    dropout=0.0, batch_size=batch, inner_steps=1)  # fmt: skip
    states, actions = torch.randn(n, 4, 3), torch.rand(n, 4, 2) * 2 - 1
    buffer = gac.TrajectoryBuffer(states, actions, torch.full((n,), 4), torch.zeros(n), torch.rand(n))

    def fit(mu, logvar, *unused):  # row i of the batch fits to the value i everywhere
        rows = torch.arange(len(mu), dtype=mu.dtype)[:, None, None].expand_as(mu)
        return rows.clone(), -rows

    monkeypatch.setattr(gac, "fit_local_posteriors", fit)
    sampler = torch.Generator().manual_seed(0)
    idx = gac.sample_batch(buffer.lengths, n, batch, 0.0, torch.Generator().manual_seed(0))
    mu, logvar = torch.zeros(n, n_latent, d_model), torch.zeros(n, n_latent, d_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gac.train_iteration(model, optimizer, scheduler, buffer, n, mu, logvar, args, sampler, torch.Generator(),
                            nullcontext)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    last_row = {int(j): i for i, j in enumerate(idx)}
    assert len(last_row) < batch  # the batch did draw trajectories more than once
    for j, i in last_row.items():
        assert torch.all(mu[j] == i) and torch.all(logvar[j] == -i), (j, i)


def test_action_means_and_expected_returns_stay_float32_under_bf16_autocast(gac):
    """The GPU trains under bf16 autocast; the two heads whose outputs are compared finely (an action mean against
    a policy std down to 0.007, candidate plans ranked by E[y | z]) run in float32 all the same."""
    model = tiny_model(gac).eval()
    states, actions, plan = torch.randn(2, 8, 3), torch.rand(2, 8, 2) * 2 - 1, torch.randn(2, 2, 16)
    return_tokens = torch.randn(5, 1, 16)
    with torch.no_grad():
        exact_y = model.return_head(return_tokens.flatten(1)).squeeze(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model.expected_return(return_tokens)
            mean = model.generator(states, actions, torch.arange(8).expand(2, 8), plan)
            step = model.generator.step(states[:, 0], actions[:, 0], torch.zeros(2, dtype=torch.long), plan,
                                        [{} for _ in model.generator.blocks])  # fmt: skip
    assert y.dtype == mean.dtype == step.dtype == torch.float32
    torch.testing.assert_close(y, exact_y, rtol=1e-7, atol=1e-7)  # not rounded to bf16's 8 bits
    assert len(torch.unique(mean)) == mean.numel()  # bf16 would map nearby means to the same value


def test_runs_started_in_one_second_get_folders_of_their_own(gac, tmp_path):
    """Two runs of one name (a SLURM array's tasks start together) must not write into one folder."""
    name = str(tmp_path / "runs" / "Hopper__bench-gac__1__1795782113")
    first, second, third = (gac.claim_run_dir(name) for _ in range(3))
    assert (first, second, third) == (name, f"{name}-2", f"{name}-3")
    assert all(os.path.isdir(path) for path in (first, second, third))


@pytest.mark.parametrize(
    "flag, value, expected",
    [("seed", -1, "--seed must be in [0, 2^32), got -1"), ("seed", 2**32, "--seed must be in [0, 2^32)"),
     ("posterior_init_logvar", 50.0, "--posterior-init-logvar must be in [-10, 2], got 50.0"),
     ("explore_actions", "noisy", "--explore-actions must be mean or sample, got 'noisy'")],
)  # fmt: skip
def test_flags_out_of_range_get_one_line(gac, flag, value, expected):
    """numpy's seeding raised a ValueError for a negative seed; a posterior wider than the fit's clamp ran on."""
    with pytest.raises(SystemExit, match=re.escape(expected)):
        gac.check_args(gac.Args(**{flag: value}))
    gac.check_args(gac.Args())  # the defaults pass


def test_rollouts_of_other_rounds_and_seeds_start_elsewhere(gac):
    """A vector env seeds environment i with seed + i: with consecutive seeds, 49 of a round's 50 start states were
    the round before's, and 9 of 10 evaluation episodes of --seed 2 were --seed 1's. The keys give disjoint seeds."""
    keys = [[1, 2, 0, 1], [1, 2, 1, 1], [2, 2, 0, 1], [1, 1, 0, 1], [1, 2, 0, 0]]  # round, --seed, purpose, stream
    drawn = [gac.independent_seeds(key, 50) for key in keys]
    assert len({seed for seeds in drawn for seed in seeds}) == 50 * len(keys)
    assert gac.independent_seeds([1, 2, 0, 1], 50) == drawn[0]  # and repeat


def test_trainings_generators_repeat_neither_the_global_stream_nor_another_seeds(gac):
    """Seeded with the seed and seed + 1, the posterior noise repeated torch's global stream (initialisation, dropout)
    number for number, and --seed 1's batches were --seed 2's initialisation."""

    def first(generator: torch.Generator) -> torch.Tensor:
        return torch.rand(1000, generator=generator)

    streams = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        streams[f"global {seed}"] = torch.rand(1000)
        noise, batches = gac.training_generators(seed, torch.device("cpu"))
        streams[f"noise {seed}"], streams[f"batches {seed}"] = first(noise), first(batches)
    for name, stream in streams.items():
        others = [other for key, other in streams.items() if key != name]
        assert all(not (stream == other).any() for other in others), name
    assert torch.equal(first(gac.training_generators(1, torch.device("cpu"))[1]), streams["batches 1"])  # and repeat


def test_a_checkpoint_continues_only_on_the_data_it_was_trained_on(gac):
    """Its local posteriors belong row by row to the offline trajectories: a dataset regenerated, replaced or
    downloaded since must stop the run, not hand each trajectory another's posterior."""
    data = {"episodes": 3, "steps": 30, "return_sum": 4.5}
    saved = {"metrics": json.dumps({"data": data}), "posterior_mu": torch.zeros(5, 2, 4),
             "online_buffer": {"lengths": torch.tensor([7, 9])}}  # fmt: skip
    gac.check_same_data(saved, "run/checkpoint.pt", "--resume", "d", data)  # the same data: no complaint
    with pytest.raises(SystemExit, match="trained on another version of d .3 episodes, 30 steps, returns summing to "
                       r"4.500; now 3 episodes, 31 steps"):  # fmt: skip
        gac.check_same_data(saved, "run/checkpoint.pt", "--resume", "d", data | {"steps": 31})
    older = saved | {"metrics": "{}"}  # a checkpoint from before the summary was kept: the number of rows
    gac.check_same_data(older, "run/offline.pt", "--init-from", "d", data)
    with pytest.raises(SystemExit, match=r"\(3 episodes; now 4 episodes, "):
        gac.check_same_data(older, "run/offline.pt", "--init-from", "d", data | {"episodes": 4})


def test_a_file_that_is_no_checkpoint_gets_one_line(gac, tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    for name in ("notes.pt", "list.pt"):
        with pytest.raises(SystemExit, match=f"--resume: .*{name} is not a checkpoint of this script"):
            gac.load_checkpoint(str(tmp_path / name), "--resume", gac.CHECKPOINT_KEYS)


SHARED = """load_checkpoint claim_run_dir check_same_data describe_data load_offline_checkpoint dataset_is_local
    local_or_downloaded episode_returns normalize_returns reference_scores StateNormalizer pad_trajectories valid_mask
    stored_data_signature split_episodes Attention Block PriorEncoder TrajectoryGenerator GAC gaussian_log_prob
    gaussian_kl free_bits_kl log_likelihoods fit_local_posteriors active_latent_dims sample_blocks sample_batch
    last_draws to_device train_iteration exploit_plans exploration_target prior_exploration_targets explore_plans
    ProgressBar act independent_seeds seeded_generator training_generators plot_inference_dynamics online_part
    save_checkpoint seed_everything""".split()


@pytest.mark.parametrize("name", SHARED)
def test_the_shared_pieces_are_the_same_in_both_scripts(name):
    """Each script is complete on its own, so these pieces are written twice; the unit tests of gac_continuous.py's
    copies cover gac_maze2d.py's only while the two stay the same, line for line."""
    assert inspect.getsource(getattr(gac_continuous, name)) == inspect.getsource(getattr(gac_maze2d, name))
