"""The shared test model zoo for surgery and doctor tests: tiny models with the norm layouts found in the wild.

Every builder takes ``norm_layer`` (a callable ``C -> module``, default torch.nn.BatchNorm of the model's rank) and
builds in well under a millisecond; :data:`ZOO` maps a name to ``(builder, input shape)``, and :func:`example_input`
makes a matching batch. :func:`randomize_batch_norms` gives every batch norm non-trivial statistics and affine, so
that surgery mistakes (a wrong axis, a lost gamma) change the output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: conv3x3-bn-relu-conv3x3-bn plus an identity or conv1x1-bn downsample branch."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """Stem conv-bn-relu, a BasicBlock of 8 channels and a strided one to 16 (with downsample), pool, fc."""

    def __init__(self, norm_layer: NormLayer = nn.BatchNorm2d, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1, norm_layer))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, norm_layer))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int, groups: int, norm_layer: NormLayer, act: bool = True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), norm_layer(cout)]
    return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise conv, linear 1x1 projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm_layer: NormLayer) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = [_conv_bn_act(cin, hidden, 1, 1, 1, norm_layer)] if expand != 1 else []
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, hidden, norm_layer),
            _conv_bn_act(hidden, cout, 1, 1, 1, norm_layer, act=False),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class TinyMobileNetV2(nn.Module):
    def __init__(self, norm_layer: NormLayer = nn.BatchNorm2d, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_act(3, 8, 3, 2, 1, norm_layer),
            InvertedResidual(8, 8, 1, 1, norm_layer),
            InvertedResidual(8, 16, 2, 2, norm_layer),
            InvertedResidual(16, 16, 1, 2, norm_layer),
            _conv_bn_act(16, 32, 1, 1, 1, norm_layer),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def resnet_tiny(norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Module:
    return TinyResNet(norm_layer)


def mobilenet_v2_tiny(norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Module:
    return TinyMobileNetV2(norm_layer)


def conv_bn_relu(norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Module:
    """A plain nn.Sequential: conv (with bias)-bn-relu-conv (without)-bn-relu."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        norm_layer(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        norm_layer(8),
        nn.ReLU(),
    )


def conv_transpose_bn(norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Module:
    """Transposed convs (grouped with bias, then plain without) each followed by a norm."""
    return nn.Sequential(
        nn.ConvTranspose2d(4, 8, 3, stride=2, groups=2),
        norm_layer(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False),
        norm_layer(4),
    )


def mlp_bn(norm_layer: NormLayer = nn.BatchNorm1d) -> nn.Module:
    """Linear-BatchNorm1d-ReLU-Linear (no bias)-BatchNorm1d on (N, C) features."""
    return nn.Sequential(nn.Linear(6, 8), norm_layer(8), nn.ReLU(), nn.Linear(8, 8, bias=False), norm_layer(8))


def conv1d_bn(norm_layer: NormLayer = nn.BatchNorm1d) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), norm_layer(8), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=2), norm_layer(8)
    )


def conv3d_bn(norm_layer: NormLayer = nn.BatchNorm3d) -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), norm_layer(4), nn.ReLU(), nn.Conv3d(4, 4, 1, bias=False), norm_layer(4)
    )


class Untraceable(nn.Module):
    """Python control flow on the input's rank (torch.fx cannot trace it): a conv-bn-relu nn.Sequential ``body``,
    then a conv and a norm called directly (``tail_conv``, ``tail_bn``), not inside a Sequential."""

    def __init__(self, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.body = conv_bn_relu(norm_layer)
        self.tail_conv = nn.Conv2d(8, 4, 1)
        self.tail_bn = norm_layer(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input, got {x.dim()}D")
        return self.tail_bn(self.tail_conv(self.body(x)))


def untraceable(norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Module:
    return Untraceable(norm_layer)


class FrozenBatchNorm2d(nn.Module):
    """The layout of torchvision.ops.FrozenBatchNorm2d (torchvision is not a dependency): four buffers and ``eps``,
    no ``num_features`` attribute; timm's and detectron2's look the same to normlab."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


# name -> (builder, input shape); the builders' default norm_layer is torch.nn.BatchNorm of the input's rank
ZOO: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "resnet": (resnet_tiny, (2, 3, 12, 12)),
    "mobilenet_v2": (mobilenet_v2_tiny, (2, 3, 12, 12)),
    "conv_bn_relu": (conv_bn_relu, (2, 3, 7, 7)),
    "conv_transpose": (conv_transpose_bn, (2, 4, 5, 5)),
    "mlp": (mlp_bn, (5, 6)),
    "conv1d": (conv1d_bn, (2, 3, 11)),
    "conv3d": (conv3d_bn, (2, 2, 3, 4, 4)),
    "untraceable": (untraceable, (2, 3, 7, 7)),
}


def build(name: str, norm_layer: NormLayer | None = None) -> nn.Module:
    """The zoo model ``name`` with ``norm_layer`` (default: the builder's torch.nn.BatchNorm)."""
    builder, _ = ZOO[name]
    return builder() if norm_layer is None else builder(norm_layer)


def example_input(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A reproducible standard-normal batch of the zoo model ``name``'s input shape."""
    return torch.randn(ZOO[name][1], generator=torch.Generator().manual_seed(seed), dtype=dtype)


@torch.no_grad()
def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every module with running statistics non-trivial ones (mean in [-1, 1], var in [0.5, 2], 3 batches
    tracked) and every such module's weight/bias (parameters or buffers) values in [0.5, 1.5] / [-0.5, 0.5]."""
    g = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor | None, low: float, high: float) -> None:
        if t is not None:
            t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (high - low) + low)

    for module in model.modules():
        if getattr(module, "running_mean", None) is None:
            continue
        fill(module.running_mean, -1.0, 1.0)
        fill(module.running_var, 0.5, 2.0)
        fill(getattr(module, "weight", None), 0.5, 1.5)
        fill(getattr(module, "bias", None), -0.5, 0.5)
        if getattr(module, "num_batches_tracked", None) is not None:
            module.num_batches_tracked.fill_(3)
    return model
