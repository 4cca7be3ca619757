import os

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# every test (and every command it runs) starts its own embedded Ray unless it names a cluster: never
# join one that happens to run on this machine (a developer's, `make cluster-test`'s)
os.environ.setdefault("RAY_ADDRESS", "local")
torch.set_num_threads(2)


@pytest.fixture
def tiny_splits():
    """A learnable 10-class task: each class lights a different pixel block."""
    from specdistill.data import Split

    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 10, n)
    images = (rng.random((n, 16, 16)) * 60).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, (y // 5) * 8:(y // 5) * 8 + 8, (y % 5) * 3:(y % 5) * 3 + 3] = 255
    return Split(images[:300], labels[:300]), Split(images[300:], labels[300:])
