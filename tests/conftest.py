"""Shared fixtures: tiny Minari datasets made here (no network), in a temporary MINARI_DATASETS_PATH."""

import os
import signal
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tiny_datasets import make_tiny_dataset  # noqa: E402


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    make_tiny_dataset()
    return root


@pytest.fixture
def vector_env_sizes(monkeypatch):
    """The number of environments of every SyncVectorEnv made during the test, in order."""
    import gymnasium as gym

    sizes = []

    class Recording(gym.vector.SyncVectorEnv):
        def __init__(self, env_fns, **kwargs):
            sizes.append(len(env_fns))
            super().__init__(env_fns, **kwargs)

    monkeypatch.setattr(gym.vector, "SyncVectorEnv", Recording)
    return sizes


@pytest.fixture(autouse=True)
def restore_sigterm_handler():
    """A script run in-process (runpy) installs its SIGTERM handler: pytest's own comes back after the test."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)
