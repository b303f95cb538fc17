"""Repository-wide pytest setup: every test and doctest starts from the same random state."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# One intra-op thread for the whole run: the suite's tensors are tiny, and on a busy 2-core machine two threads
# mostly wait on each other (10-100x slower for the recurrent and streaming tests). Results do not depend on it.
torch.set_num_threads(1)
