"""Repository-wide pytest setup: every test and doctest starts from the same random state."""

import os

import pytest
import torch

# Without a GPU, normlab's Triton kernels run on CPU tensors through Triton's interpreter. Triton reads the variable
# when a kernel is defined, so it is set before anything imports normlab.kernels' Triton modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# One intra-op thread for the whole run: the suite's tensors are tiny, and on a busy 2-core machine two threads
# mostly wait on each other (10-100x slower for the recurrent and streaming tests). Results do not depend on it.
torch.set_num_threads(1)
