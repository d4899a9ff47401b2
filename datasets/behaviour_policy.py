"""Behaviour policies for the regenerated Gym-MuJoCo datasets: Soft Actor-Critic (Haarnoja et al. 2018) on the
Gymnasium v5 environments, with a snapshot of the actor every --snapshot-every steps.

D4RL's levels, which the paper's tables use: `expert` is the final policy, `medium` a policy of the same run
stopped at about a third of the expert's return. Train once, then pick the snapshots:

    python datasets/behaviour_policy.py --env-id Hopper --total-steps 1000000
    python datasets/behaviour_policy.py --env-id Hopper --total-steps 1000000 --resume   # after a stop or kill

Snapshots go to runs/behaviour/<Env>/snapshots/step_<N>.pt with their evaluation in snapshots.json; the
training state (networks, optimisers, replay buffer, random states) to runs/behaviour/<Env>/state.pt, written
atomically, so a long run can be chained in pieces. datasets/make_dataset.py picks the levels and rolls them out.
"""

import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

ENVS = {"Hopper": "Hopper-v5", "Walker2d": "Walker2d-v5", "HalfCheetah": "HalfCheetah-v5", "Ant": "Ant-v5"}


@dataclass
class Args:
    env_id: str = "Hopper"
    """Hopper, Walker2d, HalfCheetah or Ant (the Gymnasium v5 environments)"""
    total_steps: int = 1_000_000
    """environment steps of the whole run (one gradient update per step after the warm-up)"""
    seed: int = 1
    """seed of the networks, the replay sampling and the environment resets"""
    out_dir: str = "runs/behaviour"
    """snapshots, training state and TensorBoard logs go to out_dir/<env-id>"""
    resume: bool = False
    """continue from out_dir/<env-id>/state.pt"""
    stop_after: int | None = None
    """stop (saving the state) after this many steps of this invocation: chains a long run in short pieces"""
    snapshot_every: int = 10_000
    """save the actor and evaluate it every this many steps"""
    eval_episodes: int = 10
    """deterministic episodes per snapshot evaluation"""
    learning_starts: int = 5_000
    """uniformly random actions before the first update"""
    buffer_size: int = 1_000_000
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005
    """Polyak rate of the target critics"""
    policy_lr: float = 3e-4
    q_lr: float = 1e-3
    policy_frequency: int = 2
    """actor and temperature updates every this many critic updates (each done that many times, as in CleanRL)"""
    hidden: int = 256
    cuda: bool = False
    """small networks are launch-bound on a GPU; the CPU is as fast"""


def fail(message: str):
    raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'behaviour_policy.py'}: error: {message}")


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy; `act(obs, deterministic)` is all a dataset generator needs."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, action_low: np.ndarray, action_high: np.ndarray):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(obs)
        log_std = torch.tanh(self.log_std(h))
        log_std = self.LOG_STD_MIN + 0.5 * (self.LOG_STD_MAX - self.LOG_STD_MIN) * (log_std + 1)
        return self.mean(h), log_std

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action and its log-probability (with the tanh change of variables)."""
        mean, log_std = self(obs)
        u = mean + log_std.exp() * torch.randn_like(mean)
        squashed = torch.tanh(u)
        log_prob = torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
        log_prob = log_prob - torch.log(self.action_scale * (1 - squashed.pow(2)) + 1e-6)
        return squashed * self.action_scale + self.action_bias, log_prob.sum(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.action_scale.device)
        if deterministic:
            action = torch.tanh(self(obs_t)[0]) * self.action_scale + self.action_bias
        else:
            action = self.sample(obs_t)[0]
        return action.cpu().numpy()


class Critic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], -1)).squeeze(-1)


def save_atomic(path: str, obj):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def actor_checkpoint(actor: Actor, env_id: str, step: int) -> dict:
    """What a snapshot holds: enough to rebuild the actor with no other file."""
    return {
        "env_id": env_id,
        "step": step,
        "obs_dim": actor.net[0].in_features,
        "act_dim": actor.mean.out_features,
        "hidden": actor.net[0].out_features,
        "action_low": (actor.action_bias - actor.action_scale).cpu().numpy(),
        "action_high": (actor.action_bias + actor.action_scale).cpu().numpy(),
        "state_dict": actor.state_dict(),
    }


def load_actor(path: str, device: str = "cpu") -> tuple[Actor, dict]:
    checkpoint = torch.load(path, map_location=device, weights_only=False)  # numpy arrays for the action bounds
    actor = Actor(
        checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["hidden"], checkpoint["action_low"],
        checkpoint["action_high"],
    ).to(device)  # fmt: skip
    actor.load_state_dict(checkpoint["state_dict"])
    return actor.eval(), checkpoint


def evaluate_policy(policy, env_name: str, episodes: int, seed: int, num_envs: int = 10) -> np.ndarray:
    """Returns of `episodes` whole episodes of `policy(obs) -> actions` on vectorised envs (each env a fixed
    quota, so short episodes are not over-represented; Gymnasium 1.x SAME_STEP autoreset)."""
    num_envs = min(num_envs, episodes)
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_name) for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    quota = np.array([episodes // num_envs + (i < episodes % num_envs) for i in range(num_envs)])
    done_count, running, returns = np.zeros(num_envs, dtype=int), np.zeros(num_envs), []
    obs, _ = envs.reset(seed=seed)
    while (done_count < quota).any():
        obs, reward, terminated, truncated, _ = envs.step(policy(obs.astype(np.float32)))
        running += reward
        for i in np.flatnonzero(terminated | truncated):
            if done_count[i] < quota[i]:
                returns.append(running[i])
                done_count[i] += 1
            running[i] = 0.0
    envs.close()
    return np.array(returns)


def main(args: Args):
    if args.env_id not in ENVS:
        fail(f"unknown --env-id {args.env_id!r}; valid: {', '.join(ENVS)}")
    for name in ["total_steps", "snapshot_every", "eval_episodes", "batch_size", "policy_frequency", "buffer_size"]:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.stop_after is not None and args.stop_after < 1:
        fail(f"--stop-after must be at least 1, got {args.stop_after}")
    run_dir = os.path.join(args.out_dir, args.env_id)
    snapshot_dir = os.path.join(run_dir, "snapshots")
    state_path = os.path.join(run_dir, "state.pt")
    if args.resume and not os.path.exists(state_path):
        fail(f"--resume: no {state_path}")
    if not args.resume and os.path.exists(state_path):
        fail(f"{state_path} exists: pass --resume to continue it, or choose another --out-dir")
    os.makedirs(snapshot_dir, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    env_name = ENVS[args.env_id]
    env = gym.make(env_name)
    env.action_space.seed(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    actor = Actor(obs_dim, act_dim, args.hidden, env.action_space.low, env.action_space.high).to(device)
    critics = nn.ModuleList([Critic(obs_dim, act_dim, args.hidden) for _ in range(2)]).to(device)
    targets = nn.ModuleList([Critic(obs_dim, act_dim, args.hidden) for _ in range(2)]).to(device)
    targets.load_state_dict(critics.state_dict())
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    q_optimizer = torch.optim.Adam(critics.parameters(), lr=args.q_lr)
    target_entropy = -float(act_dim)
    log_alpha = torch.zeros(1, requires_grad=True, device=device)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr)

    size = min(args.buffer_size, args.total_steps)
    buffer = {
        "obs": np.zeros((size, obs_dim), np.float32),
        "next_obs": np.zeros((size, obs_dim), np.float32),
        "actions": np.zeros((size, act_dim), np.float32),
        "rewards": np.zeros(size, np.float32),
        "terminations": np.zeros(size, np.float32),
    }
    step, stored, episode_seed, snapshots = 0, 0, args.seed, []
    if args.resume:
        state = torch.load(state_path, map_location=device, weights_only=False)  # our own file: numpy buffer
        now = {k: v for k, v in asdict(args).items() if k not in ("resume", "stop_after", "cuda")}
        differ = [f"--{k.replace('_', '-')} {v}" for k, v in state["args"].items() if k in now and now[k] != v]
        if differ:  # a run continues as it started (the buffer's size, the networks' width, ...)
            fail(f"--resume: {state_path} was started with other flags; repeat them: {', '.join(differ)}")
        for module, key in [(actor, "actor"), (critics, "critics"), (targets, "targets")]:
            module.load_state_dict(state[key])
        actor_optimizer.load_state_dict(state["actor_optimizer"])
        q_optimizer.load_state_dict(state["q_optimizer"])
        alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        with torch.no_grad():
            log_alpha.copy_(state["log_alpha"])
        step, stored, episode_seed = state["step"], state["stored"], state["episode_seed"]
        for key in buffer:
            buffer[key][: min(stored, size)] = state["buffer"][key]
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:  # the actor's sampling noise on the GPU
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        env.action_space.seed(args.seed + step)
        print(f"resumed {run_dir} at step {step}")
    if os.path.exists(os.path.join(run_dir, "snapshots.json")):
        with open(os.path.join(run_dir, "snapshots.json")) as f:
            snapshots = [s for s in json.load(f) if s["step"] <= step]
    # how long the run is meant to be, for make_dataset.py select
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"env": env_name, "args": asdict(args)}, f, indent=1)
    writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=step or None)
    if step == 0:
        writer.add_text(
            "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
        )

    def save_state():
        n = min(stored, size)
        save_atomic(
            state_path,
            {
                "actor": actor.state_dict(), "critics": critics.state_dict(), "targets": targets.state_dict(),
                "actor_optimizer": actor_optimizer.state_dict(), "q_optimizer": q_optimizer.state_dict(),
                "alpha_optimizer": alpha_optimizer.state_dict(), "log_alpha": log_alpha.detach(),
                "step": step, "stored": stored, "episode_seed": episode_seed,
                "buffer": {key: value[:n] for key, value in buffer.items()},
                "python_rng": random.getstate(), "numpy_rng": np.random.get_state(), "torch_rng": torch.get_rng_state(),
                "args": asdict(args),
            } | ({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
        )  # fmt: skip

    obs, _ = env.reset(seed=episode_seed)
    episode_return, episode_length = 0.0, 0
    actor_loss = torch.zeros(())
    last_stop = step + args.stop_after if args.stop_after is not None else args.total_steps
    start, start_step = time.time(), step
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
    )  # fmt: skip

    def take_snapshot():
        """The actor at this step, saved, evaluated and listed in snapshots.json (what make_dataset.py select reads)."""
        path = os.path.join(snapshot_dir, f"step_{step}.pt")
        save_atomic(path, actor_checkpoint(actor, env_name, step))
        returns = evaluate_policy(
            lambda o: actor.act(o, deterministic=True), env_name, args.eval_episodes, seed=10_000 + step
        )
        snapshots.append({"step": step, "path": path, "return_mean": float(returns.mean()),
                          "return_std": float(returns.std()), "episodes": len(returns)})  # fmt: skip
        with open(os.path.join(run_dir, "snapshots.json.tmp"), "w") as f:
            json.dump(snapshots, f, indent=1)
        os.replace(os.path.join(run_dir, "snapshots.json.tmp"), os.path.join(run_dir, "snapshots.json"))
        writer.add_scalar("eval/return", returns.mean(), step)
        progress.console.print(f"step {step}: deterministic return {returns.mean():.1f} +- {returns.std():.1f}")

    try:
        with progress:
            task = progress.add_task(f"SAC {env_name}", total=args.total_steps, completed=step, info="")
            if step and step % args.snapshot_every == 0 and step not in {s["step"] for s in snapshots}:
                take_snapshot()  # the last piece stopped after saving this snapshot, before evaluating it
            while step < min(args.total_steps, last_stop):
                if step < args.learning_starts:
                    action = env.action_space.sample()
                else:
                    action = actor.act(obs[None].astype(np.float32), deterministic=False)[0]
                next_obs, reward, terminated, truncated, _ = env.step(action)
                i = stored % size
                buffer["obs"][i], buffer["next_obs"][i], buffer["actions"][i] = obs, next_obs, action
                buffer["rewards"][i], buffer["terminations"][i] = reward, float(terminated)  # a time limit bootstraps
                stored += 1
                step += 1
                episode_return += reward
                episode_length += 1
                obs = next_obs
                if terminated or truncated:
                    writer.add_scalar("charts/episodic_return", episode_return, step)
                    writer.add_scalar("charts/episodic_length", episode_length, step)
                    progress.update(task, info=f"return {episode_return:.0f}")
                    episode_seed += 1
                    obs, _ = env.reset(seed=episode_seed)
                    episode_return, episode_length = 0.0, 0

                if step > args.learning_starts:
                    idx = np.random.randint(0, min(stored, size), args.batch_size)
                    batch = {key: torch.as_tensor(value[idx], device=device) for key, value in buffer.items()}
                    alpha = log_alpha.exp().detach()
                    with torch.no_grad():
                        next_action, next_log_prob = actor.sample(batch["next_obs"])
                        next_q = torch.min(*(t(batch["next_obs"], next_action) for t in targets))
                        target = batch["rewards"] + args.gamma * (1 - batch["terminations"]) * (
                            next_q - alpha * next_log_prob
                        )
                    q_loss = sum(F.mse_loss(critic(batch["obs"], batch["actions"]), target) for critic in critics)
                    q_optimizer.zero_grad()
                    q_loss.backward()
                    q_optimizer.step()
                    if step % args.policy_frequency == 0:
                        for _ in range(args.policy_frequency):  # delayed, compensated: as many actor updates
                            action_new, log_prob = actor.sample(batch["obs"])
                            q_new = torch.min(*(critic(batch["obs"], action_new) for critic in critics))
                            actor_loss = (log_alpha.exp().detach() * log_prob - q_new).mean()
                            actor_optimizer.zero_grad()
                            actor_loss.backward()
                            actor_optimizer.step()
                            alpha_loss = -(log_alpha.exp() * (log_prob.detach() + target_entropy)).mean()
                            alpha_optimizer.zero_grad()
                            alpha_loss.backward()
                            alpha_optimizer.step()
                    with torch.no_grad():
                        for critic, target_critic in zip(critics, targets, strict=True):
                            for p, p_target in zip(critic.parameters(), target_critic.parameters(), strict=True):
                                p_target.lerp_(p, args.tau)
                    if step % 1000 == 0:
                        writer.add_scalar("losses/q_loss", q_loss.item() / 2, step)
                        writer.add_scalar("losses/actor_loss", actor_loss.item(), step)
                        writer.add_scalar("losses/alpha", alpha.item(), step)
                        writer.add_scalar("charts/steps_per_s", (step - start_step) / (time.time() - start), step)

                if step % args.snapshot_every == 0:
                    take_snapshot()
                    save_state()
                progress.advance(task)
    finally:
        save_state()
        writer.close()
        env.close()
        print(
            f"{step} steps ({(step - start_step) / max(time.time() - start, 1e-9):.0f} steps/s); state in {state_path}"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
