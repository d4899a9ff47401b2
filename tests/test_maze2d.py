"""gac_maze2d.py: flattening, BFS, the waypoint controller, regeneration, training returns, analyses, end to end."""

import contextlib
import glob
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from conftest import ROOT

import gac_maze2d as gac

U_MAZE_GOAL = (1, 1)


@pytest.fixture(scope="module")
def tiny_maze_dataset(minari_root):
    """A 3000-step regeneration of umaze by the published recipe (about ten seconds)."""
    dataset_id = gac.regenerated_dataset_id("umaze", 3000)
    if not gac.dataset_is_local(dataset_id):
        gac.regenerate_dataset("umaze", 3000, dataset_id)
    return dataset_id


def test_flatten_observation_keeps_observation_then_desired_goal():
    obs = {"observation": np.array([1.0, 2.0, 3.0, 4.0]), "achieved_goal": np.array([1.0, 2.0]),
           "desired_goal": np.array([5.0, 6.0])}  # fmt: skip
    np.testing.assert_array_equal(gac.flatten_observation(obs), [1, 2, 3, 4, 5, 6])
    batch = {key: np.stack([value, value + 10]) for key, value in obs.items()}
    flat = gac.flatten_observation(batch)
    assert flat.shape == (2, 6) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat[1], [11, 12, 13, 14, 15, 16])


def test_bfs_gives_shortest_cell_distances_and_next_cells():
    from gymnasium_robotics.envs.maze.maps import U_MAZE

    tree = gac.shortest_path_tree(U_MAZE, U_MAZE_GOAL)
    assert tree[U_MAZE_GOAL] == (U_MAZE_GOAL, 0)
    assert tree[(3, 1)] == ((3, 2), 6)  # around the U: (3,1) (3,2) (3,3) (2,3) (1,3) (1,2) (1,1)
    assert tree[(1, 3)] == ((1, 2), 2)
    assert (2, 1) not in tree  # a wall


def test_waypoint_controller_reaches_and_holds_the_goal():
    env = gac.maze_env("umaze", evaluation=True, max_episode_steps=300)
    controller = gac.WaypointController(env.unwrapped.maze, np.random.default_rng(0))
    obs, _ = env.reset(seed=0, options={"reset_cell": np.array([3, 1])})
    rewards, done = [], False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(controller(obs))
        rewards.append(reward)
        done = terminated or truncated
    first_arrival = rewards.index(1.0)
    assert first_arrival < 200 and sum(rewards) == 300 - first_arrival  # arrives from the far end, then stays
    env.close()


def test_maze_envs_leave_no_xml_in_the_temp_folder():
    pattern = os.path.join(tempfile.gettempdir(), "ant_maze*.xml")
    before = set(glob.glob(pattern))
    env = gac.maze_env("medium", evaluation=True, max_episode_steps=600)
    gac.make_env(env.spec)().close()
    env.close()
    other = os.path.join(tempfile.gettempdir(), "ant_maze_of_another_process.xml")
    with gac.removing_maze_xml():
        gym.make("PointMaze_UMaze-v3").close()  # as Minari makes them
        open(other, "w").close()  # another process's file, written while the block runs
    assert set(glob.glob(pattern)) == before | {other}  # ours gone, the other process's left alone
    os.remove(other)


def test_hindsight_returns_count_the_steps_at_the_goal_after_arrival():
    rewards = [np.zeros(10), np.zeros(300), np.zeros(301), np.zeros(50)]
    rewards[0][-1] = rewards[1][-1] = rewards[2][-1] = 1.0
    reached = np.array([True, True, True, False])
    np.testing.assert_array_equal(gac.training_returns(rewards, reached, 300, "hindsight"), [291, 1, 0, 0])
    np.testing.assert_array_equal(gac.training_returns(rewards, reached, 300, "dataset"), [1, 1, 1, 0])


def test_regenerated_dataset_loads_with_reference_scores_and_fixed_goal_evaluation(tiny_maze_dataset):
    dataset = minari.load_dataset(tiny_maze_dataset)
    assert dataset.total_steps == 3000 and dataset.total_episodes > 10
    metadata = dataset.storage.metadata
    assert 0 <= metadata["ref_min_score"] < 50 < metadata["ref_max_score"] <= 300
    assert "Local regeneration" in metadata["description"]
    eval_env = dataset.recover_environment(eval_env=True)
    assert eval_env.spec.max_episode_steps == 300 and eval_env.spec.kwargs["reset_target"] is False
    gac.remove_maze_xml(eval_env)
    episodes = list(dataset.iterate_episodes())
    for episode in episodes[:-1]:  # every episode but the trailing one ends at its goal
        final = np.linalg.norm(episode.observations["achieved_goal"][-1] - episode.observations["desired_goal"][-1])
        assert final <= gac.GOAL_RADIUS and episode.truncations[-1]


def test_read_episodes_gives_each_state_its_episodes_goal_and_caches(tiny_maze_dataset):
    dataset = minari.load_dataset(tiny_maze_dataset)
    data = gac.read_episodes(dataset, cache=False)
    first = next(dataset.iterate_episodes())
    assert data["lengths"][0] == len(first.actions) and data["lengths"].sum() == 3000
    states = gac.split_episodes(data["states"], data["lengths"])[0]
    np.testing.assert_allclose(
        states[:, 4:6], np.broadcast_to(first.observations["desired_goal"][-1], (len(states), 2))
    )
    np.testing.assert_allclose(states[:, :4], first.observations["observation"][:-1], rtol=1e-6)
    assert data["reached_goal"][:-1].all()
    cached_first = gac.read_episodes(dataset)
    cached_second = gac.read_episodes(dataset)
    for key in data:
        np.testing.assert_array_equal(cached_first[key], data[key])
        np.testing.assert_array_equal(cached_second[key], data[key])


def test_holds_continue_each_episode_at_its_goal_to_the_horizon(tiny_maze_dataset, tmp_path):
    dataset = minari.load_dataset(tiny_maze_dataset)
    data = gac.read_episodes(dataset, cache=False)
    first = next(dataset.iterate_episodes())
    np.testing.assert_allclose(data["final_states"][0][:4], first.observations["observation"][-1], rtol=1e-6)
    held = gac.hold_at_goals(data, "umaze", 300, cache_dir=str(tmp_path))
    lengths, reached = data["lengths"], data["reached_goal"]
    extended = reached & (lengths < 300)
    assert extended.sum() > 10 and not reached[-1]  # the trailing partial episode is kept as it is
    np.testing.assert_array_equal(held["lengths"], np.where(extended, 300, lengths))
    states = gac.split_episodes(held["states"], held["lengths"])
    actions = gac.split_episodes(held["actions"], held["lengths"])
    rewards = gac.split_episodes(held["rewards"], held["lengths"])
    original = gac.split_episodes(data["states"], lengths)
    for i in np.flatnonzero(extended):
        np.testing.assert_array_equal(states[i][: lengths[i]], original[i])  # the episode itself, untouched
        np.testing.assert_allclose(states[i][lengths[i]], data["final_states"][i], rtol=1e-6)  # then from s_T
        np.testing.assert_array_equal(states[i][:, 4:6], np.broadcast_to(original[i][0, 4:6], (300, 2)))
        assert np.abs(actions[i]).max() <= 1.0
    # the controller holds: nearly every hold step is rewarded, and then the hold return is the hindsight one
    hold_rewards = np.concatenate([rewards[i][lengths[i] :] for i in np.flatnonzero(extended)])
    assert hold_rewards.mean() > 0.95
    hindsight = gac.training_returns(gac.split_episodes(data["rewards"], lengths), reached, 300, "hindsight")
    hold = gac.training_returns(rewards, held["reached_goal"], 300, "hold")
    assert np.all(hold <= hindsight) and np.mean(hold == hindsight) > 0.9 and hold[extended].min() > 0
    cached = gac.hold_at_goals(data, "umaze", 300, cache_dir=str(tmp_path))
    assert os.path.exists(tmp_path / "gac_maze2d_hold_300_cache.npz")
    for key in held:
        np.testing.assert_array_equal(cached[key], held[key])


def test_training_routes_reach_the_goal_in_the_final_state(tiny_maze_dataset):
    """An episode arrives in s_T, which the states s_0..s_{T-1} leave out: the routes that a novel route is compared
    with must include it, or they stop short of the goal cell."""
    data = gac.read_episodes(minari.load_dataset(tiny_maze_dataset), cache=False)
    without = gac.split_episodes(data["states"], data["lengths"])
    with_final = gac.trajectories_to_goal(data)
    reached = np.flatnonzero(data["reached_goal"])
    assert len(reached) > 10
    for i in reached:
        np.testing.assert_array_equal(with_final[i][:-1], without[i])
        assert np.linalg.norm(with_final[i][-1, :2] - with_final[i][-1, 4:6]) <= gac.GOAL_RADIUS
        assert np.linalg.norm(without[i][:, :2] - without[i][:, 4:6], axis=1).min() > gac.GOAL_RADIUS  # never there
    held = {key: data[key] for key in ["states", "lengths"]}  # hold_at_goals' output: holds go on from s_T
    assert all(np.array_equal(a, b) for a, b in zip(gac.trajectories_to_goal(held), without, strict=True))


def test_path_efficiency_and_novel_routes():
    env = gac.maze_env("umaze", evaluation=True, max_episode_steps=300)
    maze = env.unwrapped.maze
    env.close()
    goal = maze.cell_rowcol_to_xy(np.array(U_MAZE_GOAL))

    def episode(cells, end_at_goal=True):
        xy = [maze.cell_rowcol_to_xy(np.array(c)) for c in cells] + ([goal] if end_at_goal else [])
        positions = np.repeat(np.array(xy), 3, axis=0)
        return np.concatenate([positions, np.zeros((len(positions), 2)), np.tile(goal, (len(positions), 1))], 1)

    shortest = episode([(1, 3), (1, 2)])
    detour = episode([(1, 3), (2, 3), (1, 3), (1, 2)])
    lost = episode([(3, 1), (3, 2)], end_at_goal=False)
    training = gac.route_index([((3, 3), (2, 3), (1, 3), (1, 2), (1, 1))])
    found = gac.analyse_episodes([shortest, detour, lost], maze, U_MAZE_GOAL, training)
    assert found["start_cell"] == [(1, 3), (1, 3), (3, 1)]
    assert found["success"] == [True, True, False]
    assert found["efficiency"] == [1.0, 0.5, 0.0]  # 2 cells / 2 moves, 2 cells / 4 moves, never arrived
    assert found["novel_route"] == [False, True, False]  # (1,3)(1,2)(1,1) is a piece of the training route
    assert found["arrival_step"] == [6, 12, None]  # each cell is held 3 steps; the goal's are the last 3
    assert found["hold"] == [1.0, 1.0, None]
    assert gac.route_key(((1, 2), (1, 3))) not in gac.route_index([((11, 2), (1, 3))])
    # a corner cut (2,3) -> (1,2) is two moves; arriving from the next cell leaves the BFS moves to the goal cell
    corner = episode([(2, 3), (1, 2)])
    near_goal = goal + np.array([0.2, 0.0])  # the evaluation goal is jittered inside its cell
    reach_over = np.array([[*maze.cell_rowcol_to_xy(np.array((1, 3))), 0, 0, *near_goal],
                           [*(near_goal + np.array([0.35, 0.0])), 0, 0, *near_goal]])  # fmt: skip
    assert tuple(gac.position_cells(maze, reach_over[1:, :2])[0]) == (1, 2)
    found = gac.analyse_episodes([corner, reach_over], maze, U_MAZE_GOAL, training)
    assert found["success"] == [True, True]
    assert found["efficiency"] == [1.0, 1.0]  # were 3/2 and 2/1 when moves were counted as cells entered


def test_end_to_end_regenerates_then_reuses_the_dataset(minari_root, tmp_path):
    flags = [
        "--dataset-steps", "3000", "--d-model", "32", "--n-head", "2", "--context-len", "8", "--batch-size", "8",
        "--num-iterations", "10", "--warmup-iterations", "5", "--eval-every", "100", "--log-every", "5",
        "--eval-episodes", "2", "--num-envs", "4", "--num-candidates", "4", "--exploit-steps", "3",
        "--explore-steps", "3", "--online-rounds", "1", "--episodes-per-round", "4", "--online-iterations", "5",
        "--analysis-episodes", "8", "--inner-blocks", "2", "--save-model", "--target-from", "prior",
        "--explore-actions", "sample",
    ]  # fmt: skip
    script = os.path.join(ROOT, "gac_maze2d.py")
    env = os.environ | {"MINARI_DATASETS_PATH": str(tmp_path / "datasets")}
    first = subprocess.run([sys.executable, script, *flags], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "REGENERATING it as gac-regenerated/pointmaze/umaze-3000steps-v2" in first.stdout
    (run_name,) = os.listdir(tmp_path / "runs")
    run_dir = tmp_path / "runs" / run_name
    assert f"run folder: runs/{run_name}\n" in first.stdout  # how benchmark.sh finds it
    metrics = json.load(open(run_dir / "metrics.json"))
    assert "NaN" not in (run_dir / "metrics.json").read_text()  # strict JSON, for tools other than Python's
    offline = metrics["analysis"]["offline"]
    assert (offline["arrival_step"] is None) == (offline["success_rate"] == 0)
    assert set(metrics["analysis"]) == {"offline", "round 1"} and metrics["args"]["explore_actions"] == "sample"
    assert 0.0 <= metrics["analysis"]["offline"]["path_efficiency"] <= 1.0
    for name in ["success_by_start_cell_offline.png", "plan_map_round_1.png", "inference_dynamics_10.png"]:
        assert (run_dir / name).exists(), name
    assert (run_dir / "offline.pt").exists() and (run_dir / "checkpoint.pt").exists()
    # the online episodes' final states s_T are kept for the route index (the buffer holds s_0..s_{T-1})
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    finals, online = saved["online_final_states"], saved["online_buffer"]
    assert finals.shape == (4, 6)
    last = online["states"][torch.arange(4), online["lengths"] - 1]
    assert not (finals == last).all(1).any()  # a step further than the last stored state
    # the prior ablation from the same offline model, on the cached dataset
    prior = [*flags, "--online-rounds", "0", "--exploit-steps", "0", "--num-candidates", "1", "--exp-name", "prior"]
    second = subprocess.run([sys.executable, script, *prior, "--init-from", str(run_dir)], cwd=tmp_path,
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    # it reads the data its offline model was trained on (recorded in offline.pt), not whatever is there now
    assert (
        "REGENERATING" not in second.stdout
        and "\ngac-regenerated/pointmaze/umaze-3000steps-v2: " in "\n" + second.stdout
    )
    (prior_dir,) = (tmp_path / "runs").glob("*__prior__*")
    metrics = json.load(open(prior_dir / "metrics.json"))
    assert metrics["init_from"]["path"] == str(run_dir / "offline.pt") and metrics["timings_s"]["offline_training"] == 0
    assert metrics["dataset_id"] == "gac-regenerated/pointmaze/umaze-3000steps-v2" and metrics["data"]["episodes"] > 0
    assert [e["iteration"] for e in metrics["evaluations"]] == [10] and "offline" in metrics["analysis"]


def test_sample_batch_by_length_or_uniformly():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([100, 0, 300])
    by_length = gac.sample_batch(lengths, 3, 4000, 0.5, generator)
    uniform = gac.sample_batch(lengths, 3, 4000, 0.5, generator, by_length=False)
    assert not (by_length == 1).any() and not (uniform == 1).any()  # an empty trajectory is never drawn
    assert abs((by_length == 2).float().mean().item() - 0.75) < 0.03
    assert abs((uniform == 2).float().mean().item() - 0.5) < 0.03


def test_bad_input_gets_one_line(tmp_path, monkeypatch):
    script = os.path.join(ROOT, "gac_maze2d.py")
    for flags, expected in [
        (["--env-id", "huge"], "valid: umaze, medium, large"),
        (["--training-return", "raw"], "--training-return must be hindsight, hold or dataset"),
        (["--sample-by", "steps"], "--sample-by must be length or uniform"),
        (["--analysis-episodes", "1"], "--analysis-episodes must be 0 (no analyses) or at least 2"),
        (["--dataset-id", "D4RL/pointmaze/umaze-v2", "--dataset-steps", "5000"], "--dataset-id names a dataset"),
        (["--dataset-id", "gac-regenerated/pointmaze/medium-5000steps-v2"],
         "without --dataset-id, `python gac_maze2d.py --env-id medium --dataset-steps 5000` makes it"),  # no download
    ]:  # fmt: skip
        if flags[0] == "--dataset-id" and len(flags) == 2:  # a real process: nothing else reaches its stderr
            env = os.environ | {"MINARI_DATASETS_PATH": str(tmp_path)}
            result = subprocess.run([sys.executable, script, *flags], cwd=tmp_path, capture_output=True, text=True,
                                    env=env)  # fmt: skip
            lines = result.stderr.strip().splitlines()
            assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr
        else:  # in this process, seconds faster: the message the interpreter would print
            monkeypatch.setattr(sys, "argv", [script, *flags])
            monkeypatch.setattr(signal, "signal", lambda *args: None)  # pytest keeps its own SIGTERM handling
            monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
            monkeypatch.chdir(tmp_path)
            with pytest.raises(SystemExit) as ended:
                runpy.run_path(script, run_name="__main__")
            message = str(ended.value.code)
            assert len(message.splitlines()) == 1 and expected in message and ": error: " in message, message


def test_dataset_steps_asks_for_the_regeneration_even_where_the_download_is_local(monkeypatch):
    local = {"D4RL/pointmaze/umaze-v2", "gac-regenerated/pointmaze/umaze-20000steps-v2"}
    monkeypatch.setattr(gac, "dataset_is_local", lambda dataset_id: dataset_id in local)
    monkeypatch.setattr(gac, "load_minari_dataset", lambda dataset_id: f"<{dataset_id}>")
    args = gac.Args(env_id="umaze", dataset_steps=20000)
    assert gac.find_or_regenerate(args, "D4RL/pointmaze/umaze-v2")[1] == "gac-regenerated/pointmaze/umaze-20000steps-v2"
    args = gac.Args(env_id="umaze")  # the recipe's 1M: the download, when it is there
    assert gac.find_or_regenerate(args, "D4RL/pointmaze/umaze-v2") == (
        "<D4RL/pointmaze/umaze-v2>",
        "D4RL/pointmaze/umaze-v2",
    )


def test_a_dataset_of_another_maze_gets_one_line(tiny_maze_dataset, tmp_path):
    script = os.path.join(ROOT, "gac_maze2d.py")
    flags = ["--env-id", "medium", "--dataset-id", tiny_maze_dataset]  # an umaze dataset
    result = subprocess.run([sys.executable, script, *flags], cwd=tmp_path, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines == [
        f"gac_maze2d.py: error: {tiny_maze_dataset} is the umaze maze: pass the --env-id it was made on"
    ], result.stderr
    assert [gac.maze_of(gym.spec(f"PointMaze_{name}-v3")) for name in ["UMaze", "Medium", "Large"]] == [
        "umaze", "medium", "large"
    ]  # fmt: skip


def test_hold_steps_cut_the_holds_but_keep_the_returns():
    segment_lengths = np.array([3, 5, 2])  # the second never reached its goal: nothing was held
    held_lengths = np.array([10, 5, 10])
    steps = held_lengths.sum()
    data = {"states": np.arange(steps)[:, None] * np.ones((1, 6)), "actions": np.arange(steps)[:, None] * np.ones(2),
            "rewards": np.ones(steps), "lengths": held_lengths, "reached_goal": np.array([True, False, True]),
            "returns": np.array([7.0, 0.0, 8.0])}  # fmt: skip
    cut = gac.keep_holds(data, segment_lengths, 4)
    np.testing.assert_array_equal(cut["lengths"], [7, 5, 6])
    np.testing.assert_array_equal(
        cut["states"][:, 0], [0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    )
    assert len(cut["actions"]) == len(cut["rewards"]) == 18 and cut["returns"].tolist() == [7.0, 0.0, 8.0]
    with pytest.raises(SystemExit, match="--hold-steps cuts the holds of --training-return hold"):
        gac.check_args(gac.Args(hold_steps=8, training_return="hindsight"))


def test_each_rollout_steps_one_environment_per_episode_up_to_num_envs(
    tiny_maze_dataset, tmp_path, monkeypatch, vector_env_sizes
):
    """With --num-envs 8, 2 evaluation episodes step 2 environments and a round's 4 exploration episodes 4, all
    starting together (the code before stepped all 8 for each, some with no episode to run)."""
    flags = [
        "--dataset-steps", "3000", "--d-model", "32", "--n-head", "2", "--context-len", "8", "--batch-size", "8",
        "--num-iterations", "5", "--warmup-iterations", "2", "--eval-every", "100", "--eval-episodes", "2",
        "--num-envs", "8", "--num-candidates", "4", "--exploit-steps", "3", "--explore-steps", "3",
        "--online-rounds", "1", "--episodes-per-round", "4", "--online-iterations", "2", "--analysis-episodes", "0",
    ]  # fmt: skip
    script = os.path.join(ROOT, "gac_maze2d.py")
    monkeypatch.setattr(sys, "argv", [script, *flags])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(script, run_name="__main__")
    assert vector_env_sizes == [2, 4]
    (run_name,) = os.listdir(tmp_path / "runs")
    assert json.load(open(tmp_path / "runs" / run_name / "metrics.json"))["online"][0]["round"] == 1


class RecordFinalObservation(gym.Wrapper):
    """Keeps the flattened observation of every step that ends an episode."""

    def __init__(self, env):
        super().__init__(env)
        self.finals = []

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            self.finals.append(gac.flatten_observation(obs))
        return obs, reward, terminated, truncated, info


def test_rollout_keeps_each_episodes_final_state_for_the_analyses():
    """The evaluation rewards s_1..s_T, so the analyses read s_T too: rollout returns it, from the vector env's
    final_obs (SAME_STEP autoreset: the observation returned with the done flag is already the next s0)."""
    torch.manual_seed(0)
    args = gac.Args(d_model=16, n_layer=1, n_head=1, prior_layers=1, n_latent=2, context_len=4)
    model = gac.GAC(6, 2, args, 8).eval()
    envs = gym.vector.SyncVectorEnv(
        [lambda: RecordFinalObservation(gac.maze_env("umaze", True, 6)) for _ in range(2)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )

    def choose_plan(s0):
        return torch.randn(len(s0), 2, 16), {}

    episodes = gac.rollout(envs, model, choose_plan, 4, gac.flatten_observation, 0, contextlib.nullcontext, "t")
    assert episodes["lengths"] == [6, 6, 6, 6] and len(episodes["final_states"]) == 4
    # episodes finish env 0, env 1, env 0, env 1 (all of one length): each final state is its env's last observation
    expected = [envs.envs[i % 2].finals[i // 2] for i in range(4)]
    np.testing.assert_array_equal(np.stack(episodes["final_states"]), np.stack(expected))
    for states, final in zip(episodes["states"], episodes["final_states"], strict=True):
        assert not np.array_equal(states[-1], final)  # s_T is not s_{T-1}: the point moved
        assert np.array_equal(final[4:], states[0, 4:])  # the same fixed goal
    envs.close()
