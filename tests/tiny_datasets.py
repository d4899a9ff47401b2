"""Tiny Minari datasets built locally (no network), for the tests and for trying the scripts in seconds.

python tests/tiny_datasets.py                  # writes test/hopper/tiny-v0 under $MINARI_DATASETS_PATH
python tests/tiny_datasets.py --env-id Ant --max-steps 60   # test/ant/tiny-v0, episodes cut at 60 steps
"""

import argparse
import warnings

TINY_HOPPER = "test/hopper/tiny-v0"


def tiny_dataset_id(env_name: str) -> str:
    return f"test/{env_name.lower()}/tiny-v0"


def make_tiny_dataset(
    dataset_id: str = TINY_HOPPER, episodes: int = 12, seed: int = 0, env_name: str = "Hopper", max_steps: int = 1000
):
    """Random-action `env_name`-v5 episodes, stored as a real Minari dataset with the evaluation environment and
    reference scores. An episode ends where the environment ends it (Hopper's random ones fall within a few dozen
    steps) or, truncated, after `max_steps` (HalfCheetah never falls: only a small one keeps its episodes tiny)."""
    import gymnasium as gym
    import minari
    import numpy as np
    from minari.data_collector import EpisodeBuffer

    env = gym.make(f"{env_name}-v5")
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
            truncations.append(truncated or len(actions) == max_steps)
            done = terminated or truncations[-1]
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
            description=f"tiny random {env_name} dataset for tests",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="Hopper", choices=["Hopper", "Walker2d", "HalfCheetah", "Ant"])
    parser.add_argument("--dataset-id", default=None, help="default: test/<env>/tiny-v0")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=1000, help="episodes truncated after this many steps")
    options = parser.parse_args()
    dataset_id = options.dataset_id or tiny_dataset_id(options.env_id)
    dataset = make_tiny_dataset(dataset_id, options.episodes, options.seed, options.env_id, options.max_steps)
    print(f"wrote {dataset_id}: {dataset.total_episodes} episodes, {dataset.total_steps} steps")
