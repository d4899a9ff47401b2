# Generative Actor Critic (Qin et al., arXiv 2512.21527) on Gym-MuJoCo from Minari datasets. Docs: README.md
"""Generative Actor Critic (GAC) for continuous control, in one file.

GAC learns the joint distribution of trajectories tau and returns y through a latent plan z:

    p(tau, y, z | s0) = p_alpha(z | s0) p_beta(tau | z) p_gamma(y | z),    z = U_alpha(z0, s0),  z0 ~ N(0, I)

It is trained on the ELBO with local variational inference (one Gaussian q_i(z0) per trajectory) and acts
by inference on that model: gradient ascent on E[y | z] to exploit, sampling z given an optimistic target
return y+ to explore while fine-tuning online.
"""

import importlib.util
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (a CPU run with the same seed repeats exactly)"""
    torch_deterministic: bool = True
    """if toggled, cuDNN picks deterministic algorithms (a GPU run may still differ from the next in the last bits;
    a CPU run with the same seed repeats exactly either way)"""
    cuda: bool = True
    """if toggled, use CUDA when it is available (bf16 autocast and TF32 matmuls there)"""
    track: bool = False
    """if toggled, mirror the TensorBoard logs to Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "gac"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the entity (team) of the wandb project"""
    save_model: bool = False
    """if toggled, write runs/{run_name}/checkpoint.pt (model, optimiser, local posteriors, online data)"""
    resume: str | None = None
    """a checkpoint.pt (or the run folder holding one) to continue a killed run from, with the flags it started with
    (no other flag may be given); implies --save-model"""
    init_from: str | None = None
    """an offline.pt (or the run folder holding one) that a run with --save-model wrote after offline training: start
    from that model and run only the offline evaluation and the online rounds, with this run's inference and online
    flags (benchmark.sh runs GAC and both ablations from one offline model this way)"""

    # Data
    env_id: str = "Hopper"
    """the environment: Hopper, Walker2d, HalfCheetah or Ant"""
    dataset: str = "medium"
    """Minari's levels simple, medium, expert (mujoco/<env>/<dataset>-v0), or the D4RL-style levels d4rl-medium,
    d4rl-expert, d4rl-medium-expert, d4rl-medium-replay that datasets/make_dataset.py regenerates
    (gac-regenerated/mujoco/<env>/...)"""
    dataset_id: str | None = None
    """any Minari dataset id, local or remote (overrides --env-id and --dataset)"""

    # Model
    d_model: int = 128
    """width of every token (states, actions, latent plan tokens)"""
    n_layer: int = 3
    """transformer blocks of the trajectory generator p_beta(tau | z)"""
    n_head: int = 1
    """attention heads in every block"""
    prior_layers: int = 2
    """transformer blocks of the prior encoder U_alpha(z0, s0)"""
    n_latent: int = 4
    """latent plan tokens (z0 has n_latent x d_model dimensions)"""
    n_return_tokens: int = 1
    """how many of the plan tokens feed the return predictor; the others are the generator's memory"""
    context_len: int = 32
    """context of the generator in timesteps: trajectories are cut into blocks of this many steps"""
    time_embedding: str = "absolute"
    """what the generator's time embedding encodes: "absolute" (the timestep in the episode; steps later than any
    training trajectory reach get an untrained embedding) or "block" (the position in the context block)"""
    dropout: float = 0.1
    """dropout in the generator"""

    # Learning: the ELBO with local variational inference
    num_iterations: int = 5000
    """global (parameter) updates of the offline phase"""
    batch_size: int = 64
    """whole trajectories per update, drawn as --sample-by says"""
    sample_by: str = "length"
    """length: trajectories drawn in proportion to their length, as LPT's code does (the loss then weighs a long
    trajectory's steps and return more than the ELBO's sum over trajectories); uniform: each trajectory equally
    likely, an unbiased estimate of that sum"""
    learning_rate: float = 3e-4
    """AdamW learning rate of the model parameters (alpha, beta, gamma)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    warmup_iterations: int = 500
    """linear learning-rate warm-up, then constant (the online rounds continue at the same rate)"""
    max_grad_norm: float = 0.25
    """gradient clipping of the parameter update"""
    inner_steps: int = 1
    """Adam steps on each batch trajectory's local posterior q_i(z0) before the global step (3 of 0.1 until
    2026-11-27: one step of 0.3 trains the posteriors as wide, scores level within noise or better and takes ~60 % of
    the training time)"""
    inner_blocks: int = 0
    """context blocks of each trajectory that the inner steps read (0: all): drawn at random, their log-likelihood
    scaled up is an unbiased estimate of the whole trajectory's (blocks are independent given the plan)"""
    posterior_lr: float = 0.3
    """Adam learning rate of the local posteriors (mu_i, log sigma_i^2): a fresh Adam moves each by about this much
    a step"""
    posterior_init_logvar: float = -5.0
    """initial log-variance of a new trajectory's local posterior (its mean starts at 0 for a dataset trajectory, at
    the plan that generated it for an online one)"""
    free_bits: float = 1.0
    """nats per latent token below which the batch-averaged KL is not penalised (free bits)"""
    return_std: float = 0.1
    """standard deviation of p_gamma(y | z) in normalised-return units (y = normalised score / 100)"""

    # Exploitation (evaluation): gradient ascent on the plan
    num_candidates: int = 16
    """candidate plans z0 ~ N(0, I) per episode; the best after ascent is used"""
    exploit_steps: int = 20
    """gradient-ascent steps on E[y | z] - kl_weight/2 ||z0||^2 (0 with --num-candidates 1: plans from the prior)"""
    exploit_lr: float = 0.05
    """Adam learning rate of the ascent"""
    exploit_kl_weight: float = 0.01
    """lambda: weight of the KL penalty (lambda/2 ||z0||^2) that keeps plans near the prior"""
    replan_every: int = 0
    """evaluation: every this many steps of an episode, a new plan by the same exploitation from the state the
    agent is in, taken as a new start (0: one plan per episode; a multiple of --context-len, so that a plan starts
    a context block). The prior and return head learnt from episode starts: Maze2D's segments start anywhere, a
    MuJoCo episode only near its initial pose"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    eval_every: int = 1000
    """evaluate every this many offline iterations (and always at the end of the offline phase)"""

    # Exploration: online fine-tuning with optimistic targets
    online_rounds: int = 3
    """rounds of (collect, train, evaluate) after the offline phase; 0 for offline only"""
    episodes_per_round: int = 50
    """episodes collected with exploration plans per round"""
    online_iterations: int = 1000
    """global updates on the grown buffer per round"""
    online_fraction: float = 0.1
    """share of each online-phase batch drawn from the trajectories collected online, the rest from the dataset
    (several times their share of the buffer; half, as in symmetric sampling, held the model at its own level)"""
    quantile: float = 0.8
    """q: the target is y+ = quantile_q(buffer returns) + delta_y"""
    delta_y: float = 0.1
    """optimism of the target, in normalised-return units (0.1 = 10 normalised points)"""
    target_from: str = "buffer"
    """where the quantile of y+ is taken: buffer (the paper: the returns in the buffer, one y+ for every episode) or
    prior (per episode: the prior predictive E[y | U(z0, s0)], z0 ~ N(0, I), at its own s0; where the start state
    decides what is reachable, as on a maze, one y+ from the whole buffer is out of reach from far starts)"""
    fixed_target: float | None = None
    """ablation: condition exploration on this fixed y* (normalised units) instead of the dynamic y+"""
    explore_steps: int = 50
    """Adam steps of the variational fit of p(z0 | y+, s0)"""
    explore_lr: float = 0.05
    """Adam learning rate of that fit"""
    explore_actions: str = "mean"
    """how exploration episodes act on their plans: "mean" (the generator's mean action, as evaluation does) or
    "sample" (draws from p_beta(a_t | s_t, ..., z), the generative model's own spread, as the Online Decision
    Transformer explores)"""
    num_envs: int = 50
    """environments stepped together at most; an evaluation or a round of fewer episodes steps one per episode"""
    async_envs: bool = False
    """step the environments in subprocesses (AsyncVectorEnv): worth it with many environments and free cores"""
    checkpoint_every: int = 1000
    """with --save-model: write the checkpoint every this many offline iterations"""
    log_every: int = 100
    """log the training losses every this many iterations"""


ENV_NAMES = {"hopper": "Hopper", "walker2d": "Walker2d", "halfcheetah": "HalfCheetah", "ant": "Ant"}


def fail(message: str):
    """Bad input ends the run with one line, not a traceback."""
    raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'gac_continuous.py'}: error: {message}")


# the flags an --init-from run may set differently from the run that trained its offline model: they act after it
AFTER_OFFLINE_FLAGS = """exp_name seed torch_deterministic cuda track wandb_project_name wandb_entity save_model
    resume init_from num_candidates exploit_steps exploit_lr exploit_kl_weight replan_every eval_episodes eval_every
    online_rounds episodes_per_round online_iterations online_fraction quantile delta_y target_from fixed_target
    explore_steps explore_lr explore_actions num_envs async_envs checkpoint_every log_every""".split()


# what a resumed run reads from its checkpoint (an --init-from run needs no random-number states)
CHECKPOINT_KEYS = set(
    """model optimizer scheduler posterior_mu posterior_logvar online_buffer generator_state
    sampler_state torch_rng_state iteration round args metrics""".split()
)


def load_checkpoint(path: str, flag: str, keys: set) -> dict:
    """A checkpoint of this script; one line, not a traceback, for a file that is none or that another version of this
    script wrote."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or one that holds more than tensors and plain Python values
        fail(f"{flag}: {path} is not a checkpoint of this script ({type(error).__name__})")
    if not isinstance(checkpoint, dict):
        fail(f"{flag}: {path} is not a checkpoint of this script (it holds a {type(checkpoint).__name__})")
    missing = sorted(keys - set(checkpoint)) + sorted(set(checkpoint.get("args", {})) - {f.name for f in fields(Args)})
    if missing:
        fail(f"{flag}: {path} was written by another version of this script (it differs in {', '.join(missing)})")
    return checkpoint


def claim_run_dir(run_dir: str) -> str:
    """Create a new run's folder. Runs of one name started in the same second (a SLURM array, parallel jobs) would
    share it and overwrite each other's checkpoints: the later ones get -2, -3, ... appended."""
    for k in range(1, 1000):
        path = run_dir if k == 1 else f"{run_dir}-{k}"
        try:
            os.makedirs(path)  # atomic: exactly one process creates a given folder
            return path
        except FileExistsError:
            continue
    fail(f"{run_dir}: 999 runs of this name already exist")


def check_same_data(saved: dict, path: str, flag: str, dataset_id: str, data: dict):
    """A checkpoint's local posteriors belong row by row to the offline trajectories it was trained on: one line if
    the data loaded now are not those (a dataset regenerated, replaced or downloaded since)."""
    trained_on = json.loads(saved["metrics"]).get("data")  # None in checkpoints from before 2026-11-27
    rows = saved["posterior_mu"].shape[0] - saved["online_buffer"]["lengths"].numel()
    if rows != data["episodes"] or trained_on not in (None, data):
        then = trained_on or {"episodes": rows}
        fail(f"{flag}: {path} was trained on another version of {dataset_id} ({describe_data(then)}; now "
             f"{describe_data(data)}): restore the data it was trained on")  # fmt: skip


def describe_data(data: dict) -> str:
    text = f"{data['episodes']:,} episodes"
    if "steps" in data:
        text += f", {data['steps']:,} steps, returns summing to {data['return_sum']:,.3f}"
    return text


def load_offline_checkpoint(init_from: str, args: Args) -> tuple[str, dict]:
    """The checkpoint an --init-from run starts from; one line if it is missing or its offline flags differ."""
    path = os.path.join(init_from, "offline.pt") if os.path.isdir(init_from) else init_from
    if not os.path.isfile(path):
        fail(f"--init-from: no offline checkpoint at {path} (a run with --save-model writes offline.pt)")
    checkpoint = load_checkpoint(path, "--init-from", CHECKPOINT_KEYS - {"sampler_state", "generator_state"})
    if checkpoint["round"] != 0 or checkpoint["online_buffer"]["lengths"].numel():
        fail(f"--init-from: {path} was written after online rounds; use the run's offline.pt")
    differ = {k: v for k, v in checkpoint["args"].items() if k not in AFTER_OFFLINE_FLAGS and getattr(args, k) != v}
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in differ.items())
        fail(f"--init-from: {path} was trained with other offline flags; repeat them: {flags}")
    return path, checkpoint


def check_args(args: Args):
    positive = """d_model n_layer n_head prior_layers n_latent n_return_tokens context_len batch_size num_candidates
        eval_episodes eval_every episodes_per_round num_envs checkpoint_every log_every""".split()
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    non_negative = """num_iterations warmup_iterations inner_steps inner_blocks exploit_steps online_rounds
        online_iterations explore_steps free_bits exploit_kl_weight weight_decay""".split()
    for name in non_negative:
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    for name in ["learning_rate", "posterior_lr", "exploit_lr", "explore_lr", "return_std", "max_grad_norm"]:
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.replan_every < 0 or args.replan_every % args.context_len:
        fail(f"--replan-every must be 0 or a multiple of --context-len ({args.context_len}), got {args.replan_every}")
    if args.time_embedding not in ("absolute", "block"):
        fail(f"--time-embedding must be absolute or block, got {args.time_embedding!r}")
    if args.explore_actions not in ("mean", "sample"):
        fail(f"--explore-actions must be mean or sample, got {args.explore_actions!r}")
    if args.target_from not in ("buffer", "prior"):
        fail(f"--target-from must be buffer or prior, got {args.target_from!r}")
    if args.sample_by not in ("length", "uniform"):
        fail(f"--sample-by must be length or uniform, got {args.sample_by!r}")
    if not 0.0 <= args.quantile <= 1.0:
        fail(f"--quantile must be in [0, 1], got {args.quantile}")
    if not 0.0 <= args.online_fraction <= 1.0:
        fail(f"--online-fraction must be in [0, 1], got {args.online_fraction}")
    if not 0.0 <= args.dropout < 1.0:
        fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if not -10.0 <= args.posterior_init_logvar <= 2.0:  # the range fit_local_posteriors keeps log sigma^2 in
        fail(f"--posterior-init-logvar must be in [-10, 2], got {args.posterior_init_logvar}")
    if not 0 <= args.seed < 2**32:  # numpy's and gymnasium's range
        fail(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.d_model % args.n_head:
        fail(f"--d-model ({args.d_model}) must be divisible by --n-head ({args.n_head})")
    if args.n_return_tokens >= args.n_latent:
        fail(f"--n-return-tokens ({args.n_return_tokens}) must be below --n-latent ({args.n_latent})")


# ---------------------------------------------------------------------------------------------------------------
# Data: Minari episodes -> padded trajectories on the device, returns and normalised scores
# ---------------------------------------------------------------------------------------------------------------


MINARI_LEVELS = ("simple", "medium", "expert")
REGENERATED_LEVELS = ("d4rl-medium", "d4rl-expert", "d4rl-medium-expert", "d4rl-medium-replay")


def resolve_dataset_id(args: Args) -> str:
    if args.dataset_id:
        return args.dataset_id
    env_name = ENV_NAMES.get(args.env_id.lower())
    if env_name is None:
        fail(f"unknown --env-id {args.env_id!r}; valid: {', '.join(ENV_NAMES.values())} (or give --dataset-id)")
    if args.dataset in REGENERATED_LEVELS:
        return f"gac-regenerated/mujoco/{env_name.lower()}/{args.dataset}-v0"
    if args.dataset not in MINARI_LEVELS:
        fail(f"unknown --dataset {args.dataset!r}; valid: {', '.join(MINARI_LEVELS + REGENERATED_LEVELS)}")
    return f"mujoco/{env_name.lower()}/{args.dataset}-v0"


def dataset_is_local(dataset_id: str) -> bool:
    return os.path.isdir(os.path.join(minari.storage.get_dataset_path(dataset_id), "data"))


def dataset_hint(dataset_id: str) -> str:
    """For a missing Gym-MuJoCo dataset: the local regeneration to use instead, or the command that makes it."""
    match = re.fullmatch(
        r"(?:gac-regenerated/)?mujoco/(\w+)/(?:d4rl-)?(simple|medium|expert|medium-expert|medium-replay)-v0", dataset_id
    )
    env = next((name for name in ENV_NAMES.values() if match and name.lower() == match[1]), None)
    if env is None:
        return ""
    level = "medium" if match[2] == "simple" else match[2]
    regenerated = f"gac-regenerated/mujoco/{env.lower()}/d4rl-{level}-v0"
    if regenerated != dataset_id and dataset_is_local(regenerated):
        return f" A local regeneration of D4RL's {level} level (not Minari's) is there: --dataset d4rl-{level}."
    command = f"python datasets/make_dataset.py generate --env-id {env} --level {level}"
    if level == "medium-replay":  # the replay buffer of the SAC run that trained the levels
        command = f"python datasets/make_dataset.py replay --env-id {env}"
    return f" To regenerate D4RL's {level} level here: {command}."


def local_or_downloaded(dataset_id: str) -> minari.MinariDataset:
    """minari.load_dataset(download=True), quick and quiet where there is no network: where the hub's host does not
    resolve it raises at once, instead of huggingface_hub's ~25 s of retries, each logged."""
    local = dataset_is_local(dataset_id)
    on_the_hub = os.environ.get("MINARI_REMOTE", "hf://").startswith("hf://") and not os.environ.get("HF_HUB_OFFLINE")
    if not local and on_the_hub and importlib.util.find_spec("huggingface_hub"):  # without it Minari says what to do
        from huggingface_hub import constants

        host = urllib.parse.urlparse(constants.ENDPOINT).hostname
        try:
            socket.getaddrinfo(host, 443)
        except OSError as error:
            raise ConnectionError(f"no network: {host} does not resolve") from error
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return minari.load_dataset(dataset_id, download=True)
    finally:
        logger.setLevel(level)


def load_minari_dataset(dataset_id: str) -> minari.MinariDataset:
    """Loads a local Minari dataset, downloading it when it is not local and a network is there."""
    root = os.environ.get("MINARI_DATASETS_PATH", os.path.join(os.path.expanduser("~"), ".minari", "datasets"))
    if dataset_id.startswith("gac-regenerated/") and not dataset_is_local(dataset_id):
        fail(f"{dataset_id!r} is not in {root}.{dataset_hint(dataset_id)}")
    try:
        return local_or_downloaded(dataset_id)
    except Exception as error:  # no network, no huggingface_hub, unknown id: all end the same way
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        fail(
            f"Minari dataset {dataset_id!r} is not in {root} and could not be downloaded ({reason}). "
            f"On a machine with internet run `minari download {dataset_id}` and copy {root}/{dataset_id} here, "
            f"or point MINARI_DATASETS_PATH at a folder that holds it.{dataset_hint(dataset_id)}"
        )


def episode_returns(rewards: list[np.ndarray]) -> np.ndarray:
    """Undiscounted return of each episode, summed in float64."""
    return np.array([np.sum(r, dtype=np.float64) for r in rewards])


def normalize_returns(returns_raw: np.ndarray, ref_min: float, ref_max: float) -> np.ndarray:
    """y = (return - ref_min) / (ref_max - ref_min): 0 is the random policy, 1 the reference expert.

    The normalised score that papers report is 100 * y."""
    return (np.asarray(returns_raw, dtype=np.float64) - ref_min) / (ref_max - ref_min)


def reference_scores(dataset: minari.MinariDataset, returns_raw: np.ndarray) -> tuple[float, float, str]:
    """(ref_min, ref_max, description): the dataset's reference scores, or its own return range if it has none."""
    metadata = dataset.storage.metadata
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        ref_min, ref_max = float(metadata["ref_min_score"]), float(metadata["ref_max_score"])
        return ref_min, ref_max, f"Minari reference scores (random {ref_min:.2f}, expert {ref_max:.2f})"
    ref_min, ref_max = float(returns_raw.min()), float(returns_raw.max())
    if ref_max <= ref_min:
        ref_max = ref_min + 1.0
    return ref_min, ref_max, f"no reference scores: the dataset's own return range [{ref_min:.2f}, {ref_max:.2f}]"


class StateNormalizer:
    """(s - mean) / std with the offline dataset's statistics, kept fixed for online data and evaluation."""

    def __init__(self, states: np.ndarray):
        self.mean = states.mean(0).astype(np.float32)
        self.std = np.maximum(states.std(0), 1e-3).astype(np.float32)  # constant dimensions stay finite

    def __call__(self, states: np.ndarray) -> np.ndarray:
        return ((states - self.mean) / self.std).astype(np.float32)


class ActionScaler:
    """The environment's action box [low, high] to the model's [-1, 1], where the generator's tanh mean lives, and
    back: a_model = (a - centre) / half_width. For the boxes of Hopper, Walker2d, HalfCheetah and Ant, [-1, 1]
    already, both maps are the identity, exactly; Humanoid's [-0.4, 0.4] or InvertedPendulum's [-3, 3] need them."""

    def __init__(self, space: gym.spaces.Box):
        self.centre = ((space.high.astype(np.float64) + space.low) / 2).astype(np.float32)
        self.half_width = ((space.high.astype(np.float64) - space.low) / 2).astype(np.float32)

    def to_model(self, actions: np.ndarray) -> np.ndarray:
        return ((actions - self.centre) / self.half_width).astype(np.float32)

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return (self.centre + self.half_width * actions).astype(np.float32)


@dataclass
class TrajectoryBuffer:
    """Whole trajectories, right-padded to a common length that is a multiple of the context; all on the device but
    the lengths, which stay on the CPU: batches are drawn there, so that the host knows a batch's shape (its longest
    trajectory) without waiting for the device to finish its queue."""

    states: torch.Tensor  # [N, T, obs_dim], normalised, zero after the end
    actions: torch.Tensor  # [N, T, act_dim], zero after the end
    lengths: torch.Tensor  # [N], on the CPU
    returns_raw: torch.Tensor  # [N] undiscounted environment return
    y: torch.Tensor  # [N] normalised return (normalised score / 100)

    def __post_init__(self):
        self.lengths = self.lengths.cpu()

    def __len__(self):
        return self.lengths.shape[0]

    def append(self, other: "TrajectoryBuffer") -> "TrajectoryBuffer":
        return TrajectoryBuffer(*(torch.cat([a, b]) for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self):
        return self.states, self.actions, self.lengths, self.returns_raw, self.y


def pad_trajectories(
    states: list[np.ndarray], actions: list[np.ndarray], padded_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pads trajectories with zeros to [N, padded_len, dim]; returns (states, actions, lengths)."""
    lengths = np.array([len(a) for a in actions])
    padded_states = np.zeros((len(states), padded_len, states[0].shape[1]), dtype=np.float32)
    padded_actions = np.zeros((len(actions), padded_len, actions[0].shape[1]), dtype=np.float32)
    for i, (s, a) in enumerate(zip(states, actions, strict=True)):
        padded_states[i, : len(a)] = s
        padded_actions[i, : len(a)] = a
    return (
        torch.from_numpy(padded_states).to(device),
        torch.from_numpy(padded_actions).to(device),
        torch.from_numpy(lengths).to(device),
    )


def valid_mask(lengths: torch.Tensor, padded_len: int) -> torch.Tensor:
    """[N, padded_len] float mask: 1 for the steps a trajectory has, 0 for its padding."""
    return (torch.arange(padded_len, device=lengths.device)[None, :] < lengths[:, None]).float()


def stored_data_signature(folder: str, total_steps: int) -> list[int]:
    """What tells a rewritten dataset from the one a cache was made of: its steps, and each of its data files' size
    and modification time (the data folder's own time changes when a file is added or removed, not rewritten)."""
    files = sorted(os.scandir(os.path.join(folder, "data")), key=lambda entry: entry.name)
    return [total_steps] + [value for entry in files for value in (entry.stat().st_size, entry.stat().st_mtime_ns)]


def read_episodes(
    dataset: minari.MinariDataset, cache: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """States s_0..s_{T-1} (the final observation has no action and is dropped), actions and rewards per episode,
    cached next to the dataset as .npz (reading 1M steps of Minari's HDF5 takes ~10 s, the cache ~1 s)."""
    folder = minari.storage.get_dataset_path(dataset.spec.dataset_id)
    path = os.path.join(folder, "gac_continuous_cache.npz")
    source = stored_data_signature(folder, dataset.total_steps)
    if cache and os.path.exists(path):
        data = np.load(path)
        if "source" in data.files and data["source"].tolist() == source:
            return tuple(split_episodes(data[key], data["lengths"]) for key in ["states", "actions", "rewards"])
    states, actions, rewards = [], [], []
    for episode in dataset.iterate_episodes():
        if len(episode.actions) == 0:
            continue
        if isinstance(episode.observations, dict):
            fail(f"{dataset.spec.dataset_id} has dict observations; gac_continuous.py takes Box observations")
        states.append(np.asarray(episode.observations[:-1], dtype=np.float32))
        actions.append(np.asarray(episode.actions, dtype=np.float32))
        rewards.append(np.asarray(episode.rewards, dtype=np.float64))
    if not actions:
        fail(f"{dataset.spec.dataset_id} holds no episode with a step")
    if cache:
        lengths = np.array([len(a) for a in actions])
        tmp = f"{path}.{os.getpid()}.tmp.npz"  # runs sharing the dataset write their own
        np.savez(tmp, source=source, lengths=lengths, states=np.concatenate(states),
                 actions=np.concatenate(actions), rewards=np.concatenate(rewards))  # fmt: skip
        os.replace(tmp, path)
    return states, actions, rewards


def split_episodes(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1])


def make_env(env_spec: gym.envs.registration.EnvSpec) -> Callable[[], gym.Env]:
    def thunk():
        return gym.make(env_spec)

    return thunk


# ---------------------------------------------------------------------------------------------------------------
# Model: prior encoder U_alpha(z0, s0), trajectory generator p_beta(tau | z), return predictor p_gamma(y | z)
# ---------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention: self-attention when `memory` is None, cross-attention to `memory` otherwise."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, memory=None, memory_index=None, causal: bool = False, cache=None) -> torch.Tensor:
        """x [B, T, d]; memory [M, S, d], by default one row per row of x, else row memory_index[i] for x[i].
        `cache` (acting, see TrajectoryGenerator.step): (stored, position [B, T], visible [B, 1, T, L]); x's keys
        and values are written into `stored` (a dict, filled on first use) at `position`, and x attends to the
        stored ones that `visible` allows."""
        B, T, D = x.shape
        source = x if memory is None else memory
        q = self.query(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        k, v = self.key_value(source).view(len(source), source.shape[1], 2, self.n_head, D // self.n_head).unbind(2)
        if memory_index is not None:  # keys and values are computed once per memory row, then shared
            k, v = k[memory_index], v[memory_index]
        visible = None
        if cache is not None:
            stored, position, visible = cache
            if not stored:  # the first call: room for a whole block's keys and values
                stored.update({name: k.new_zeros(B, visible.shape[-1], *k.shape[2:]) for name in "kv"})
            rows = torch.arange(B, device=x.device)[:, None]
            stored["k"][rows, position], stored["v"][rows, position] = k, v
            k, v = stored["k"], stored["v"]
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible, dropout_p=dropout, is_causal=causal
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, D)))


class Block(nn.Module):
    """Pre-LN transformer block; with `cross_attention` it also reads the plan tokens (as in LPT)."""

    def __init__(self, d_model: int, n_head: int, dropout: float, causal: bool, cross_attention: bool):
        super().__init__()
        self.causal = causal
        self.ln_self = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, n_head, dropout)
        if cross_attention:
            self.ln_cross, self.ln_memory = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.cross_attn = Attention(d_model, n_head, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, memory=None, memory_index=None, cache=None) -> torch.Tensor:
        """x [N, L, d], N sequences; memory [M, P, d] read by sequence i at row memory_index[i]; cache: acting's
        stored keys and values, whose mask replaces the causal one (see Attention)."""
        x = x + self.self_attn(self.ln_self(x), causal=self.causal and cache is None, cache=cache)
        if memory is not None:
            x = x + self.cross_attn(self.ln_cross(x), self.ln_memory(memory), memory_index)
        return x + self.mlp(self.ln_mlp(x))


class PriorEncoder(nn.Module):
    """U_alpha: maps (z0, s0) to plan tokens, so p(z | s0) is N(0, I) pushed through U_alpha(., s0)."""

    def __init__(self, obs_dim: int, d_model: int, n_latent: int, n_layer: int, n_head: int):
        super().__init__()
        self.embed_state = nn.Linear(obs_dim, d_model)
        self.embed_latent = nn.Linear(d_model, d_model)  # without it, LayerNorm would ignore z0 -> z0 + c
        self.token_type = nn.Parameter(torch.zeros(1, 1 + n_latent, d_model))  # tells s0 and each z0 token apart
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, 0.0, causal=False, cross_attention=False) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, z0: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
        # z0: [B, n_latent, d_model], s0: [B, obs_dim] -> plan tokens [B, n_latent, d_model]
        x = torch.cat([self.embed_state(s0)[:, None], self.embed_latent(z0)], dim=1) + self.token_type
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x[:, 1:])


class TrajectoryGenerator(nn.Module):
    """p_beta(tau | z): a causal transformer over (s_t, a_t) tokens that cross-attends to the plan tokens.

    The trajectory is cut into blocks of `context_len` timesteps; attention is causal inside a block, so the
    action a_t depends on the states and actions since the block began, on the timestep, and on the plan.
    Acting with the same blocks (see `rollout`) reproduces exactly the conditionals the model was trained on.
    """

    def __init__(self, obs_dim: int, act_dim: int, args: Args, max_len: int):
        super().__init__()
        d = args.d_model
        self.context_len = args.context_len
        self.block_time = args.time_embedding == "block"
        self.embed_state, self.embed_action = nn.Linear(obs_dim, d), nn.Linear(act_dim, d)
        self.embed_timestep = nn.Embedding(args.context_len if self.block_time else max_len, d)
        self.embed_ln, self.embed_dropout = nn.LayerNorm(d), nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(
            Block(d, args.n_head, args.dropout, causal=True, cross_attention=True) for _ in range(args.n_layer)
        )
        self.ln_f = nn.LayerNorm(d)
        self.action_mean = nn.Linear(d, act_dim)
        self.action_log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, states, actions, timesteps, plan_tokens, blocks=None) -> torch.Tensor:
        """states [B, T, obs], actions [B, T, act], timesteps [B, T], plan_tokens [B, P, d]; T a multiple of the
        context. Returns the mean of p(a_t | s_t and the block's earlier steps, z): [B, T, act], in (-1, 1).
        `blocks`: which of the B * T / context_len blocks (trajectory after trajectory) to compute; the others,
        padding past a trajectory's end, are left out and come back as 0. Default: all of them."""
        B, T, _ = states.shape
        K, n = self.context_len, T // self.context_len
        states, actions, timesteps = (x.reshape(B * n, K, *x.shape[2:]) for x in (states, actions, timesteps))
        if blocks is not None:
            states, actions, timesteps = states[blocks], actions[blocks], timesteps[blocks]
        owner = (blocks if blocks is not None else torch.arange(B * n, device=states.device)) // n  # trajectory
        if self.block_time:  # blocks start at multiples of the context: this is the position in the block
            time = self.embed_timestep(timesteps % K)
        else:  # steps past the longest episode the model was built for share its last embedding
            time = self.embed_timestep(timesteps.clamp(max=self.embed_timestep.num_embeddings - 1))
        tokens = torch.stack([self.embed_state(states) + time, self.embed_action(actions) + time], dim=2)
        # [blocks, K, 2, d] -> [blocks, 2K, d]: interleaved s_t, a_t, one sequence per block
        x = self.embed_dropout(self.embed_ln(tokens.flatten(1, 2)))
        for block in self.blocks:
            x = block(x, plan_tokens, owner)
        mean = self.action_head(self.ln_f(x).reshape(len(x), K, 2, -1)[:, :, 0])  # a_t is read from the s_t token
        if blocks is not None:
            mean = mean.new_zeros(B * n, *mean.shape[1:]).index_copy(0, blocks, mean)
        return mean.reshape(B, T, -1)

    def step(self, state, previous_action, t, plan_tokens, caches: list[dict]) -> torch.Tensor:
        """Acting: the mean of p(a_t | s_t and the block's earlier steps, z) [N, act] for N episodes at once, each at
        its own step t [N], from s_t [N, obs] and a_{t-1} [N, act]. `caches` (one dict per transformer block, empty
        at the first call) keep the keys and values of the block's earlier tokens, so a call computes two tokens,
        a_{t-1} and s_t, instead of the whole block; the result is `forward`'s (a unit test checks it)."""
        K = self.context_len
        slot = t % K
        # the two tokens' places in the block: a_{t-1} at 2 slot - 1, s_t at 2 slot. At a block's first step a_{t-1}
        # belongs to the block before; it goes to the last place, which no state token reads
        position = torch.stack([2 * slot - 1, 2 * slot], 1) % (2 * K)
        # each token sees the places up to its own: the block so far, none of the stale ones of an earlier block
        visible = torch.arange(2 * K, device=t.device) <= position[:, :, None]
        steps = torch.stack([(t - 1).clamp(min=0), t], 1)
        time = self.embed_timestep(
            steps % K if self.block_time else steps.clamp(max=self.embed_timestep.num_embeddings - 1)
        )
        tokens = torch.stack([self.embed_action(previous_action), self.embed_state(state)], 1) + time
        x = self.embed_dropout(self.embed_ln(tokens))
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, plan_tokens, cache=(cache, position, visible[:, None]))
        return self.action_head(self.ln_f(x[:, 1]))  # a_t is read from the s_t token

    def action_log_std_floored(self) -> torch.Tensor:
        """log std of p(a_t | ...): learnt, one per action dimension, floored at -5 (std 0.007)."""
        return self.action_log_std.clamp(min=-5.0)

    def action_head(self, x: torch.Tensor) -> torch.Tensor:
        """tanh(W x + b) in float32 under bf16 autocast too: bf16 would round the mean by up to 0.4 %, coarse next
        to a trained policy's std (down to e^-5 = 0.007)."""
        with torch.autocast(x.device.type, enabled=False):
            return torch.tanh(self.action_mean(x.float()))


class GAC(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, max_len: int):
        super().__init__()
        self.n_return_tokens = args.n_return_tokens
        self.prior = PriorEncoder(obs_dim, args.d_model, args.n_latent, args.prior_layers, args.n_head)
        self.generator = TrajectoryGenerator(obs_dim, act_dim, args, max_len)
        self.return_head = nn.Sequential(  # r_gamma(z) = E[y | z], the mean of p_gamma(y | z)
            nn.Linear(args.n_return_tokens * args.d_model, args.d_model),
            nn.GELU(),
            nn.Linear(args.d_model, args.d_model),
            nn.GELU(),
            nn.Linear(args.d_model, 1),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def plan(self, z0: torch.Tensor, s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = U_alpha(z0, s0), split into (return tokens, generator memory tokens)."""
        z = self.prior(z0, s0)
        return z[:, : self.n_return_tokens], z[:, self.n_return_tokens :]

    def expected_return(self, return_tokens: torch.Tensor) -> torch.Tensor:
        """E[y | z] in float32 under bf16 autocast too: exploitation ranks candidate plans by it, and bf16 would round
        it to steps of 0.4-0.8 points of normalised score."""
        with torch.autocast(return_tokens.device.type, enabled=False):
            return self.return_head(return_tokens.flatten(1).float()).squeeze(-1)

    def predicted_return(self, z0: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
        return self.expected_return(self.plan(z0, s0)[0])


# ---------------------------------------------------------------------------------------------------------------
# The ELBO: log p(tau | z) + log p(y | z) - KL(q(z0) || N(0, I)), with free bits
# ---------------------------------------------------------------------------------------------------------------

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor | float) -> torch.Tensor:
    std = log_std.exp() if isinstance(log_std, torch.Tensor) else math.exp(log_std)
    return -0.5 * ((x - mean) / std) ** 2 - log_std - LOG_SQRT_2PI


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) in closed form, per latent token: [B, n_latent]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def free_bits_kl(kl: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Free bits (Kingma et al. 2016): each token's batch-averaged KL counts as at least `free_bits` nats."""
    return kl.mean(0).clamp(min=free_bits).sum()


def log_likelihoods(model: GAC, z0, s0, states, actions, timesteps, mask, y, return_std: float, blocks=None):
    """Per trajectory: log p_beta(actions | states, z) summed over its valid steps, log p_gamma(y | z), E[y | z].
    `blocks`: the generator's blocks that hold valid steps (see TrajectoryGenerator.forward); default all."""
    return_tokens, plan_tokens = model.plan(z0, s0)
    action_mean = model.generator(states, actions, timesteps, plan_tokens, blocks).float()
    log_std = model.generator.action_log_std_floored()
    action_ll = (gaussian_log_prob(actions, action_mean, log_std).sum(-1) * mask).sum(1)
    y_hat = model.expected_return(return_tokens)
    return_ll = gaussian_log_prob(y, y_hat, math.log(return_std))
    return action_ll, return_ll, y_hat


def fit_local_posteriors(mu, logvar, eps, log_likelihood: Callable, steps: int, lr: float, free_bits: float):
    """Local variational inference: `steps` Adam steps on each q_i(z0) = N(mu_i, diag exp(logvar_i)) to raise
    E_q[log_likelihood(z0)] - KL(q_i || N(0, I)) (free-bits KL), one reparameterised sample z0 = mu + sigma * eps
    with the same eps throughout. The model's parameters are not touched. Returns the new (mu, logvar)."""
    mu, logvar = mu.detach().clone().requires_grad_(True), logvar.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mu, logvar], lr=lr)
    for _ in range(steps):
        z0 = mu + (0.5 * logvar).exp() * eps
        negative_elbo = -log_likelihood(z0).sum() + mu.shape[0] * free_bits_kl(gaussian_kl(mu, logvar), free_bits)
        mu.grad, logvar.grad = torch.autograd.grad(negative_elbo, (mu, logvar))
        optimizer.step()
    return mu.detach(), logvar.detach().clamp(-10.0, 2.0)


def active_latent_dims(posterior_mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across trajectories (Burda et al. 2016); 0 means collapse."""
    return int((posterior_mu.flatten(1).var(0) > threshold).sum())


def sample_blocks(lengths: torch.Tensor, context_len: int, max_blocks: int, n_blocks: int, generator: torch.Generator):
    """For the inner steps: n_blocks context blocks of each trajectory, uniformly without replacement among its
    valid blocks, and the weight (valid blocks / valid blocks drawn) that makes the sum of their log-likelihoods
    an unbiased estimate of the whole trajectory's. `max_blocks`: the longest trajectory's blocks (known on the
    host). Returns (block index [B, n], weight [B])."""
    valid = torch.div(lengths + context_len - 1, context_len, rounding_mode="floor")
    keys = torch.rand(len(lengths), max_blocks, device=lengths.device, generator=generator)
    keys = keys.masked_fill(torch.arange(max_blocks, device=lengths.device) >= valid[:, None], 2.0)  # invalid last
    index = keys.argsort(1)[:, : min(n_blocks, max_blocks)]
    return index, valid / valid.clamp(max=index.shape[1])


def sample_batch(
    lengths: torch.Tensor,
    n_offline: int,
    batch_size: int,
    online_fraction: float,
    generator: torch.Generator,
    by_length: bool = True,
) -> torch.Tensor:
    """Trajectory indices drawn with probability proportional to length (`by_length`) or uniformly; an empty
    trajectory is never drawn. A drawn trajectory brings all its steps: drawing by length makes one twice as long
    weigh four times as much in the loss, where the ELBO gives its actions twice and its return the same. Once
    the buffer holds online trajectories (indices from n_offline on), round(online_fraction * batch_size) come
    from them, at least one if online_fraction > 0."""
    weights = lengths.float() if by_length else (lengths > 0).float()
    n_online = 0
    if len(lengths) > n_offline and online_fraction > 0:  # at least one: 0.1 of a batch of 4 is not none
        n_online = max(round(online_fraction * batch_size), 1)
    parts = []
    if n_online < batch_size:
        parts.append(
            torch.multinomial(weights[:n_offline], batch_size - n_online, replacement=True, generator=generator)
        )
    if n_online > 0:
        online = torch.multinomial(weights[n_offline:], n_online, replacement=True, generator=generator)
        parts.append(n_offline + online)
    return torch.cat(parts)


def last_draws(idx: torch.Tensor) -> torch.Tensor:
    """The positions in `idx` of each value's last occurrence: the rows that write a batch's fits back. A trajectory
    drawn twice is fitted twice; writing both rows with `posterior[idx] = rows` races between them (on a GPU, or a
    CPU with several threads, either row may win, or a mix of the two), so only the last one is written."""
    position = torch.arange(len(idx))
    last = torch.full((int(idx.max()) + 1,), -1).scatter_reduce(0, idx, position, "amax")
    return (last[idx] == position).nonzero().squeeze(1)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor to the device without making the host wait for the work queued there (a pinned, asynchronous
    copy; a plain one waits)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def train_iteration(
    model, optimizer, scheduler, buffer, n_offline, posterior_mu, posterior_logvar, args, sampler, generator, autocast,
    measure_plan: bool = False,
):  # fmt: skip
    """One iteration of Algorithm 1: local posterior steps for a batch of trajectories, then one global step.
    The batch is drawn on the CPU with `sampler`, the rest on the device with `generator`: nothing in an iteration
    waits for the device, so the host queues the next iteration's work while the device runs this one's.
    `measure_plan` adds what the plan tells the model: the log-likelihoods' gain from the posterior plan over one
    drawn from the prior (two more forward passes)."""
    device = buffer.states.device
    idx = sample_batch(
        buffer.lengths, n_offline, args.batch_size, args.online_fraction, sampler, args.sample_by == "length"
    )
    lengths, K = buffer.lengths[idx], args.context_len
    T = int(math.ceil(int(lengths.max()) / K) * K)  # only as many blocks as the longest trajectory needs
    # the blocks that hold a trajectory's steps: the generator skips the rest, padding (half of Hopper's blocks)
    blocks = (torch.arange(T // K) < (lengths[:, None] + K - 1) // K).flatten().nonzero().squeeze(1)
    last = to_device(last_draws(idx), device)
    idx, lengths, blocks = to_device(idx, device), to_device(lengths, device), to_device(blocks, device)
    states, actions, y = buffer.states[idx, :T], buffer.actions[idx, :T], buffer.y[idx].float()
    mask = valid_mask(lengths, T)
    timesteps = torch.arange(T, device=states.device).expand(len(idx), T)
    s0 = states[:, 0]

    # the inner steps read every block, or with --inner-blocks a random few of them, scaled up by `weight`
    inner, inner_blocks, weight = (states, actions, timesteps, mask), blocks, 1.0
    if 0 < args.inner_blocks < T // K:
        chosen, weight = sample_blocks(lengths, K, T // K, args.inner_blocks, generator)
        rows = torch.arange(len(idx), device=states.device)[:, None]

        def pick(x):  # [B, T, ...] -> the chosen blocks [B, n * K, ...]
            return x.reshape(len(idx), T // K, K, *x.shape[2:])[rows, chosen].flatten(1, 2)

        inner, inner_blocks = tuple(pick(x) for x in inner), None

    def log_joint(z0):  # log p(tau | z) + log p(y | z)
        with autocast():
            action_ll, return_ll, _ = log_likelihoods(model, z0, s0, *inner, y, args.return_std, inner_blocks)
        return weight * action_ll + return_ll

    # (1) local variational inference on q_i(z0) for the batch, parameters fixed, no dropout
    eps = torch.randn(posterior_mu[idx].shape, device=states.device, generator=generator)
    model.eval()
    mu, logvar = fit_local_posteriors(
        posterior_mu[idx], posterior_logvar[idx], eps, log_joint, args.inner_steps, args.posterior_lr, args.free_bits
    )
    posterior_mu[idx[last]], posterior_logvar[idx[last]] = mu[last], logvar[last]

    # (2) one global step on (alpha, beta, gamma) with z0 ~ q_i by reparameterisation; the KL has no parameters
    model.train()
    z0 = mu + (0.5 * logvar).exp() * eps
    with autocast():
        action_ll, return_ll, y_hat = log_likelihoods(
            model, z0, s0, states, actions, timesteps, mask, y, args.return_std, blocks
        )
    n_steps = mask.sum()
    loss = -(action_ll + return_ll).sum() / n_steps  # the negative ELBO per timestep, up to the constant KL
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    scheduler.step()

    kl = gaussian_kl(mu, logvar)  # [B, n_latent]
    measured = {}
    if measure_plan:  # no dropout; z0 ~ q_i against z0 ~ N(0, I): another trajectory's eps, no random draw
        model.eval()
        with torch.no_grad(), autocast():
            (post_action, post_return, _), (prior_action, prior_return, _) = (
                log_likelihoods(model, z, s0, states, actions, timesteps, mask, y, args.return_std, blocks)
                for z in (z0, eps.roll(1, 0))
            )
        model.train()
        measured = {
            "charts/plan_gain_action_per_step": (post_action - prior_action).sum() / n_steps,
            "charts/plan_gain_return": (post_return - prior_return).mean(),
        }
    return measured | {
        "losses/action_nll_per_step": -action_ll.sum().detach() / n_steps,
        "losses/return_nll": -return_ll.mean().detach(),
        "losses/return_mse": (y_hat.detach() - y).pow(2).mean(),
        "losses/kl": kl.sum(1).mean(),
        "losses/kl_free_bits": free_bits_kl(kl, args.free_bits),
        "losses/elbo": (action_ll + return_ll - kl.sum(1)).mean().detach(),
        "charts/posterior_std": (0.5 * logvar).exp().mean(),
        "charts/tokens": 2 * n_steps,
    }


# ---------------------------------------------------------------------------------------------------------------
# Inference: exploitation (gradient ascent on the plan) and exploration (plans for an optimistic target)
# ---------------------------------------------------------------------------------------------------------------


def exploit_plans(model: GAC, s0: torch.Tensor, args: Args, autocast, generator: torch.Generator | None = None):
    """For each initial state: M candidates z0 ~ N(0, I), S Adam steps of ascent on
    E[y | U(z0, s0)] - lambda/2 ||z0||^2, keep the best. Returns (z0 [n, L, d], predicted y [S+1, n, M], best [n]).
    `generator`: where the candidates come from (default torch's global one, which dropout also draws from)."""
    n, M = s0.shape[0], args.num_candidates
    s0 = s0.repeat_interleave(M, dim=0)
    shape = (n * M, args.n_latent, args.d_model)
    z0 = torch.randn(shape, device=s0.device, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([z0], lr=args.exploit_lr)
    trace = []
    for step in range(args.exploit_steps + 1):
        with autocast():
            y_hat = model.predicted_return(z0, s0)
        objective = y_hat - 0.5 * args.exploit_kl_weight * z0.pow(2).sum((1, 2))  # exploitation objective
        trace.append(y_hat.detach())
        if step < args.exploit_steps:
            (z0.grad,) = torch.autograd.grad(-objective.sum(), z0)
            optimizer.step()
    best = objective.detach().view(n, M).argmax(1)
    chosen = z0.detach().view(n, M, args.n_latent, args.d_model)[torch.arange(n), best]
    return chosen, torch.stack(trace).view(-1, n, M), best


def exploration_target(buffer_y: torch.Tensor, quantile: float, delta_y: float) -> float:
    """y+ = quantile_q(returns in the buffer) + delta_y, in normalised-return units."""
    return float(torch.quantile(buffer_y.double(), quantile)) + delta_y


@torch.no_grad()
def prior_exploration_targets(model: GAC, s0: torch.Tensor, args: Args, autocast, generator=None, samples: int = 256):
    """Per initial state: y+ = quantile_q of E[y | U(z0, s0)] over `samples` plans z0 ~ N(0, I), + delta_y."""
    n = s0.shape[0]
    z0 = torch.randn(n * samples, args.n_latent, args.d_model, device=s0.device, generator=generator)
    with autocast():
        y_hat = model.predicted_return(z0, s0.repeat_interleave(samples, dim=0)).float()
    return torch.quantile(y_hat.view(n, samples), args.quantile, dim=1) + args.delta_y


def explore_plans(model: GAC, s0: torch.Tensor, target_y: float | torch.Tensor, args: Args, autocast, generator=None):
    """Plans for the target y+ (one number or one per state): z0 from p(z0 | y+, s0), proportional to
    N(z0; 0, I) N(y+; E[y | z], sigma_y^2), by a short variational fit (the same local inference as training) of
    q = N(mu, sigma^2) from the prior, with one draw eps ~ N(0, I) kept throughout. The plan is that draw's
    z0 = mu + sigma * eps: a prior sample moved until it predicts y+, no further than the prior allows. A fresh
    draw from the fitted q would mostly miss y+: a diagonal q keeps the prior's width in every direction, the one
    the return depends on included. Returns z0 [n, L, d]."""
    n = s0.shape[0]
    shape = (n, args.n_latent, args.d_model)
    target = torch.as_tensor(target_y, device=s0.device, dtype=torch.float32).expand(n)

    def log_likelihood(z0):  # log p(y+ | z)
        with autocast():
            y_hat = model.predicted_return(z0, s0)
        return gaussian_log_prob(target, y_hat, math.log(args.return_std))

    eps = torch.randn(shape, device=s0.device, generator=generator)
    zeros = torch.zeros(shape, device=s0.device)
    mu, logvar = fit_local_posteriors(zeros, zeros, eps, log_likelihood, args.explore_steps, args.explore_lr, 0.0)
    return mu + (0.5 * logvar).exp() * eps


# ---------------------------------------------------------------------------------------------------------------
# Acting: vectorised closed-loop rollouts, one plan per episode, batched model calls
# ---------------------------------------------------------------------------------------------------------------


class ProgressBar(Progress):
    """rich's progress bar. Where the output is not a terminal (a log file, a cluster job) rich draws nothing until
    the loop ends, so there the bar's line is printed once a minute instead."""

    def __init__(self, every_s: float = 60.0):
        super().__init__(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.every_s, self.printed = every_s, time.monotonic()

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self.print_to_log()

    def update(self, task_id, **changes) -> None:
        super().update(task_id, **changes)
        self.print_to_log()

    def print_to_log(self) -> None:
        if not self.console.is_terminal and time.monotonic() - self.printed >= self.every_s:
            self.printed = time.monotonic()
            self.console.print(self.make_tasks_table(self.tasks))


@torch.no_grad()
def act(
    model: GAC,
    states,
    previous_actions,
    t,
    plan_tokens,
    caches: list[dict],
    autocast,
    noise: torch.Generator | None = None,
) -> torch.Tensor:
    """The next actions: the mean of p_beta(a_t | s_t, the block so far, z), or with a `noise` generator a draw from
    it, N(mean, std^2) clipped to the action box [-1, 1]."""
    with autocast():
        mean = model.generator.step(states, previous_actions, t, plan_tokens, caches).float()
    if noise is None:
        return mean
    std = model.generator.action_log_std_floored().exp()
    return (mean + std * torch.randn(mean.shape, generator=noise, device=mean.device)).clamp(-1.0, 1.0)


def independent_seeds(key: int | list[int], n: int) -> list[int]:
    """n independent seeds from a key (the run's seed, a purpose, its index). Successive integers would not do: a
    vector env seeds environment i with seed + i, so environment i of a rollout seeded s would start where
    environment i + 1 of one seeded s - 1 does (the round before, or the --seed below at the same iteration)."""
    return np.random.SeedSequence(key).generate_state(n).tolist()


def seeded_generator(key: list[int], device: torch.device) -> torch.Generator:
    """A torch generator of its own for one purpose (training's batches, a rollout's plans), seeded from its key."""
    return torch.Generator(device=device).manual_seed(independent_seeds(key, 1)[0])


def training_generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Training's own two: posterior noise and inner blocks on the device, batches on the CPU (see train_iteration).
    Seeded with seed and seed + 1, they would repeat torch's global stream (initialisation, dropout; seeded with the
    seed itself), and the batches of --seed s the initialisation of --seed s + 1."""
    return seeded_generator([seed, 0, 0], device), seeded_generator([seed, 0, 1], torch.device("cpu"))


def rollout(
    envs: gym.vector.VectorEnv,
    model: GAC,
    choose_plan: Callable,
    num_episodes: int,
    normalize,
    seed: int | list[int],
    autocast,
    description: str,
    replan_every: int = 0,
    action_noise: torch.Generator | None = None,
) -> dict:
    """Runs exactly `num_episodes` episodes, env i running a fixed quota of them (so short episodes are not
    over-represented), each with one plan chosen at its reset by `choose_plan(s0) -> (z0, info)`, and with
    `replan_every` a new one every that many steps, chosen the same way from the current state. Returns each
    episode's return, length, states, actions (the model's, in [-1, 1]; the environment got them mapped to its
    action box), and plan (z0 and the info of its choice; the later plans' z0 in "replans").

    Environment i is seeded once, at the first reset, with the i-th of `independent_seeds(seed, N)`; its later
    episodes follow from its own generator. The vector env autoresets in the same step (Gymnasium 1.x SAME_STEP
    mode): the observation returned with a done flag is the next episode's s0, and every `step` call is one real
    step of every env, so no step is lost or doubled. Actions are the generator's mean (with an `action_noise`
    generator, draws from its Gaussian), acting on the real observed states (closed loop), with the block-causal
    context the model was trained with."""
    device = next(model.parameters()).device
    N = envs.num_envs
    quota = np.array([num_episodes // N + (i < num_episodes % N) for i in range(N)])
    finished = np.zeros(N, dtype=int)
    model.eval()

    obs, _ = envs.reset(seed=independent_seeds(seed, N))
    states_np = normalize(obs)
    states = torch.as_tensor(states_np, device=device)
    z0, plan_info = choose_plan(states)
    with torch.no_grad():
        plan_tokens = model.plan(z0, states)[1]
    caches = [{} for _ in model.generator.blocks]  # the keys and values of each episode's current block
    action = torch.zeros(N, envs.single_action_space.shape[0], device=device)  # a_{t-1}
    t = np.zeros(N, dtype=int)
    episode_return = np.zeros(N)
    trajectory = [{"states": [], "actions": []} for _ in range(N)]
    episodes = {"returns_raw": [], "lengths": [], "states": [], "actions": [], "plan": []}
    current_plan = [{"z0": z0[i]} | {key: value[i] for key, value in plan_info.items()} for i in range(N)]
    scale = ActionScaler(envs.single_action_space)
    low, high = envs.single_action_space.low, envs.single_action_space.high

    with ProgressBar() as progress:
        task = progress.add_task(description, total=num_episodes, info="")
        while (finished < quota).any():
            time_steps = torch.as_tensor(t, device=device)
            action = act(model, states, action, time_steps, plan_tokens, caches, autocast, action_noise)
            action_np = action.cpu().numpy()  # in [-1, 1]: recorded, and the next step's a_{t-1}, as in training
            for i in range(N):
                trajectory[i]["states"].append(states_np[i])
                trajectory[i]["actions"].append(action_np[i])
            obs, reward, terminated, truncated, _ = envs.step(np.clip(scale.to_env(action_np), low, high))
            episode_return += reward
            t += 1
            states_np = normalize(obs)
            states = torch.as_tensor(states_np, device=device)
            done = np.logical_or(terminated, truncated)
            for i in np.flatnonzero(done):
                if finished[i] < quota[i]:
                    episodes["returns_raw"].append(episode_return[i])
                    episodes["lengths"].append(t[i])
                    episodes["states"].append(np.stack(trajectory[i]["states"]))
                    episodes["actions"].append(np.stack(trajectory[i]["actions"]))
                    episodes["plan"].append(current_plan[i])
                    finished[i] += 1
                    progress.advance(task)
                    progress.update(task, info=f"return {np.mean(episodes['returns_raw']):.1f}")
                episode_return[i], t[i], trajectory[i] = 0.0, 0, {"states": [], "actions": []}
            restart = np.flatnonzero(done & (finished < quota))
            if len(restart):  # new plans for the episodes that start now, from their own s0
                new_z0, new_info = choose_plan(states[restart])
                with torch.no_grad():
                    plan_tokens[restart] = model.plan(new_z0, states[restart])[1]
                for j, i in enumerate(restart):
                    current_plan[i] = {"z0": new_z0[j]} | {key: value[j] for key, value in new_info.items()}
            replan = np.flatnonzero(~done & (finished < quota) & (t % replan_every == 0)) if replan_every else []
            if len(replan):  # a new block starts at this step: its plan, from the state each episode is in
                new_z0, _ = choose_plan(states[replan])
                with torch.no_grad():
                    plan_tokens[replan] = model.plan(new_z0, states[replan])[1]
                for j, i in enumerate(replan):
                    current_plan[i].setdefault("replans", []).append(new_z0[j])
    return episodes


# ---------------------------------------------------------------------------------------------------------------
# Logging and checkpoints
# ---------------------------------------------------------------------------------------------------------------


def plot_inference_dynamics(trace: torch.Tensor, best: torch.Tensor, achieved_y: np.ndarray):
    """Predicted y per ascent step: all candidates and the chosen ones, against the achieved returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = trace.cpu().numpy()  # [S+1, n, M]
    chosen = trace[:, np.arange(trace.shape[1]), best.cpu().numpy()]  # [S+1, n]
    steps = np.arange(trace.shape[0])
    figure, axis = plt.subplots(figsize=(6, 4))
    for values, label in [(trace.reshape(len(steps), -1), "all candidates"), (chosen, "chosen plans")]:
        mean, std = values.mean(1), values.std(1)
        axis.plot(steps, mean, label=label)
        axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axis.axhline(achieved_y.mean(), color="black", linestyle="--", label="achieved y (mean)")
    axis.set_xlabel("gradient-ascent step")
    axis.set_ylabel("E[y | z] (normalised return)")
    axis.set_title("Inference dynamics")
    axis.legend()
    figure.tight_layout()
    return figure


def online_part(buffer: TrajectoryBuffer, n_offline: int) -> dict[str, torch.Tensor]:
    """The buffer's online trajectories (from index n_offline on), copied to the CPU on their own: torch.save of a
    slice writes the storage under it, and the whole offline dataset with it."""
    return {field.name: getattr(buffer, field.name)[n_offline:].to("cpu", copy=True) for field in fields(buffer)}


def save_checkpoint(path: str, state: dict):
    """Writes atomically: a kill mid-write leaves the previous checkpoint intact."""
    tmp_path = path + ".tmp"
    torch.save(state, tmp_path)
    os.replace(tmp_path, path)


def seed_everything(seed: int, torch_deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    torch.backends.cudnn.benchmark = not torch_deterministic


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    # a kill (SIGTERM, as from `timeout` or a scheduler) unwinds like Ctrl-C: the finally block writes metrics.json
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    checkpoint = None
    if args.resume:
        path = os.path.join(args.resume, "checkpoint.pt") if os.path.isdir(args.resume) else args.resume
        if not os.path.isfile(path):
            fail(f"--resume: no checkpoint at {path}")
        defaults = asdict(Args())
        given = [("--no-" if value is False else "--") + name.replace("_", "-") for name, value in asdict(args).items()
                 if name not in ("resume", "save_model") and value != defaults[name]]  # fmt: skip
        if given:  # they would be ignored
            fail(f"--resume continues a run with the flags it started with; leave out {' '.join(given)}")
        checkpoint = load_checkpoint(path, "--resume", CHECKPOINT_KEYS)
        resumed_args = Args(**checkpoint["args"])
        args = resumed_args  # the run continues with the flags it started with
        args.save_model = True
        run_dir = os.path.dirname(os.path.abspath(path))
        run_name = os.path.basename(run_dir)
    else:
        data_name = args.dataset_id.replace("/", "-") if args.dataset_id else args.env_id  # the data it runs on
        run_name = f"{data_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", run_name)
    init_path, init_checkpoint = None, None
    if args.init_from and checkpoint is None:  # a resumed --init-from run continues from its own checkpoint
        init_path, init_checkpoint = load_offline_checkpoint(args.init_from, args)
    dataset_id = resolve_dataset_id(args)
    timings = {
        "data_loading": 0.0,
        "offline_training": 0.0,
        "evaluation": 0.0,
        "online_collection": 0.0,
        "online_training": 0.0,
    }
    counts = {"updates": 0, "train_tokens": 0.0, "eval_env_steps": 0}  # for the throughput in metrics.json
    logged = {}  # the last logged value of each training loss and chart
    run_start = time.time()

    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        # cuDNN's attention, which recent torch prefers on Hopper GPUs, builds an execution plan for every new shape
        # (tens of milliseconds each), and a batch's number of computed blocks changes at every update: with it a
        # run's first two minutes went at 2-6 updates/s, then 13 (H200). Flash attention needs no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # ---- data ----
    dataset = load_minari_dataset(dataset_id)
    eval_env = dataset.recover_environment(eval_env=True)
    env_spec, action_space = eval_env.spec, eval_env.action_space
    eval_env.close()
    if not isinstance(dataset.observation_space, gym.spaces.Box):
        fail(f"{dataset_id} has {type(dataset.observation_space).__name__} observations; this script takes Box")
    if not isinstance(action_space, gym.spaces.Box) or not np.isfinite([action_space.low, action_space.high]).all():
        fail(f"{dataset_id}: actions in {action_space}; the generator's tanh mean needs a bounded Box")
    dataset_states, dataset_actions, dataset_rewards = read_episodes(dataset)
    to_model = ActionScaler(action_space).to_model
    dataset_actions = [to_model(a) for a in dataset_actions]  # to [-1, 1], where the generator's mean lives
    returns_raw = episode_returns(dataset_rewards)
    ref_min, ref_max, normalisation = reference_scores(dataset, returns_raw)
    normalize = StateNormalizer(np.concatenate(dataset_states))
    max_len = max(env_spec.max_episode_steps or 0, max(len(a) for a in dataset_actions))
    padded_len = int(math.ceil(max_len / args.context_len) * args.context_len)
    buffer = TrajectoryBuffer(
        *pad_trajectories([normalize(s) for s in dataset_states], dataset_actions, padded_len, device),
        returns_raw=torch.as_tensor(returns_raw, device=device),
        y=torch.as_tensor(normalize_returns(returns_raw, ref_min, ref_max), device=device, dtype=torch.float32),
    )
    n_offline = len(buffer)
    data_summary = {  # what the local posteriors belong to: a checkpoint is resumed only on the same data
        "episodes": n_offline,
        "steps": int(buffer.lengths.sum()),
        "return_sum": float(np.sum(returns_raw)),
    }
    obs_dim, act_dim = dataset_states[0].shape[1], dataset_actions[0].shape[1]
    print(
        f"{dataset_id}: {n_offline} episodes, {data_summary['steps']} steps, "
        f"dataset score {100 * buffer.y.mean():.1f} +- {100 * buffer.y.std():.1f}; normalisation: {normalisation}"
    )
    timings["data_loading"] = time.time() - run_start
    if checkpoint is None:  # a new run (a resumed one writes into its own folder)
        run_dir = claim_run_dir(run_dir)
        run_name = os.path.basename(run_dir)
    print(f"run folder: {run_dir}")

    # ---- model, optimiser, local posteriors ----
    model = GAC(obs_dim, act_dim, args, padded_len).to(device)
    optimizer = torch.optim.AdamW(  # fused: one kernel for all parameters on the GPU instead of several per tensor
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / max(1, args.warmup_iterations))
    )
    latent_shape = (args.n_latent, args.d_model)
    posterior_mu = torch.zeros(n_offline, *latent_shape, device=device)
    posterior_logvar = torch.full((n_offline, *latent_shape), args.posterior_init_logvar, device=device)
    generator, sampler = training_generators(args.seed, device)  # posterior noise and inner blocks; batches
    iteration, start_round = 0, 0
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    metrics = {
        "script": os.path.basename(__file__),
        "command": "python " + shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "args": asdict(args),
        "dataset_id": dataset_id,
        "data": data_summary,
        "normalisation": normalisation,
        "device": str(device),
        "machine": machine,
        "evaluations": [],
    }
    if checkpoint is not None:
        check_same_data(checkpoint, path, "--resume", dataset_id, data_summary)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        online = checkpoint["online_buffer"]
        if online["lengths"].numel():
            buffer = buffer.append(TrajectoryBuffer(**{k: v.to(device) for k, v in online.items()}))
        posterior_mu = checkpoint["posterior_mu"].to(device)
        posterior_logvar = checkpoint["posterior_logvar"].to(device)
        generator.set_state(checkpoint["generator_state"])
        sampler.set_state(checkpoint["sampler_state"])
        torch.set_rng_state(checkpoint["torch_rng_state"])
        if device.type == "cuda" and "cuda_rng_state" in checkpoint:  # dropout draws from it on the GPU
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"], device)
        iteration, start_round = checkpoint["iteration"], checkpoint["round"]
        metrics = json.loads(checkpoint["metrics"])
        for key, value in checkpoint.get("timings", {}).items():  # the killed run's time counts too
            timings[key] += value
        counts |= checkpoint.get("counts", {})
        logged |= checkpoint.get("logged", {})
        run_start -= checkpoint.get("elapsed_s", 0.0)
        print(f"resumed {run_dir} at iteration {iteration}, online round {start_round}")
    elif init_checkpoint is not None:
        check_same_data(init_checkpoint, init_path, "--init-from", dataset_id, data_summary)
        model.load_state_dict(init_checkpoint["model"])
        optimizer.load_state_dict(init_checkpoint["optimizer"])
        scheduler.load_state_dict(init_checkpoint["scheduler"])
        posterior_mu = init_checkpoint["posterior_mu"].to(device)
        posterior_logvar = init_checkpoint["posterior_logvar"].to(device)
        iteration = init_checkpoint["iteration"]
        offline_run = json.loads(init_checkpoint["metrics"])
        metrics["init_from"] = {
            "path": os.path.abspath(init_path),
            "command": offline_run.get("command"),
            "timings_s": offline_run.get("timings_s", {}),  # the offline run's time until it wrote the checkpoint
        }
        if "local_posteriors" in offline_run:  # the model's, as its offline training left them
            metrics["local_posteriors"] = offline_run["local_posteriors"]
        print(f"starting from the offline model of {init_path} (iteration {iteration})")

    # a resumed run drops what the killed one logged after its checkpoint, which was written after step `iteration`
    writer = SummaryWriter(run_dir, purge_step=iteration + 1 if checkpoint is not None else None)
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs wandb: pip install wandb")
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
            resume="allow",
            id=run_name,
        )
    provenance = {
        "dataset_id": dataset_id,
        "dataset_episodes": n_offline,
        "dataset_steps": int(buffer.lengths[:n_offline].sum()),
        "dataset_algorithm": dataset.storage.metadata.get("algorithm_name"),
        "dataset_description": dataset.storage.metadata.get("description"),
        "normalisation": normalisation,
        "eval_env": env_spec.id,
        "device": str(device),
    }
    table = "\n".join(f"|{key}|{value}|" for key, value in (vars(args) | provenance).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")

    def checkpoint_now(round_index: int):
        if not args.save_model:
            return
        save_checkpoint(
            os.path.join(run_dir, "checkpoint.pt"),
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "posterior_mu": posterior_mu.cpu(),
                "posterior_logvar": posterior_logvar.cpu(),
                "online_buffer": online_part(buffer, n_offline),
                "generator_state": generator.get_state(),
                "sampler_state": sampler.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "cuda_rng_state": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0),
                "iteration": iteration,
                "round": round_index,
                "args": asdict(args),
                "metrics": json.dumps(metrics),
                "timings": timings,
                "counts": counts,
                "logged": logged,  # the plan gains that the end of offline training reports come from it
                "elapsed_s": time.time() - run_start,
            },
        )

    vector_env = gym.vector.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv
    vector_envs = {}  # by size, made on first use and kept

    def envs_for(num_episodes: int) -> gym.vector.VectorEnv:
        """`--num-envs` environments, or one per episode where there are fewer: all of a round's episodes start
        together, so exploration chooses their plans in one batched call instead of one call per reset."""
        n = min(args.num_envs, num_episodes)
        if n not in vector_envs:
            make = [make_env(env_spec) for _ in range(n)]
            vector_envs[n] = vector_env(make, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        return vector_envs[n]

    def write_metrics():
        metrics["timings_s"] = timings | {"total": time.time() - run_start}
        train_time = max(timings["offline_training"] + timings["online_training"], 1e-9)
        metrics["throughput"] = {
            "train_tokens_per_s": counts["train_tokens"] / train_time,
            "updates_per_s": counts["updates"] / train_time,
            "eval_env_steps_per_s": counts["eval_env_steps"] / max(timings["evaluation"], 1e-9),
        }
        with open(os.path.join(run_dir, "metrics.json.tmp"), "w") as f:
            json.dump(metrics, f, indent=2)
        os.replace(os.path.join(run_dir, "metrics.json.tmp"), os.path.join(run_dir, "metrics.json"))

    def evaluate(label: str, num_episodes: int) -> tuple[dict, dict]:
        """Exploitation: ascent on the plan at every reset, deterministic actions; normalised score x 100."""
        start = time.time()
        traces = []
        key = [args.seed, 1, iteration]  # this evaluation's own random numbers: training's stay as they are
        plans = seeded_generator(key + [0], device)

        def choose_plan(s0):
            z0, trace, best = exploit_plans(model, s0, args, autocast, plans)
            traces.append((trace, best))
            return z0, {"predicted_y": trace[-1, torch.arange(len(best)), best]}

        episodes = rollout(
            envs_for(num_episodes),
            model,
            choose_plan,
            num_episodes,
            normalize,
            seed=key + [1],
            autocast=autocast,
            description=f"evaluate ({label})",
            replan_every=args.replan_every,
        )
        counts["eval_env_steps"] += int(np.sum(episodes["lengths"]))
        scores = 100 * normalize_returns(np.array(episodes["returns_raw"]), ref_min, ref_max)
        predicted = 100 * torch.stack([plan["predicted_y"] for plan in episodes["plan"]]).cpu().numpy()
        trace, best = traces[0]  # the plans chosen at the first reset of every env
        result = {
            "iteration": iteration,
            "label": label,
            "score_mean": float(scores.mean()),
            "score_std": float(scores.std()),
            "return_mean": float(np.mean(episodes["returns_raw"])),
            "predicted_score_mean": float(predicted.mean()),
            "length_mean": float(np.mean(episodes["lengths"])),
        }
        writer.add_scalar("eval/normalized_score", result["score_mean"], iteration)
        writer.add_scalar("eval/normalized_score_std", result["score_std"], iteration)
        writer.add_scalar("eval/return", result["return_mean"], iteration)
        writer.add_scalar("eval/episode_length", result["length_mean"], iteration)
        writer.add_scalar("eval/predicted_score", result["predicted_score_mean"], iteration)
        chosen = trace[:, torch.arange(trace.shape[1]), best]
        # predicted y against the ascent step, one TensorBoard run per evaluation (their curves overlay in one chart);
        # purge_step=0: a resumed run that evaluates at this iteration again replaces what the killed one wrote here
        with SummaryWriter(os.path.join(run_dir, "inference", f"iteration_{iteration}"), purge_step=0) as curves:
            for step in range(trace.shape[0]):
                curves.add_scalar("inference/chosen_y", chosen[step].mean(), step)
                curves.add_scalar("inference/candidates_y", trace[step].mean(), step)
        figure = plot_inference_dynamics(trace, best, scores / 100)
        figure.savefig(os.path.join(run_dir, f"inference_dynamics_{iteration}.png"))
        writer.add_figure("eval/inference_dynamics", figure, iteration)
        metrics["evaluations"].append(result)
        timings["evaluation"] += time.time() - start
        write_metrics()
        print(
            f"[{label}] iteration {iteration}: normalised score {result['score_mean']:.1f} +- "
            f"{result['score_std']:.1f} (predicted {result['predicted_score_mean']:.1f})"
        )
        return result, episodes

    def train(num_iterations: int, description: str, phase: str, round_index: int):
        global iteration
        last_log = time.time()
        tokens = 0.0  # a tensor once training runs: summed on the device, read when logged
        with ProgressBar() as progress:
            task = progress.add_task(description, total=num_iterations, info="")
            for _ in range(num_iterations):
                start = time.time()
                losses = train_iteration(
                    model,
                    optimizer,
                    scheduler,
                    buffer,
                    n_offline,
                    posterior_mu,
                    posterior_logvar,
                    args,
                    sampler,
                    generator,
                    autocast,
                    measure_plan=(iteration + 1) % args.log_every == 0,
                )
                iteration += 1
                counts["updates"] += 1
                tokens = tokens + losses.pop("charts/tokens")
                timings[f"{phase}_training"] += time.time() - start  # the time of updates alone, kept on a kill
                if iteration % args.log_every == 0:
                    elapsed = time.time() - last_log
                    counts["train_tokens"] += float(tokens)
                    logged.update({key: float(value) for key, value in losses.items()})
                    for key in losses:
                        writer.add_scalar(key, logged[key], iteration)
                    writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], iteration)
                    writer.add_scalar("charts/active_latent_dims", active_latent_dims(posterior_mu), iteration)
                    writer.add_scalar("charts/iterations_per_s", args.log_every / elapsed, iteration)
                    writer.add_scalar("charts/tokens_per_s", float(tokens) / elapsed, iteration)
                    tokens, last_log = 0.0, time.time()
                    progress.update(task, info=f"elbo {float(losses['losses/elbo']):.1f}")
                progress.advance(task)
                if phase == "offline":
                    paused = time.time()  # the throughput charts time training alone
                    if iteration % args.eval_every == 0 and iteration < args.num_iterations:
                        evaluate("offline", args.eval_episodes)
                    if iteration % args.checkpoint_every == 0:
                        checkpoint_now(round_index)
                    last_log += time.time() - paused
        counts["train_tokens"] += float(tokens)  # since the last log

    metrics["status"] = "running"  # then finished, stopped (SIGTERM, Ctrl-C) or failed: benchmark.sh leaves failed out
    try:
        # ---- offline: maximise the ELBO on the dataset ----
        if iteration < args.num_iterations:
            train(args.num_iterations - iteration, "offline training", "offline", 0)
            metrics.pop("local_posteriors", None)  # an --init-from run's, from before this training
        if "local_posteriors" not in metrics:  # computed once, by the run that ends the offline training
            std, active = float((0.5 * posterior_logvar[:n_offline]).exp().mean()), active_latent_dims(posterior_mu)
            metrics["local_posteriors"] = {"std": std, "active_dims": active, "dims": posterior_mu[0].numel()}
            warning = ""  # README, implementation notes: "The posteriors need visits"
            if std < 0.5:
                warning = "; too few visits per trajectory for the plans to matter"
            elif active == 0:
                warning = "; they are the prior again, so the plans carry nothing (posterior collapse)"
            print(
                f"local posteriors: std {std:.2f} (the prior's is 1), {active} of {posterior_mu[0].numel()} latent "
                f"dimensions in use{warning}"
            )
            if "charts/plan_gain_action_per_step" in logged:  # README, implementation notes: "What the plans tell"
                gain = {key[len("charts/") :]: logged[key] for key in logged if key.startswith("charts/plan_gain")}
                metrics["local_posteriors"] |= gain
                print(
                    f"what the plans tell the model: z0 from the posteriors, not the prior, raises log p(actions|z) by "
                    f"{gain['plan_gain_action_per_step']:.3f} nats per step and log p(y|z) by "
                    f"{gain['plan_gain_return']:.2f} nats (the last logged batch)"
                )
        if "offline" not in metrics:
            metrics["offline"], _ = evaluate("offline", args.eval_episodes)
            checkpoint_now(0)
            if args.save_model and not args.init_from:  # what --init-from runs start from
                shutil.copyfile(os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "offline.pt.tmp"))
                os.replace(os.path.join(run_dir, "offline.pt.tmp"), os.path.join(run_dir, "offline.pt"))

        # ---- online: rounds of exploration with optimistic targets, training, exploitation ----
        for round_index in range(start_round, args.online_rounds):
            start = time.time()
            quantile_y = float(torch.quantile(buffer.y.double(), args.quantile))
            if args.fixed_target is not None:
                target_y = args.fixed_target  # ablation: a fixed y*
            elif args.target_from == "buffer":
                target_y = exploration_target(buffer.y, args.quantile, args.delta_y)
            else:
                target_y = None  # one per episode, from its own s0

            key = [args.seed, 2, round_index]  # this round's own random numbers
            plans = seeded_generator(key + [0], device)
            noise = seeded_generator(key + [2], device) if args.explore_actions == "sample" else None

            def choose_plan(s0, target_y=target_y, plans=plans):
                if target_y is None:
                    target = prior_exploration_targets(model, s0, args, autocast, plans)
                else:
                    target = torch.full((s0.shape[0],), target_y, device=s0.device)
                return explore_plans(model, s0, target, args, autocast, plans), {"target_y": target}

            episodes = rollout(
                envs_for(args.episodes_per_round),
                model,
                choose_plan,
                args.episodes_per_round,
                normalize,
                seed=key + [1],
                autocast=autocast,
                description=f"round {round_index + 1}: explore"
                + (f" (y+ = {100 * target_y:.1f})" if target_y is not None else " (y+ per start)"),
                action_noise=noise,
            )
            target_y = float(torch.stack([p["target_y"] for p in episodes["plan"]]).mean())  # per-episode ones: mean
            new_returns = np.array(episodes["returns_raw"])
            new_y = normalize_returns(new_returns, ref_min, ref_max)
            buffer = buffer.append(
                TrajectoryBuffer(
                    *pad_trajectories(episodes["states"], episodes["actions"], padded_len, device),
                    returns_raw=torch.as_tensor(new_returns, device=device),
                    y=torch.as_tensor(new_y, device=device, dtype=torch.float32),
                )
            )
            # the new trajectories' local posteriors start at the plan that generated them, narrow as the offline ones
            new_mu = torch.stack([p["z0"] for p in episodes["plan"]])
            posterior_mu = torch.cat([posterior_mu, new_mu])
            posterior_logvar = torch.cat([posterior_logvar, torch.full_like(new_mu, args.posterior_init_logvar)])
            timings["online_collection"] += time.time() - start
            # at the first update that trains on them: a resume from the checkpoint before them purges them
            for key, value in {
                "round": round_index + 1,
                "target_score": 100 * target_y,
                "buffer_quantile_score": 100 * quantile_y,
                "achieved_score": 100 * new_y.mean(),
                "achieved_score_max": 100 * new_y.max(),
                "buffer_trajectories": len(buffer),
                "buffer_score_mean": 100 * buffer.y.mean(),
            }.items():
                writer.add_scalar(f"online/{key}", value, iteration + 1)
            print(
                f"round {round_index + 1}: y+ {100 * target_y:.1f}, achieved {100 * new_y.mean():.1f} "
                f"+- {100 * new_y.std():.1f}, buffer {len(buffer)} trajectories"
            )

            train(args.online_iterations, f"round {round_index + 1}: train", "online", round_index)
            result, _ = evaluate(f"round {round_index + 1}", args.eval_episodes)
            result |= {"round": round_index + 1, "target_score": 100 * target_y, "achieved_score": 100 * new_y.mean()}
            metrics.setdefault("online", []).append(result)
            checkpoint_now(round_index + 1)
        metrics["status"] = "finished"
    except BaseException as error:
        stopped = isinstance(error, (KeyboardInterrupt, SystemExit))
        metrics["status"] = "stopped" if stopped else f"failed: {type(error).__name__}: {error}".splitlines()[0]
        raise
    finally:
        write_metrics()
        for envs in vector_envs.values():
            envs.close()
        writer.close()
