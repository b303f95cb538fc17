"""Small models and data for the doctor tests, also named as 'module:function' strings by the CLI tests."""

from __future__ import annotations

import torch
from torch import nn

from normlab.surgery.recalibrate import recalibrate_bn


class ConvNet(nn.Module):
    """conv-bn-relu twice, pool, linear: two BatchNorm2d layers with 8 channels."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, momentum=momentum)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, momentum=momentum)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class MLP(nn.Module):
    """linear-bn-relu-linear on (N, 6) inputs: one BatchNorm1d with 16 channels."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16, momentum=momentum)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class Recurrent(nn.Module):
    """One linear and one BatchNorm1d applied at each of ``steps`` time steps: the batch norm is shared."""

    def __init__(self, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps
        self.cell = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(self.steps):
            h = torch.tanh(self.bn(self.cell(h)) + x)
        return h


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).mean((2, 3))


def images(batches: int = 8, batch_size: int = 16, size: int = 4, *, mean: float = 0.0, std: float = 1.0, seed=0):
    """(input, target) batches of (batch_size, 3, size, size) images; ``batch_size`` may be a list, one per batch."""
    g = torch.Generator().manual_seed(seed)
    sizes = batch_size if isinstance(batch_size, list) else [batch_size] * batches
    return [
        (torch.randn(n, 3, size, size, generator=g) * std + mean, torch.randint(0, 4, (n,), generator=g)) for n in sizes
    ]


def vectors(batches: int = 8, batch_size: int = 64, features: int = 6, seed: int = 0):
    """Plain (batch_size, features) tensors (no targets)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, features, generator=g) for _ in range(batches)]


def calibrated(model: nn.Module, data) -> nn.Module:
    """``model`` with precise running statistics on ``data`` (recalibrate_bn), in eval mode."""
    model.eval()
    recalibrate_bn(model, data, len(data))
    return model


def make_model() -> nn.Module:
    """The CLI's MODEL factory: a ConvNet with precise statistics on :func:`make_data`."""
    torch.manual_seed(0)
    return calibrated(ConvNet(), make_data())


CLEAN_BATCH_SIZE = 32


def make_data():
    """The CLI's --data function."""
    return images(batch_size=CLEAN_BATCH_SIZE)
