"""Regenerated Gym-MuJoCo datasets for gac_continuous.py, D4RL's levels, written as real Minari datasets.

    # 1. pick the levels from a behaviour_policy.py run (re-evaluated on 100 episodes) into datasets/policies/
    python datasets/make_dataset.py select --env-id Hopper
    # 2. roll a level out for 1M steps (stochastic actions, seeded resets, the trailing partial episode dropped)
    python datasets/make_dataset.py generate --env-id Hopper --level medium
    # 3. D4RL's medium-replay: the run's own replay buffer until the medium snapshot (needs the run's state.pt)
    python datasets/make_dataset.py replay --env-id Hopper

D4RL's levels (the paper's tables are D4RL's): `expert` is the end of a SAC run (here its best snapshot: SAC's
return swings from one snapshot to the next), `medium` the same run stopped early, when it first reached about a
third of the expert's return (the first snapshot within 20% of that), `medium-expert` both datasets together,
`medium-replay` every transition the run stored until it took the medium snapshot (random warm-up included). In
`medium-expert` the expert part is rolled out with seeds of its own, so it is another sample of the expert policy
than the `expert` dataset (D4RL's is the same episodes).
They are stored as `gac-regenerated/mujoco/<env>/d4rl-<level>-v0`, never under Minari's own ids (Minari's
`mujoco/hopper/medium-v0` returns ~3,480, far above D4RL's medium). Reference scores: min = a uniformly random
policy, max = the expert policy (deterministic), 100 episodes each on the evaluation environment.
"""

import json
import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import dataclass

import gymnasium as gym
import minari
import numpy as np
import torch
import tyro
from minari.data_collector import EpisodeBuffer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from behaviour_policy import ENVS, evaluate_policy, load_actor  # noqa: E402

POLICY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies")
LEVELS = ("medium", "expert", "medium-expert")
CHUNKS = 16  # a rollout's pieces, each with seeds of its own and on one thread: the same dataset for any --workers


def fail(message: str):
    raise SystemExit(f"make_dataset.py: error: {message}")


def dataset_id_for(env_id: str, level: str) -> str:
    return f"gac-regenerated/mujoco/{env_id.lower()}/d4rl-{level}-v0"


def policy_path(env_id: str, level: str, policy_dir: str = POLICY_DIR) -> str:
    return os.path.join(policy_dir, f"{env_id}-{level}.pt")


def read_policy_table(policy_dir: str = POLICY_DIR) -> dict:
    path = os.path.join(policy_dir, "policies.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def near_target(returns: dict[int, float], target: float, tolerance: float) -> list[int]:
    """The steps whose return is within tolerance x target of the target, earliest first."""
    return sorted(step for step, value in returns.items() if abs(value - target) <= tolerance * target)


def pick_levels(evaluated: dict[int, float], fraction: float, tolerance: float) -> tuple[int, int]:
    """(expert step, medium step). The expert is the best snapshot. The medium is D4RL's: the same training
    stopped early, when it first reached about fraction x the expert's return, so the earliest snapshot before the
    expert within tolerance of that (a late policy that scores as low is a collapse of the expert's gait, not a
    policy halfway there); if none is, the earlier snapshot closest to it."""
    expert = max(evaluated, key=evaluated.get)
    target = fraction * evaluated[expert]
    earlier = {step: value for step, value in evaluated.items() if step < expert} or evaluated
    first = near_target(earlier, target, tolerance)
    return expert, first[0] if first else min(earlier, key=lambda step: abs(earlier[step] - target))


def collect_episodes(policy, env_name: str, steps: int, num_envs: int, seed: int) -> list[dict]:
    """Whole episodes of `policy(obs) -> actions` on vectorised envs (SAME_STEP autoreset, so the final
    observation of an episode comes in info["final_obs"]), kept in the order they finish while the total stays
    within `steps`: the trailing partial episode is dropped, as in Minari's recipe."""
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_name) for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    obs, _ = envs.reset(seed=seed)  # env i starts from seed + i; its later resets follow from that seed
    running = [{"observations": [o], "actions": [], "rewards": [], "terminations": [], "truncations": []} for o in obs]
    episodes, total = [], 0
    while True:
        actions = policy(obs.astype(np.float32))
        obs, rewards, terminated, truncated, info = envs.step(actions)
        for i in range(num_envs):
            episode = running[i]
            episode["actions"].append(actions[i])
            episode["rewards"].append(rewards[i])
            episode["terminations"].append(terminated[i])
            episode["truncations"].append(truncated[i])
            if terminated[i] or truncated[i]:
                episode["observations"].append(info["final_obs"][i])
                if total + len(episode["actions"]) > steps:
                    envs.close()
                    return episodes
                episodes.append({key: np.array(value) for key, value in episode.items()})
                total += len(episode["actions"])
                running[i] = {"observations": [obs[i]], "actions": [], "rewards": [], "terminations": [],
                              "truncations": []}  # fmt: skip
            else:
                episode["observations"].append(obs[i])


def collect_chunk(task: tuple) -> list[dict]:
    """One chunk of a rollout: its own policy copy, seed and environments, on one thread (a matmul's sums depend on
    its threads, and so would the episodes)."""
    path, env_name, steps, num_envs, seed = task
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    actor, _ = load_actor(path)
    return collect_episodes(lambda o: actor.act(o, False), env_name, steps, num_envs, seed)


def reference_returns(env_name: str, expert, seed: int, episodes: int) -> tuple[float, float]:
    """(min, max) reference returns: a uniformly random policy and the deterministic expert on the evaluation
    environment, `episodes` each (the same seeds for every level of an environment, so they share the values)."""
    random_env = gym.make(env_name)
    random_env.action_space.seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a matmul's sums depend on its threads: one thread, the same scores on any machine
    try:
        ref_min = float(evaluate_policy(lambda o: np.stack([random_env.action_space.sample() for _ in o]), env_name,
                                        episodes, seed=seed + 1_000_000).mean())  # fmt: skip
        ref_max = float(
            evaluate_policy(lambda o: expert.act(o, True), env_name, episodes, seed=seed + 2_000_000).mean()
        )
    finally:
        torch.set_num_threads(threads)
        random_env.close()
    print(f"reference scores: random {ref_min:.1f}, expert {ref_max:.1f} ({episodes} episodes each)")
    return ref_min, ref_max


def replay_episodes(buffer: dict[str, np.ndarray], steps: int) -> list[dict]:
    """The first `steps` transitions of a SAC replay buffer (obs, next_obs, actions, rewards, terminations, in the
    order they were made) as whole episodes. The buffer records terminations but no other episode boundary: an
    episode also ends where the next transition does not start from this one's next observation (a time limit, or
    the reset of a run resumed from its last saved state), and that end is a truncation. The trailing partial
    episode is dropped: the one cut by `steps`, or the buffer's last one if nothing shows that it ended."""
    obs, next_obs = buffer["obs"], buffer["next_obs"]
    n = min(steps, len(obs))
    terminated = buffer["terminations"][:n] > 0
    ends = terminated.copy()
    ends[: n - 1] |= (next_obs[: n - 1] != obs[1:n]).any(1)
    if n < len(obs):
        ends[n - 1] |= bool((next_obs[n - 1] != obs[n]).any())
    episodes, start = [], 0
    for end in np.flatnonzero(ends):
        length = end + 1 - start
        episodes.append({
            "observations": np.concatenate([obs[start : end + 1], next_obs[end : end + 1]]).astype(np.float64),
            "actions": buffer["actions"][start : end + 1].astype(np.float32),
            "rewards": buffer["rewards"][start : end + 1].astype(np.float64),
            "terminations": np.arange(length) == length - 1 if terminated[end] else np.zeros(length, bool),
            "truncations": np.zeros(length, bool) if terminated[end] else np.arange(length) == length - 1,
        })  # fmt: skip
        start = end + 1
    return episodes


def write_dataset(dataset_id: str, episodes: list[dict], env_name: str, ref_min: float, ref_max: float,
                  description: str, algorithm: str) -> minari.MinariDataset:  # fmt: skip
    buffers = [EpisodeBuffer(id=i, infos={}, **episode) for i, episode in enumerate(episodes)]
    env = gym.make(env_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari asks for an author and a code permalink
        dataset = minari.create_dataset_from_buffers(
            dataset_id=dataset_id, buffer=buffers, env=env.spec, eval_env=env.spec, algorithm_name=algorithm,
            ref_min_score=ref_min, ref_max_score=ref_max, description=description,
        )  # fmt: skip
    env.close()
    return dataset


def fail_if_exists(dataset_id: str):
    """One line, before any rollout, for an id that Minari would refuse at the end or that is taken."""
    try:
        minari.dataset.minari_dataset.parse_dataset_id(dataset_id)
    except (TypeError, ValueError):
        fail(f"--dataset-id {dataset_id!r} is not a Minari id: namespace/name-v<version>, e.g. test/hopper/mine-v0")
    if os.path.isdir(minari.storage.get_dataset_path(dataset_id)):
        fail(f"{dataset_id} exists at {minari.storage.get_dataset_path(dataset_id)}; delete it to regenerate")


def report(dataset: minari.MinariDataset, episodes: list[dict], start: float):
    returns = np.array([e["rewards"].sum() for e in episodes])
    print(f"{dataset.spec.dataset_id}: {dataset.total_episodes} episodes, {dataset.total_steps} steps, return "
          f"{returns.mean():.1f} +- {returns.std():.1f}, in {time.time() - start:.0f} s")  # fmt: skip


@dataclass
class Select:
    """Pick the expert and medium snapshots of a behaviour_policy.py run into datasets/policies/."""

    env_id: str = "Hopper"
    run_dir: str = "runs/behaviour"
    """behaviour_policy.py's --out-dir"""
    candidates: int = 8
    """snapshots re-evaluated on --episodes episodes: the best few and the first few near a third of the best"""
    episodes: int = 100
    medium_fraction: float = 1 / 3
    medium_tolerance: float = 0.2
    """a medium candidate's return is within this fraction of medium_fraction x the best return"""
    policy_dir: str = POLICY_DIR
    seed: int = 0


@dataclass
class Generate:
    """Roll a selected policy out into a Minari dataset."""

    env_id: str = "Hopper"
    level: str = "medium"
    """medium, expert or medium-expert (both rolled out, stored together)"""
    steps: int = 1_000_000
    """transitions per policy (medium-expert: twice this)"""
    num_envs: int = 10
    """environments of each of the 16 chunks (another number makes another dataset)"""
    workers: int = 1
    """processes that roll out the 16 chunks of the steps (chunk k: seeds from seed + 1000 k, the episodes still
    running when its steps run out dropped); the dataset is the same for any number"""
    seed: int = 0
    ref_episodes: int = 100
    """episodes of the random and the expert policy for the reference scores"""
    dataset_id: str | None = None
    """default gac-regenerated/mujoco/<env>/d4rl-<level>-v0"""
    policy_dir: str = POLICY_DIR


@dataclass
class Replay:
    """D4RL's medium-replay: the replay buffer of a behaviour_policy.py run until its medium snapshot, in Minari."""

    env_id: str = "Hopper"
    run_dir: str = "runs/behaviour"
    """behaviour_policy.py's --out-dir: its <env-id>/state.pt holds the replay buffer"""
    seed: int = 0
    ref_episodes: int = 100
    """episodes of the random and the expert policy for the reference scores"""
    dataset_id: str | None = None
    """default gac-regenerated/mujoco/<env>/d4rl-medium-replay-v0"""
    policy_dir: str = POLICY_DIR


def select(args: Select):
    if args.env_id not in ENVS:
        fail(f"unknown --env-id {args.env_id!r}; valid: {', '.join(ENVS)}")
    if args.candidates < 2 or args.episodes < 1:
        fail(f"--candidates must be at least 2 (the best and a medium) and --episodes at least 1, got "
             f"{args.candidates} and {args.episodes}")  # fmt: skip
    table_path = os.path.join(args.run_dir, args.env_id, "snapshots.json")
    if not os.path.exists(table_path):
        fail(f"no {table_path}: train first with python datasets/behaviour_policy.py --env-id {args.env_id}")
    with open(table_path) as f:
        snapshots = {s["step"]: s for s in json.load(f)}
    for snapshot in snapshots.values():  # found next to snapshots.json, wherever the trainer ran from
        snapshot["path"] = os.path.join(os.path.dirname(table_path), "snapshots", os.path.basename(snapshot["path"]))
    quick = {step: s["return_mean"] for step, s in snapshots.items()}
    best = sorted(quick, key=quick.get, reverse=True)[: args.candidates // 2]
    target = args.medium_fraction * quick[best[0]]
    near = near_target(quick, target, args.medium_tolerance) or sorted(quick, key=lambda s: abs(quick[s] - target))
    near = near[: args.candidates // 2]
    evaluated, spread = {}, {}
    for step in sorted(set(best + near)):
        actor, _ = load_actor(snapshots[step]["path"])
        returns = evaluate_policy(lambda o, a=actor: a.act(o, True), ENVS[args.env_id], args.episodes, args.seed)
        evaluated[step], spread[step] = float(returns.mean()), float(returns.std())
        print(f"step {step}: {evaluated[step]:.1f} +- {spread[step]:.1f} over {len(returns)} episodes")
    expert, medium = pick_levels(evaluated, args.medium_fraction, args.medium_tolerance)
    os.makedirs(args.policy_dir, exist_ok=True)
    table = read_policy_table(args.policy_dir)
    last_step = max(snapshots)
    run_file = os.path.join(os.path.dirname(table_path), "run.json")
    total_steps = json.load(open(run_file))["args"]["total_steps"] if os.path.exists(run_file) else last_step
    if last_step < total_steps:
        print(f"*** the SAC run is at step {last_step} of {total_steps}: this expert is provisional, and so is the "
              "medium level (a third of its return); select again when the run has finished ***")  # fmt: skip
    for level, step in [("expert", expert), ("medium", medium)]:
        actor, checkpoint = load_actor(snapshots[step]["path"])
        torch.save(checkpoint, policy_path(args.env_id, level, args.policy_dir))
        table[f"{args.env_id}-{level}"] = {
            "env": ENVS[args.env_id], "sac_step": step, "run_last_step": last_step, "run_total_steps": total_steps,
            "deterministic_return_mean": evaluated[step], "deterministic_return_std": spread[step],
            "episodes": args.episodes,
        }  # fmt: skip
        print(f"{args.env_id}-{level}: step {step}, return {evaluated[step]:.1f} +- {spread[step]:.1f}")
    with open(os.path.join(args.policy_dir, "policies.json"), "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)


def generate(args: Generate):
    if args.env_id not in ENVS:
        fail(f"unknown --env-id {args.env_id!r}; valid: {', '.join(ENVS)}")
    if min(args.workers, args.steps, args.num_envs, args.ref_episodes) < 1:
        fail(f"--workers, --steps, --num-envs and --ref-episodes must be at least 1, got {args.workers}, {args.steps}, "
             f"{args.num_envs}, {args.ref_episodes}")  # fmt: skip
    if args.level not in LEVELS:
        fail(f"unknown --level {args.level!r}; valid: {', '.join(LEVELS)}")
    env_name = ENVS[args.env_id]
    levels = ["medium", "expert"] if args.level == "medium-expert" else [args.level]
    for level in {*levels, "expert"}:
        if not os.path.exists(policy_path(args.env_id, level, args.policy_dir)):
            fail(f"no {policy_path(args.env_id, level, args.policy_dir)} (the expert gives the reference max): "
                 f"python datasets/make_dataset.py select --env-id {args.env_id}")  # fmt: skip
    dataset_id = args.dataset_id or dataset_id_for(args.env_id, args.level)
    fail_if_exists(dataset_id)
    start = time.time()
    expert, _ = load_actor(policy_path(args.env_id, "expert", args.policy_dir))
    ref_min, ref_max = reference_returns(env_name, expert, args.seed, args.ref_episodes)
    torch.manual_seed(args.seed)
    episodes, made_from = [], []
    for i, level in enumerate(levels):
        path = policy_path(args.env_id, level, args.policy_dir)
        actor, checkpoint = load_actor(path)
        made_from.append(f"{level} = SAC step {checkpoint['step']}")
        seed = args.seed + 100_000 * i
        shares = [args.steps // CHUNKS + (k < args.steps % CHUNKS) for k in range(CHUNKS)]
        tasks = [(path, env_name, share, args.num_envs, seed + 1000 * k) for k, share in enumerate(shares)]
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool, progress:
            task = progress.add_task(f"rolling out {level}: {CHUNKS} chunks, {args.workers} process(es)", total=CHUNKS)
            for chunk in pool.imap(collect_chunk, tasks):  # in chunk order, whatever finishes first
                episodes += chunk
                progress.advance(task)
    if not episodes:  # an empty dataset would load, and train on nothing
        fail(f"--steps {args.steps}: no chunk of ~{args.steps // CHUNKS} steps holds a whole episode; give more steps")
    description = (
        f"Local regeneration, D4RL-style {args.level} level, by datasets/make_dataset.py: {', '.join(made_from)} "
        f"(datasets/behaviour_policy.py), {args.steps} steps per policy with stochastic actions, seeded resets "
        f"from seed {args.seed} in {CHUNKS} chunks, each chunk's trailing partial episode dropped. Not a Minari or "
        "D4RL download."
    )
    dataset = write_dataset(dataset_id, episodes, env_name, ref_min, ref_max, description,
                            "SAC (datasets/behaviour_policy.py)")  # fmt: skip
    report(dataset, episodes, start)
    return dataset


def replay(args: Replay):
    if args.env_id not in ENVS:
        fail(f"unknown --env-id {args.env_id!r}; valid: {', '.join(ENVS)}")
    if args.ref_episodes < 1:
        fail(f"--ref-episodes must be at least 1, got {args.ref_episodes}")
    table = read_policy_table(args.policy_dir)
    medium = table.get(f"{args.env_id}-medium")
    if medium is None or not os.path.exists(policy_path(args.env_id, "expert", args.policy_dir)):
        fail(f"no {args.env_id} levels in {args.policy_dir}: make_dataset.py select --env-id {args.env_id}")
    dataset_id = args.dataset_id or dataset_id_for(args.env_id, "medium-replay")
    fail_if_exists(dataset_id)
    state_path = os.path.join(args.run_dir, args.env_id, "state.pt")
    if not os.path.exists(state_path):
        fail(f"no {state_path}: medium-replay is the replay buffer of the SAC run that made the levels; on another "
             f"machine, train one to the medium step (python datasets/behaviour_policy.py --env-id {args.env_id} "
             f"--total-steps {medium['run_total_steps']} --stop-after {medium['sac_step']}) and replay it without "
             f"select, or train a whole run and select its levels into a --policy-dir of your own")  # fmt: skip
    start = time.time()
    state = torch.load(state_path, map_location="cpu", weights_only=False)  # behaviour_policy.py's own file
    steps, stored = medium["sac_step"], state["stored"]
    if stored > len(state["buffer"]["obs"]):
        fail(f"{state_path}: the replay buffer was overwritten after {len(state['buffer']['obs'])} transitions")
    if stored < steps:
        fail(f"{state_path} holds {stored} transitions, fewer than the medium snapshot's step {steps}")
    episodes = replay_episodes(state["buffer"], steps)
    env_name = ENVS[args.env_id]
    expert, _ = load_actor(policy_path(args.env_id, "expert", args.policy_dir))
    ref_min, ref_max = reference_returns(env_name, expert, args.seed, args.ref_episodes)
    run_seed = state["args"]["seed"]
    description = (
        f"Local regeneration, D4RL-style medium-replay level, by datasets/make_dataset.py: the first {steps} "
        f"transitions of the replay buffer of the SAC run (datasets/behaviour_policy.py, seed {run_seed}) whose "
        f"step-{steps} snapshot is the medium level, random warm-up included, split into episodes at terminations, "
        "time limits and resumes, the trailing partial episode dropped. Not a Minari or D4RL download."
    )
    dataset = write_dataset(dataset_id, episodes, env_name, ref_min, ref_max, description,
                            "SAC replay buffer (datasets/behaviour_policy.py)")  # fmt: skip
    report(dataset, episodes, start)
    return dataset


if __name__ == "__main__":
    commands = {"select": Select, "generate": Generate, "replay": Replay}
    command = tyro.extras.subcommand_cli_from_dict(commands)
    {Select: select, Generate: generate, Replay: replay}[type(command)](command)
