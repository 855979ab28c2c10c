"""Shared test setup: hypothesis profiles and deterministic torch settings.

Profiles (select with HYPOTHESIS_PROFILE=name):
- ``ci`` (default): few examples per property so the whole suite fits CI's time.
- ``thorough``: >= 1000 examples per property, no deadline, for long campaigns.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread. On a shared, oversubscribed CPU two spinning OpenMP
    threads per op make small ops up to 100x slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 30 .txt documents of Python's reference text (ships with Python)."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("corpus")
    for i, key in enumerate(sorted(topics)[:30]):
        (d / f"{i:02d}.txt").write_text(topics[key], encoding="utf-8")
    return d
