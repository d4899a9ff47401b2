"""datasets/: the behaviour-policy trainer, level selection and the Minari dataset generator, on tiny budgets."""

import json
import os
import subprocess
import sys

import minari
import numpy as np
import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "datasets"))
import make_dataset  # noqa: E402


def test_pick_levels_takes_the_best_and_the_first_snapshot_near_a_third_of_it():
    evaluated = {10: 200.0, 20: 950.0, 30: 1100.0, 40: 3300.0, 50: 3000.0, 60: 1100.0}
    # the first within 20% of 1100 (20, not 30 which is nearer; not 60: a collapse after the expert)
    assert make_dataset.pick_levels(evaluated, 1 / 3, 0.2) == (40, 20)
    assert make_dataset.pick_levels(evaluated, 1 / 3, 0.05) == (40, 30)  # none but 30 that close
    assert make_dataset.pick_levels({10: 200.0, 20: 500.0, 40: 3300.0}, 1 / 3, 0.2) == (40, 20)  # none: nearest
    assert make_dataset.dataset_id_for("Hopper", "medium") == "gac-regenerated/mujoco/hopper/d4rl-medium-v0"


def test_replay_episodes_splits_at_terminations_time_limits_and_resets_and_drops_the_cut_one():
    # episodes: A = steps 0-2 (terminates), B = 3-4 (time limit: step 5 does not start from B's last next_obs),
    # C = 5-7 (cut by steps=7), in a buffer that goes on to step 9
    obs = np.arange(10, dtype=np.float32)[:, None].repeat(2, 1)
    next_obs = obs + 1
    next_obs[2], next_obs[4] = 100.0, 200.0  # A's and B's final observations; steps 3 and 5 start from a reset
    terminations = np.zeros(10, np.float32)
    terminations[2] = 1.0
    buffer = {"obs": obs, "next_obs": next_obs, "actions": obs[:, :1] * 0.1, "rewards": np.arange(10.0),
              "terminations": terminations}  # fmt: skip
    episodes = make_dataset.replay_episodes(buffer, 7)
    assert [len(e["actions"]) for e in episodes] == [3, 2]
    a, b = episodes
    assert a["terminations"].tolist() == [False, False, True] and not a["truncations"].any()
    assert b["truncations"].tolist() == [False, True] and not b["terminations"].any()
    assert a["observations"][:, 0].tolist() == [0, 1, 2, 100] and b["observations"][:, 0].tolist() == [3, 4, 200]
    assert b["rewards"].tolist() == [3.0, 4.0] and np.allclose(b["actions"][:, 0], [0.3, 0.4])
    assert [len(e["actions"]) for e in make_dataset.replay_episodes(buffer, 5)] == [3, 2]  # B ends exactly there
    # the buffer's end: C runs to step 9 with nothing to say that it ended there, so it is dropped
    assert [len(e["actions"]) for e in make_dataset.replay_episodes(buffer, 10)] == [3, 2]


def test_train_select_generate_and_load_back(tmp_path, minari_root):
    def run(script, *args):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "datasets", script), *args], cwd=tmp_path,
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    train = ["--env-id", "Hopper", "--learning-starts", "300", "--snapshot-every", "300", "--eval-episodes", "2"]
    run("behaviour_policy.py", *train, "--total-steps", "900", "--stop-after", "600")
    listed = tmp_path / "runs/behaviour/Hopper/snapshots.json"  # as if stopped while it evaluated step 600's snapshot
    listed.write_text(json.dumps(json.load(open(listed))[:-1]))
    wider = subprocess.run([sys.executable, os.path.join(ROOT, "datasets", "behaviour_policy.py"), *train,
                            "--total-steps", "900", "--resume", "--hidden", "8"], cwd=tmp_path, capture_output=True,
                           text=True)  # fmt: skip
    assert wider.returncode != 0 and "started with other flags; repeat them: --hidden 256" in wider.stderr
    run("behaviour_policy.py", *train, "--total-steps", "900", "--resume")  # a run chained in two pieces
    snapshots = json.load(open(tmp_path / "runs/behaviour/Hopper/snapshots.json"))
    assert [s["step"] for s in snapshots] == [300, 600, 900]

    policies = tmp_path / "policies"
    run("make_dataset.py", "select", "--env-id", "Hopper", "--episodes", "2", "--policy-dir", str(policies))
    table = json.load(open(policies / "policies.json"))
    assert set(table) == {"Hopper-expert", "Hopper-medium"}
    assert table["Hopper-expert"]["run_last_step"] == table["Hopper-expert"]["run_total_steps"] == 900
    assert table["Hopper-expert"]["deterministic_return_mean"] >= table["Hopper-medium"]["deterministic_return_mean"]

    out = run("make_dataset.py", "generate", "--env-id", "Hopper", "--level", "medium-expert", "--steps", "1500",
              "--num-envs", "3", "--workers", "2", "--ref-episodes", "2", "--policy-dir", str(policies))  # fmt: skip
    assert "gac-regenerated/mujoco/hopper/d4rl-medium-expert-v0" in out
    dataset = minari.load_dataset("gac-regenerated/mujoco/hopper/d4rl-medium-expert-v0")
    assert 2000 < dataset.total_steps <= 3000  # two policies, each within 1500 steps, partial episodes dropped
    metadata = dataset.storage.metadata
    assert np.isfinite(metadata["ref_min_score"]) and np.isfinite(metadata["ref_max_score"])  # random / expert
    assert "Local regeneration" in metadata["description"]
    for episode in dataset.iterate_episodes():
        assert len(episode.observations) == len(episode.actions) + 1
        assert episode.terminations[-1] or episode.truncations[-1]  # whole episodes only
        assert not (episode.terminations[:-1] | episode.truncations[:-1]).any()
    env = dataset.recover_environment(eval_env=True)
    assert env.spec.id == "Hopper-v5"
    env.close()
    for workers in ["1", "3"]:  # the rollout's chunks are the same whichever process rolls them out
        run("make_dataset.py", "generate", "--env-id", "Hopper", "--steps", "800", "--num-envs", "2", "--workers",
            workers, "--ref-episodes", "1", "--policy-dir", str(policies), "--dataset-id",
            f"test/w{workers}-v0")  # fmt: skip
    one, three = (list(minari.load_dataset(f"test/w{w}-v0").iterate_episodes()) for w in "13")
    assert 1 < len(one) == len(three)
    assert all(np.array_equal(a.actions, b.actions) for a, b in zip(one, three, strict=True))

    # medium-replay: the run's replay buffer (in state.pt) until the medium snapshot, whole episodes only
    out = run("make_dataset.py", "replay", "--env-id", "Hopper", "--ref-episodes", "2", "--policy-dir", str(policies))
    replay = minari.load_dataset("gac-regenerated/mujoco/hopper/d4rl-medium-replay-v0")
    medium_step = table["Hopper-medium"]["sac_step"]
    assert 0 < replay.total_steps <= medium_step and "medium-replay" in replay.storage.metadata["description"]
    first = next(replay.iterate_episodes())
    state = torch.load(tmp_path / "runs/behaviour/Hopper/state.pt", weights_only=False)
    n = len(first.actions)
    assert np.allclose(first.actions, state["buffer"]["actions"][:n]) and (
        first.terminations[-1] or first.truncations[-1]
    )
    for key in ["ref_min_score", "ref_max_score"]:  # the same reference scores as the other levels, bit for bit
        assert metadata[key] == replay.storage.metadata[key]

    again = subprocess.run([sys.executable, os.path.join(ROOT, "datasets", "make_dataset.py"), "generate",
                            "--env-id", "Hopper", "--level", "medium-expert", "--policy-dir", str(policies)],
                           cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr
    tiny = subprocess.run([sys.executable, os.path.join(ROOT, "datasets", "make_dataset.py"), "generate",
                           "--env-id", "Hopper", "--steps", "100", "--ref-episodes", "1", "--policy-dir",
                           str(policies), "--dataset-id", "test/tiny-steps-v0"],
                          cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert tiny.returncode != 0 and "no chunk of ~6 steps holds a whole episode" in tiny.stderr
    assert "test/tiny-steps-v0" not in minari.list_local_datasets()  # no empty dataset left behind
    assert np.isfinite(table["Hopper-medium"]["deterministic_return_std"])
