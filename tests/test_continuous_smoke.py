"""gac_continuous.py end to end, in a subprocess, on a tiny Minari dataset made by the test fixture."""

import glob
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_datasets import TINY_HOPPER, make_tiny_dataset, tiny_dataset_id

SCRIPT = os.path.join(ROOT, "gac_continuous.py")
TINY_FLAGS = [
    "--dataset-id", TINY_HOPPER, "--d-model", "32", "--n-head", "2", "--context-len", "8", "--batch-size", "8",
    "--num-iterations", "20", "--warmup-iterations", "5", "--eval-every", "10", "--log-every", "5",
    "--eval-episodes", "2", "--num-envs", "2", "--num-candidates", "4", "--exploit-steps", "5",
    "--explore-steps", "5", "--online-rounds", "1", "--episodes-per-round", "3", "--online-iterations", "5",
]  # fmt: skip


def run(args, cwd, check=True, **kwargs):
    result = subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def only_run_dir(cwd):
    (name,) = os.listdir(os.path.join(cwd, "runs"))
    return os.path.join(cwd, "runs", name)


def scalars(run_dir, tag):
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_end_to_end_offline_evaluation_and_one_online_round(minari_root, tmp_path):
    run(TINY_FLAGS + ["--exp-name", "smoke", "--inner-blocks", "1"], cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["dataset_id"] == TINY_HOPPER and "Minari reference scores" in metrics["normalisation"]
    assert [e["iteration"] for e in metrics["evaluations"]] == [10, 20, 25]
    assert metrics["online"][0]["round"] == 1 and "target_score" in metrics["online"][0]
    posteriors = metrics["local_posteriors"]  # moved from their initial std exp(-5 / 2) = 0.08 towards the prior's 1
    assert 0.08 < posteriors["std"] <= 1.5 and posteriors["dims"] == 4 * 32 and 0 <= posteriors["active_dims"] <= 128
    assert set(metrics["timings_s"]) >= {"data_loading", "offline_training", "evaluation", "online_collection"}
    tags = EventAccumulator(run_dir).Reload().Tags()
    for tag in ["losses/elbo", "losses/kl", "losses/kl_free_bits", "losses/action_nll_per_step",
                "losses/return_nll", "charts/active_latent_dims", "eval/normalized_score", "online/target_score",
                "online/achieved_score", "online/buffer_trajectories"]:  # fmt: skip
        assert tag in tags["scalars"], tag
    # the inference dynamics: one run per evaluation, predicted y before and after each of the 5 ascent steps
    curves = EventAccumulator(os.path.join(run_dir, "inference", "iteration_20")).Reload()
    assert [event.step for event in curves.Scalars("inference/chosen_y")] == list(range(6))
    assert "eval/inference_dynamics" in tags["images"]
    assert os.path.exists(os.path.join(run_dir, "inference_dynamics_20.png"))
    # the tiny dataset's reference scores are 0 and 100: a normalised score x 100 is the return itself
    scores, returns = scalars(run_dir, "eval/normalized_score"), scalars(run_dir, "eval/return")
    assert len(scores) == 3 and [step for step, _ in scores] == [step for step, _ in returns]
    for (_, score), (_, ret) in zip(scores, returns, strict=True):
        assert score == pytest.approx(ret, rel=1e-5)


@pytest.mark.parametrize("env_name", ["Walker2d", "HalfCheetah", "Ant"])
def test_the_other_environments_end_to_end(minari_root, tmp_path, env_name):
    """Walker2d falls, HalfCheetah never does (every evaluation episode runs to the time limit, far past the data's
    60-step episodes), Ant's observation has 105 dimensions; the run folder is named after the --dataset-id."""
    dataset_id = tiny_dataset_id(env_name)
    make_tiny_dataset(dataset_id, episodes=8, env_name=env_name, max_steps=60)
    result = run(TINY_FLAGS + ["--dataset-id", dataset_id, "--eval-every", "20"], cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert f"run folder: runs/{os.path.basename(run_dir)}\n" in result.stdout  # how benchmark.sh finds it
    assert os.path.basename(run_dir).startswith(f"test-{env_name.lower()}-tiny-v0__gac_continuous__1__")
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["dataset_id"] == dataset_id and [e["iteration"] for e in metrics["evaluations"]] == [20, 25]
    assert all(math.isfinite(value) for _, value in scalars(run_dir, "losses/elbo"))
    assert scalars(run_dir, "online/buffer_trajectories") == [(21, 8 + 3)]
    lengths = [value for _, value in scalars(run_dir, "eval/episode_length")]
    if env_name == "HalfCheetah":
        assert lengths == [1000.0, 1000.0]
    else:
        assert all(1 <= length <= 1000 for length in lengths)


def test_same_seed_same_losses_and_episodes_with_sync_or_async_envs(minari_root, tmp_path):
    flags = TINY_FLAGS + ["--online-rounds", "0", "--seed", "3"]
    run(flags + ["--exp-name", "a"], cwd=tmp_path)
    run(flags + ["--exp-name", "b", "--async-envs"], cwd=tmp_path)
    dirs = [os.path.join(tmp_path, "runs", d) for d in sorted(os.listdir(tmp_path / "runs"))]
    first, second = (scalars(d, "losses/elbo") for d in dirs)
    assert len(first) == 4 and first == second
    scores = [scalars(d, "eval/return") for d in dirs]
    assert len(scores[0]) == 2 and scores[0] == scores[1]
    other = tmp_path / "other"
    other.mkdir()
    run(TINY_FLAGS + ["--online-rounds", "0", "--seed", "4"], cwd=other)
    assert scalars(only_run_dir(other), "losses/elbo") != first


def kill_at_the_first_checkpoint(flags, cwd) -> str:
    """Starts the script, SIGKILLs it as soon as its first checkpoint.pt exists; returns the run folder."""
    process = subprocess.Popen([sys.executable, SCRIPT, *flags], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (cwd / "runs").exists() or not os.path.exists(os.path.join(only_run_dir(cwd), "checkpoint.pt")):
        assert time.time() < deadline and process.poll() is None, "no checkpoint was written"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return only_run_dir(cwd)


def test_a_killed_run_resumes_from_its_checkpoint(minari_root, tmp_path):
    flags = TINY_FLAGS + ["--num-iterations", "150", "--eval-every", "1000", "--checkpoint-every", "10",
                          "--save-model", "--online-rounds", "1"]  # fmt: skip
    run_dir = kill_at_the_first_checkpoint(flags, tmp_path)
    assert not os.path.exists(os.path.join(run_dir, "metrics.json")) or "online" not in json.load(
        open(os.path.join(run_dir, "metrics.json"))
    )
    result = run(["--resume", run_dir], cwd=tmp_path)
    assert "resumed" in result.stdout
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["offline"]["iteration"] == 150 and metrics["online"][0]["iteration"] == 155
    resumed = scalars(run_dir, "losses/elbo")  # none lost at the checkpoint's step, none logged twice
    assert [step for step, _ in resumed] == list(range(5, 160, 5))
    assert [step for step, _ in scalars(run_dir, "online/achieved_score")] == [151]
    assert metrics["local_posteriors"]["dims"] > 0 and metrics["timings_s"]["offline_training"] > 0
    whole = tmp_path / "whole"  # the same run, never killed: a CPU resume repeats it exactly
    whole.mkdir()
    run(flags, cwd=whole)
    assert scalars(only_run_dir(whole), "losses/elbo") == resumed
    assert scalars(only_run_dir(whole), "eval/return") == scalars(run_dir, "eval/return")


def test_a_run_killed_after_its_last_offline_checkpoint_keeps_its_plan_gains(minari_root, tmp_path):
    """The last offline checkpoint is written before the offline evaluation, and the plan gains that the end of
    offline training reports come from the last logged losses: a resume from there must still report them."""
    flags = TINY_FLAGS + ["--num-iterations", "20", "--checkpoint-every", "20", "--eval-every", "1000",
                          "--eval-episodes", "60", "--save-model", "--online-rounds", "0"]  # fmt: skip
    run_dir = kill_at_the_first_checkpoint(flags, tmp_path)  # during the offline evaluation of 60 episodes
    metrics_path = os.path.join(run_dir, "metrics.json")
    assert not os.path.exists(metrics_path) or "offline" not in json.load(open(metrics_path))
    run(["--resume", run_dir], cwd=tmp_path)
    posteriors = json.load(open(metrics_path))["local_posteriors"]
    assert math.isfinite(posteriors["plan_gain_action_per_step"]) and math.isfinite(posteriors["plan_gain_return"])


def test_ablations_start_from_the_offline_model_of_another_run(minari_root, tmp_path):
    run(TINY_FLAGS + ["--exp-name", "offline", "--online-rounds", "0", "--save-model"], cwd=tmp_path)
    offline_dir = only_run_dir(tmp_path)
    assert os.path.exists(os.path.join(offline_dir, "offline.pt"))
    flags = TINY_FLAGS + ["--exp-name", "prior", "--exploit-steps", "0", "--num-candidates", "1"]
    run(flags + ["--init-from", offline_dir, "--save-model", "--target-from", "prior", "--explore-actions", "sample"],
        cwd=tmp_path)  # fmt: skip
    (prior_dir,) = glob.glob(str(tmp_path / "runs" / "*__prior__*"))
    metrics = json.load(open(os.path.join(prior_dir, "metrics.json")))
    assert metrics["init_from"]["path"] == os.path.join(offline_dir, "offline.pt")
    assert metrics["init_from"]["timings_s"]["offline_training"] > 0 and metrics["timings_s"]["offline_training"] == 0
    offline_metrics = json.load(open(os.path.join(offline_dir, "metrics.json")))
    assert metrics["local_posteriors"] == offline_metrics["local_posteriors"]  # the model's, for the benchmark table
    assert [e["iteration"] for e in metrics["evaluations"]] == [20, 25] and metrics["online"][0]["round"] == 1
    assert math.isfinite(metrics["online"][0]["target_score"]) and metrics["args"]["target_from"] == "prior"
    assert metrics["args"]["explore_actions"] == "sample"
    assert [step for step, _ in scalars(prior_dir, "losses/elbo")] == [25]  # trained only in the online round
    assert not os.path.exists(os.path.join(prior_dir, "offline.pt"))
    result = run(flags + ["--init-from", offline_dir, "--d-model", "16"], cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("other offline flags; repeat them: --d-model 32"), result.stderr


def test_bad_input_gets_one_line(minari_root, tmp_path, monkeypatch):
    old = tmp_path / "old_run"  # a checkpoint of another version: no batch-sampler state, a flag since removed
    old.mkdir()
    torch.save({"model": {}, "args": {"env_id": "Hopper", "flag_since_removed": 1}}, old / "checkpoint.pt")
    for flags, expected in [
        (["--resume", str(old)], "another version of this script (it differs in generator_state, iteration,"),
        (["--env-id", "Pendulum"], "valid: Hopper, Walker2d, HalfCheetah, Ant"),
        (["--dataset-id", "mujoco/hopper/nonexistent-v0"], "minari download mujoco/hopper/nonexistent-v0"),
        (["--dataset-id", TINY_HOPPER, "--quantile", "2"], "--quantile must be in [0, 1]"),
        (["--dataset-id", TINY_HOPPER, "--sample-by", "steps"], "--sample-by must be length or uniform"),
        (["--resume", str(tmp_path / "nowhere")], "no checkpoint at"),
        (["--resume", str(old), "--seed", "2", "--no-cuda"], "flags it started with; leave out --seed --no-cuda"),
        (["--init-from", str(tmp_path / "nowhere")], "no offline checkpoint at"),
        (["--dataset", "bogus"], "valid: simple, medium, expert, d4rl-medium"),
        (["--dataset", "d4rl-expert"], "python datasets/make_dataset.py generate --env-id Hopper --level expert"),
        (["--env-id", "Walker2d"], "python datasets/make_dataset.py generate --env-id Walker2d --level medium"),
        (["--dataset", "d4rl-medium-replay"], "python datasets/make_dataset.py replay --env-id Hopper."),
    ]:
        if flags[0] in ("--resume", "--dataset-id") and "--quantile" not in flags and "--sample-by" not in flags:
            result = run(flags, cwd=tmp_path, check=False)  # a real process: nothing else reaches its stderr
            assert result.returncode != 0
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
        else:  # in this process, seconds faster: the message the interpreter would print
            monkeypatch.setattr(sys, "argv", [SCRIPT, *flags])
            monkeypatch.setattr(signal, "signal", lambda *args: None)  # pytest keeps its own SIGTERM handling
            monkeypatch.chdir(tmp_path)
            with pytest.raises(SystemExit) as ended:
                runpy.run_path(SCRIPT, run_name="__main__")
            message = str(ended.value.code)
            assert len(message.splitlines()) == 1 and expected in message and ": error: " in message, message


def test_a_missing_minari_dataset_points_at_the_local_regeneration(minari_root, tmp_path):
    make_tiny_dataset("gac-regenerated/mujoco/hopper/d4rl-medium-v0", episodes=2)
    result = run(["--dataset", "medium"], cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("is there: --dataset d4rl-medium."), result.stderr


def test_a_terminated_run_still_writes_its_metrics(minari_root, tmp_path):
    flags = TINY_FLAGS + ["--num-iterations", "100000", "--eval-every", "100000", "--log-every", "2"]
    process = subprocess.Popen([sys.executable, SCRIPT, *flags], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while True:  # until the training loop has logged losses
        assert time.time() < deadline and process.poll() is None, "training did not start"
        events = glob.glob(str(tmp_path / "runs" / "*" / "events.out.tfevents.*"))
        if events and os.path.getsize(events[0]) > 3000:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    metrics = json.load(open(os.path.join(only_run_dir(tmp_path), "metrics.json")))
    assert metrics["timings_s"]["offline_training"] > 0 and metrics["throughput"]["updates_per_s"] > 0
    assert metrics["args"]["num_iterations"] == 100000 and metrics["command"].startswith("python gac_continuous.py")


def test_each_rollout_steps_one_environment_per_episode_up_to_num_envs(
    minari_root, tmp_path, monkeypatch, vector_env_sizes
):
    """With --num-envs 8, 2 evaluation episodes step 2 environments and a round's 3 exploration episodes 3, all
    starting together (the code before stepped all 8 for each, some with no episode to run)."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *TINY_FLAGS, "--num-iterations", "10", "--num-envs", "8"])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(SCRIPT, run_name="__main__")
    assert vector_env_sizes == [2, 3]
    metrics = json.load(open(os.path.join(only_run_dir(tmp_path), "metrics.json")))
    assert len(metrics["evaluations"]) == 2 and metrics["online"][0]["round"] == 1


def test_benchmark_fit_scores_offline_models_with_one_inference(minari_root, tmp_path):
    """`./benchmark.sh --fit`: a model's ELBO on a dataset's trajectories with a fixed inference, the same figures for
    the same model (so that two training settings compare by their models alone); one line for a folder without one."""
    run(TINY_FLAGS + ["--exp-name", "fit", "--online-rounds", "0", "--save-model"], cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    fit = ["bash", os.path.join(ROOT, "benchmark.sh"), "--fit", TINY_HOPPER, "--"]
    env = os.environ | {"FIT_TRAJECTORIES": "5"}
    result = subprocess.run(fit + [run_dir, os.path.join(run_dir, "offline.pt")], capture_output=True, text=True,
                            env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 of its 12 trajectories" in result.stdout
    lines = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith(run_dir)]
    assert len(lines) == 2 and lines[0] == lines[1]
    elbo = float(lines[0].split("ELBO ")[1].split()[0])
    assert math.isfinite(elbo) and "log p(actions | z)" in lines[0] and "with z0 from the prior" in lines[0]
    result = subprocess.run(fit + [str(tmp_path)], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("(a run with --save-model writes offline.pt)"), result.stderr
