"""benchmark.sh: the grid it writes and the collection step, on fabricated metrics.json files."""

import json
import os
import re
import shutil
import subprocess
import time

from conftest import ROOT


def test_dry_run_lists_every_script_dataset_variant_and_seed():
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmark.sh"), "--dry-run", "--out", "/tmp/gac_bench_dry"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    jobs = [line for line in result.stdout.splitlines() if line.startswith("trap wait TERM; python gac_")]
    assert len(jobs) == 4 * 3  # (Hopper medium, medium-expert, umaze, medium) x seeds 1 2 3: offline, then variants
    assert not [name for name in os.listdir("/tmp/gac_bench_dry") if name.startswith("jobs_")]  # a dry run writes none
    for job in jobs:
        offline, variants = job.split(" && dir=")
        assert "--exp-name bench-offline" in offline and "--online-rounds 0 --save-model >" in offline
        # the variants start from the folder the offline run printed, and each writes a log of its own
        log = re.search(r">(\S+_job\d+)_offline.log 2>&1$", offline).group(1)
        assert variants.startswith(f"$(sed -n 's/^run folder: //p' {log}_offline.log) && {{")
        assert all(f">{log}_{variant}.log 2>&1 &" in variants for variant in ["gac", "prior", "fixed-target"])
        assert variants.count('--init-from "$dir"') == 4 and variants.count(" & ") == 4
        assert "--exploit-steps 0 --num-candidates 1" in variants and "--fixed-target 1.0" in variants
        assert "--exp-name bench-offline-data --online-fraction 0.0 --init-from" in variants
    assert sum("--seed 2 --exp-name bench-gac " in job for job in jobs) == 4
    assert sum("load_training_data" in line for line in result.stdout.splitlines()) == 2  # umaze, medium once
    assert "python datasets/make_dataset.py generate --env-id Hopper --level medium --workers" in result.stdout
    assert "python datasets/make_dataset.py generate --env-id Hopper --level medium-expert --workers" in result.stdout
    # --only is a regular expression: the medium row alone, not medium-expert
    only = ["--only", "d4rl-medium$", "--seeds", "1"]
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmark.sh"), "--dry-run", "--out", "/tmp/gac_bench_dry",
                             *only], capture_output=True, text=True, check=True)  # fmt: skip
    (job,) = [line for line in result.stdout.splitlines() if "python gac_" in line]
    assert "--dataset d4rl-medium --seed 1" in job
    # flags after -- reach every run, but never undo a variant's own
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmark.sh"), "--dry-run", "--out", "/tmp/gac_bench_dry",
                             "--only", "umaze", "--seeds", "1", "--", "--exploit-steps", "7",
                             "--wandb-entity", "my  team"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    (job,) = [line for line in result.stdout.splitlines() if "python gac_" in line]
    assert r"--exploit-steps 7 --wandb-entity my\ \ team --exploit-steps 0 --num-candidates 1 --init-from" in job


def test_bad_options_get_one_line():
    for options, expected in [
        (["--jobs", "0"], "--jobs takes a positive integer, got '0'"),
        (["--deadline", "10m"], "--deadline takes seconds"),
        (["--seeds", "1,2"], "--seeds takes integers separated by spaces"),
        (["--", "--seed", "4"], "the grid sets --seed for each of its runs"),
        (["--", "--exp-name=mine"], "the grid sets --exp-name for each of its runs"),
        (["--only", "walker"], "--only 'walker' matches no row of the grid"),
        (["--slurm", "-p gpu", "--deadline", "60"], "under SLURM give its own options (--time)"),
    ]:
        result = subprocess.run(["bash", os.path.join(ROOT, "benchmark.sh"), "--dry-run", "--out",
                                 "/tmp/gac_bench_dry", *options], capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 2 and result.stderr.startswith("benchmark.sh: error: "), options
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert expected in result.stderr and ".sh: line " not in result.stderr, result.stderr  # no bash error


def fake_run(
    root,
    name,
    variant,
    seed,
    offline,
    online,
    script="gac_maze2d.py",
    dataset="gac-regenerated/x-v2",
    offline_run_s=None,
    online_rounds=2,
    machine="NVIDIA H100",
    out="benchmark",
    args=None,
):
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    if out:  # the run's output in the table's logs: what makes it one of the table's runs
        (root / out / "logs").mkdir(parents=True, exist_ok=True)
        (root / out / "logs" / f"{name}.log").write_text(f"progress\nrun folder: runs/{name}\nmore progress\n")
    metrics = {
        "script": script, "dataset_id": dataset, "device": "cuda", "machine": machine,
        "command": f"python {script} --env-id umaze --seed {seed} --exp-name bench-{variant}",
        "args": {"exp_name": f"bench-{variant}", "seed": seed, "online_rounds": online_rounds, "eval_episodes": 10}
        | (args or {}),
        "offline": {"score_mean": offline}, "online": [{"score_mean": s, "score_std": 20.0} for s in online or []],
        "timings_s": {"total": 100.0 * seed},
        "local_posteriors": {"std": 0.5 + 0.2 * seed, "active_dims": 100 * seed, "dims": 512,
                             "plan_gain_action_per_step": 0.01 * seed},
    }  # fmt: skip
    if online is None:  # stopped by --deadline before its first round ended
        del metrics["online"]
    if offline_run_s is not None:
        offline_command = f"python {script} --env-id umaze --seed {seed} --exp-name bench-offline"
        metrics["init_from"] = {"command": offline_command, "timings_s": {"total": offline_run_s}}
        metrics["command"] += " --init-from runs/x/offline.pt"
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_collect_writes_the_table_into_the_readme_and_the_plot(tmp_path):
    for name in ("benchmark.sh", "gac_maze2d.py"):  # the script's flags and defaults: for the commands
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    # ran with a default that has changed since (its command did not say it): the commands below must
    before = {"posterior_lr": 0.05, "online_fraction": 0.5, "cuda": False, "fixed_target": None, "save_model": True}
    fake_run(tmp_path, "a", "gac", 1, 40.0, [50.0, 60.0], offline_run_s=50.0, args=before)
    fake_run(tmp_path, "b", "gac", 2, 60.0, [70.0, 80.0], offline_run_s=50.0)
    fake_run(tmp_path, "o", "offline", 1, 45.0, [])  # what the variants start from: not a row
    fake_run(tmp_path, "c", "prior", 1, 10.0, [20.0, 30.0])
    fake_run(tmp_path, "d", "gac_maze2d", 1, 99.0, [99.0, 99.0])  # exp-name "bench-gac_maze2d": another variant
    # runs stopped by --deadline: the seeds are compared at the last round all of them finished
    fake_run(tmp_path, "f", "offline-data", 1, 10.0, [30.0, 31.0], online_rounds=3)
    fake_run(tmp_path, "g", "offline-data", 2, 20.0, [40.0], online_rounds=3)
    fake_run(tmp_path, "h", "fixed-target", 1, 10.0, [25.0])
    fake_run(
        tmp_path, "j", "fixed-target", 3, 90.0, [95.0], online_rounds=1, machine="CPU (2 cores)"
    )  # never averaged with the H100's
    fake_run(tmp_path, "i", "fixed-target", 2, 20.0, None)
    fake_run(tmp_path, "k", "gac", 3, 0.0, [0.0, 0.0], out="benchmark-cpu")  # another table's run
    fake_run(tmp_path, "l", "gac", 4, 0.0, [0.0, 0.0], out=None)  # under runs/, in no table's logs
    fake_run(tmp_path, "s", "speed", 1, 0.0, [0.0, 0.0])  # --speed's run shares the logs folder
    (tmp_path / "runs" / "e").mkdir()  # killed before its first evaluation
    (tmp_path / "runs" / "e" / "metrics.json").write_text(json.dumps({"args": {"exp_name": "bench-gac"}}))
    (tmp_path / "benchmark" / "logs" / "e.log").write_text("run folder: runs/e\n")
    (tmp_path / "benchmark" / "logs" / "m.log").write_text("run folder: runs/m\n")  # killed before metrics.json
    (tmp_path / "README.md").write_text("intro\n<!-- benchmark:start -->\nold\n<!-- benchmark:end -->\nrest\n")
    result = subprocess.run(["bash", str(tmp_path / "benchmark.sh"), "--collect"], cwd=tmp_path,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("intro\n<!-- benchmark:start -->\n") and readme.endswith("<!-- benchmark:end -->\nrest\n")
    assert "old" not in readme
    gac_row = next(line for line in readme.splitlines() if "| gac |" in line)
    assert "| 1 2 |" in gac_row and "| 50.0 +- 10.0 |" in gac_row and "| 70.0 +- 10.0 (2 rounds) |" in gac_row
    assert "| 0.80, 150 of 512, 0.015 nats/step |" in gac_row  # the seeds' means: posterior std, active dims, gain
    assert "| 200 s |" in gac_row and "NVIDIA H100" in gac_row  # the shared offline run's 50 s included
    # flags given are not repeated (--seed, --exp-name); the offline run's command gets only the offline flags
    assert (
        "--seed <seed> --exp-name bench-offline --posterior-lr 0.05`, then `python gac_maze2d.py --env-id umaze "
        "--seed <seed> --exp-name bench-gac --init-from <offline run> --no-cuda --save-model --posterior-lr 0.05 "
        "--online-rounds 2 --online-fraction 0.5`" in readme
    )
    assert "| offline |" not in readme
    assert "| 15.0 +- 5.0 | 35.0 +- 5.0 (1 of 3 rounds) |" in readme  # round 1 of both seeds
    assert "| fixed-target | 1 2 | 15.0 +- 5.0 | - |" in readme
    assert "| fixed-target | 3 | 90.0 +- 0.0 | 95.0 +- 0.0 (1 round) |" in readme and "| CPU (2 cores) |" in readme
    assert readme.count("| gac_maze2d.py |") == 6  # fixed-target twice (two machines); no run of another table
    assert "| speed |" not in readme
    # rounds 1 -> 2 moved by 10, 10, 10, 0 and 1 on the H100 (CPU: one round); two 10-episode means of std 20: 7.1
    moved = "score moved by, on average: gac-regenerated/x-v2, NVIDIA H100 6.2 (largest 10.0; an evaluation's own "
    assert moved + "noise alone: 7.1). A row's" in readme and "x-v2, CPU (2 cores) " not in readme
    assert (tmp_path / "benchmark" / "score_by_round.png").stat().st_size > 0
    # --out names the folder and the block, which may be in docs/: README's block untouched
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "experiments.md").write_text(
        "# notes\n<!-- benchmark-cpu:start -->\n<!-- benchmark-cpu:end -->\n"
    )
    result = subprocess.run(["bash", str(tmp_path / "benchmark.sh"), "--collect", "--out", "benchmark-cpu"],
                            cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "README.md").read_text() == readme
    notes = (tmp_path / "docs" / "experiments.md").read_text()
    (cpu_row,) = [line for line in notes.splitlines() if "| gac_maze2d.py |" in line]
    assert "| gac | 3 | 0.0 +- 0.0 |" in cpu_row  # its own run only
    assert (tmp_path / "benchmark-cpu" / "results.md").exists()
    # a folder named benchmark elsewhere writes its own results.md, no block of this repository's documents
    shutil.copytree(tmp_path / "benchmark" / "logs", tmp_path / "elsewhere" / "benchmark" / "logs")
    result = subprocess.run(["bash", str(tmp_path / "benchmark.sh"), "--collect", "--out",
                             str(tmp_path / "elsewhere" / "benchmark")], cwd=tmp_path / "docs",
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "README.md").read_text() == readme and "updated" not in result.stdout
    assert "| gac | 1 2 |" in (tmp_path / "elsewhere" / "benchmark" / "results.md").read_text()


def test_speed_mode_makes_its_dataset_then_says_where_the_time_went(tmp_path):
    """--speed on a bare machine: the Hopper d4rl-medium dataset is made first (here by a stand-in for
    make_dataset.py that writes a tiny one), then one run, then its time split and throughput."""
    for name in ["benchmark.sh", "gac_continuous.py"]:
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "make_dataset.py").write_text(
        f"import sys\nsys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
        "from tiny_datasets import make_tiny_dataset\n"
        "make_tiny_dataset('gac-regenerated/mujoco/hopper/d4rl-medium-v0', episodes=4)\n"
    )
    flags = ["--d-model", "32", "--n-head", "2", "--context-len", "8", "--batch-size", "8", "--num-iterations", "10",
             "--warmup-iterations", "2", "--eval-every", "10", "--eval-episodes", "2", "--num-envs", "2",
             "--num-candidates", "4", "--exploit-steps", "5", "--online-rounds", "0"]  # fmt: skip
    env = os.environ | {"MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    result = subprocess.run(["bash", str(tmp_path / "benchmark.sh"), "--speed", "--", *flags], cwd=tmp_path,
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("python datasets/make_dataset.py generate --env-id Hopper --level medium --workers")
    assert lines[2].startswith("python gac_continuous.py --env-id Hopper --dataset d4rl-medium --exp-name bench-speed")
    assert any(line.startswith("whole run ") and "offline_training" in line for line in lines), result.stdout
    assert any("M trajectory tokens/s" in line for line in lines) and any("steps/s" in line for line in lines)
    again = subprocess.run(["bash", str(tmp_path / "benchmark.sh"), "--speed", "--", *flags], cwd=tmp_path,
                           capture_output=True, text=True, env=env)  # fmt: skip
    assert again.returncode == 0 and again.stdout.startswith("python gac_continuous.py")  # made once


FAKE_SCRIPT = '''"""A stand-in for gac_maze2d.py: it makes and prints a run folder as the script does."""
import json, os, sys
from dataclasses import dataclass

import tyro


@dataclass
class Args:
    env_id: str = "umaze"
    num_iterations: int = 5


def load_training_data(args):  # what benchmark.sh's prepare step calls, once per maze
    open("prepared.txt", "a").write(args.env_id + "\\n")


if __name__ == "__main__":
    argv = sys.argv[1:]
    flag = lambda name, default=None: argv[argv.index(name) + 1] if name in argv else default
    name, seed = flag("--exp-name"), int(flag("--seed"))
    folder = f"runs/{flag('--env-id')}__{name}__{seed}__{1795782113 + int(flag('--num-iterations', 5)) - 5}"
    os.makedirs(folder)
    print("progress ...")
    print(f"run folder: {folder}")
    init_from = flag("--init-from")
    if init_from is not None:
        assert os.path.exists(os.path.join(init_from, "offline.pt")), init_from  # the offline run's own folder
    else:
        open(os.path.join(folder, "offline.pt"), "w").close()
    score = {"bench-offline": 50.0, "bench-gac": 60.0, "bench-prior": 40.0}.get(name, 55.0) + seed
    metrics = {"script": "gac_maze2d.py", "dataset_id": "x", "machine": "CPU", "command": " ".join(sys.argv),
               "args": {"exp_name": name, "seed": seed, "online_rounds": 1,
                        "num_iterations": int(flag("--num-iterations", 5))},
               "offline": {"score_mean": score}, "online": [{"score_mean": score + 1}], "timings_s": {"total": 1.0}}
    if os.environ.get("FAKE_FAIL") == name:  # a run that crashed in its online round
        metrics |= {"status": "failed: RuntimeError: boom", "online": []}
    json.dump(metrics, open(os.path.join(folder, "metrics.json"), "w"))
    sys.exit(1 if "status" in metrics else 0)
'''


def test_a_local_grid_runs_each_job_then_collects_its_own_runs(tmp_path):
    """benchmark.sh end to end with a stand-in script: the datasets prepared once, the offline run, the four variants
    started from the folder it printed, logs that a second grid does not overwrite, and the table from them."""
    shutil.copy(os.path.join(ROOT, "benchmark.sh"), tmp_path)
    (tmp_path / "gac_maze2d.py").write_text(FAKE_SCRIPT)
    (tmp_path / "README.md").write_text("<!-- benchmark:start -->\n<!-- benchmark:end -->\n")
    fake_run(tmp_path, "umaze__bench-gac__9__1", "gac", 9, 0.0, [0.0], out=None)  # an older run, in no grid's logs
    grid = ["bash", str(tmp_path / "benchmark.sh"), "--only", "umaze", "--seeds", "1 2", "--jobs", "2"]
    result = subprocess.run(grid, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "prepared.txt").read_text() == "umaze\n"
    readme = (tmp_path / "README.md").read_text()
    row = next(line for line in readme.splitlines() if "| gac |" in line)
    assert "| 1 2 | 61.5 +- 0.5 | 62.5 +- 0.5 (1 round) |" in row  # seeds 1 and 2 only, not the older seed 9
    assert readme.count("| gac_maze2d.py |") == 4  # gac, prior, fixed-target, offline-data
    logs = sorted(os.listdir(tmp_path / "benchmark" / "logs"))
    assert sum(log.endswith("_offline.log") for log in logs) == 2 and sum(log.endswith("_gac.log") for log in logs) == 2
    time.sleep(1)  # the next grid's logs are named by another second
    result = subprocess.run(grid[:-4] + ["--seeds", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(logs) < set(os.listdir(tmp_path / "benchmark" / "logs"))  # added to, never overwritten
    row = next(line for line in (tmp_path / "README.md").read_text().splitlines() if "| gac |" in line)
    assert "| 1 2 3 | 62.0 +- 0.8 |" in row
    # a job whose run fails: the grid says so in its exit status, and the failed run stays out of the table
    result = subprocess.run(grid[:-4] + ["--seeds", "4"], cwd=tmp_path, capture_output=True, text=True,
                            env=os.environ | {"FAKE_FAIL": "bench-gac"})  # fmt: skip
    assert result.returncode == 1 and "1 job(s) failed or were stopped" in result.stderr, result.stderr
    assert "left out: runs/umaze__bench-gac__4__1795782113, failed: RuntimeError: boom" in result.stdout
    readme = (tmp_path / "README.md").read_text()
    assert "| gac | 1 2 3 | 62.0 +- 0.8 |" in readme and "| prior | 1 2 3 4 |" in readme
    # the same grid with other flags: rows of their own, not averaged with the first ones
    result = subprocess.run(grid[:-4] + ["--seeds", "1", "--", "--num-iterations", "7"], cwd=tmp_path,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    readme = (tmp_path / "README.md").read_text()
    assert (
        "| gac (--num-iterations 5) | 1 2 3 | 62.0 +- 0.8 |" in readme and "| gac (--num-iterations 7) | 1 |" in readme
    )


def test_micro_mode_times_every_part_at_small_size():
    """`./benchmark.sh --micro` runs only where a GPU session's minutes are scarce: it must not break unseen."""
    env = os.environ | {"SMALL": "1", "COMPILE": "0", "REPS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmark.sh"), "--micro"], capture_output=True, text=True,
                            env=env, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for expected in ["act 50 envs:", "exploit_plans 50 states", "SyncVectorEnv:", "AsyncVectorEnv:",
                     "train default (1 inner step, bf16 on a GPU), batch 8:", "train three inner steps",
                     "train cuDNN attention", "forward-backward, batch 8, only the blocks that hold steps:",
                     "the operators of 1 updates"]:  # fmt: skip
        assert expected in result.stdout, expected
