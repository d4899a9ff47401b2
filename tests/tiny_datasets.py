"""Tiny Minari datasets built locally (no network), for the tests and for trying the scripts in seconds.

python tests/tiny_datasets.py            # writes test/hopper/tiny-v0 under $MINARI_DATASETS_PATH
"""

import argparse
import warnings

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-id", default=TINY_HOPPER)
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    dataset = make_tiny_hopper_dataset(options.dataset_id, options.episodes, options.seed)
    print(f"wrote {options.dataset_id}: {dataset.total_episodes} episodes, {dataset.total_steps} steps")
