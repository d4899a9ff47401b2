"""Shared fixtures: tiny Minari datasets made here (no network), in a temporary MINARI_DATASETS_PATH."""

import os
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY_HOPPER = "test/hopper/tiny-v0"


def make_tiny_hopper_dataset(dataset_id: str = TINY_HOPPER, episodes: int = 12, seed: int = 0):
    """Random-action Hopper-v5 episodes (a few dozen steps each), stored as a real Minari dataset with the
    evaluation environment and reference scores."""
    import gymnasium as gym
    import minari
    import numpy as np
    from minari.data_collector import EpisodeBuffer

    env = gym.make("Hopper-v5")
    env.action_space.seed(seed)
    buffers = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            done = terminated or truncated
        buffers.append(
            EpisodeBuffer(
                id=episode,
                seed=seed + episode,
                observations=np.array(observations),
                actions=np.array(actions),
                rewards=np.array(rewards),
                terminations=np.array(terminations),
                truncations=np.array(truncations),
                infos={},
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari asks for an author and a code permalink
        return minari.create_dataset_from_buffers(
            dataset_id=dataset_id,
            buffer=buffers,
            env=env.spec,
            eval_env=env.spec,
            algorithm_name="random actions (test fixture)",
            ref_min_score=0.0,
            ref_max_score=100.0,
            description="tiny random Hopper dataset for tests",
        )


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    make_tiny_hopper_dataset()
    return root
