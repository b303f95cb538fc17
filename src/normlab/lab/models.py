"""The lab's models, each with its normalization chosen by a normlab factory spec string.

=========================  =====================================================================================
:class:`SmallResNet`       a CIFAR-style ResNet for 28x28 images (Fashion-MNIST): 3 stages of basic blocks
:class:`SmallCNN`          a plain conv-norm-act CNN with max pooling for 28x28 images (the CPU-scale study model)
:class:`CNN1d`             conv-norm-act layers for 1-D signals (MNIST-1D, (N, 1, 40))
:class:`MLP`               linear-norm-act layers for feature vectors (synthetic streams)
:class:`SequenceClassifier` NormLSTM / NormGRU + a linear head on the last step (sequence tasks)
:func:`build_model`        the model of a lab task by name ("fashion", "mnist1d", "mnist1d-seq", ...)
=========================  =====================================================================================

How a spec string becomes layers (the convolutional models and the MLP):

* ``"X+ws"`` builds the convolutions as :class:`normlab.StdConv2d` (weight standardization, Qiao et al. 2019,
  arXiv 1903.10520) and the norm from ``"X"``: ``"gn+ws"`` is GroupNorm + WS as in BiT. ``conv_layer=`` overrides
  the convolution class of any spec.
* Plain ``"gn"`` and ``"evo_s0"`` (no ``:`` argument) take ``min(32, C // 2)`` groups rounded down to a divisor of C:
  the Group Normalization paper's 32 groups wherever C >= 64 (as in every layer of its ResNets), and at least 2
  channels per group on the lab's narrower layers (16 -> 8 groups, 32 -> 16), so that GN never silently becomes
  InstanceNorm. An explicit ``"gn:8"`` or ``"gn:gs4"`` is used as given.
* Norms that carry their own nonlinearity replace norm + ReLU, as in their papers and timm: ``"frn"`` (FRN + TLU,
  Singh & Krishnan 2020, arXiv 1911.09737) and ``"evo_s0"`` / ``"evo_b0"`` (Liu et al. 2020, arXiv 2004.02967).
  Where no activation follows (the last norm of a residual branch, the shortcut), they are built without it
  (``tlu=False`` / ``nonlinearity=False``).
* Convolutions and linear layers followed by a norm have no bias (the norm's shift replaces it); with ``"none"`` they
  keep it.
* :class:`CNN1d` runs its 1-D convolutions as (1, k) 2-D convolutions over (N, C, 1, L), and :class:`MLP` applies
  its norms to (N, F, 1, 1) views, so every 2-D norm spec (and StdConv2d) applies unchanged. BatchNorm2d over
  (N, F, 1, 1) is BatchNorm1d over (N, F).

The recurrent models take the norm names of :class:`normlab.NormLSTM` (``"none"``, ``"ln"``, ``"bn_step"``,
``"bn_shared"``, ``"online"``) plus ``"vertical_bn"``: no norm inside the recurrence and BatchNorm1d on the vertical
connections between stacked layers (``norm_between_layers="bn1d"``, in the spirit of Laurent et al. 2016, "Batch
Normalized Recurrent Neural Networks", arXiv 1510.01378). :func:`build_model` gives sequence tasks 2 stacked layers
by default so that every norm, ``"vertical_bn"`` included, is compared on the same network.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..factory import get_norm_layer
from ..functional._checks import check_positive_int, unknown_name_error
from ..layers.batch_norm import BatchNorm2d
from ..layers.evonorm import EvoNorm2dB0, EvoNorm2dS0
from ..layers.filter_response_norm import FilterResponseNorm2d
from ..layers.group_norm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from ..layers.norm_act import BatchNormAct2d, GroupNormAct
from ..layers.rnn import NORMS as RNN_NORMS
from ..layers.rnn import NormGRU, NormLSTM
from ..layers.weight_standardization import StdConv2d

__all__ = [
    "TASKS",
    "SEQUENCE_NORMS",
    "SmallResNet",
    "SmallCNN",
    "CNN1d",
    "MLP",
    "SequenceClassifier",
    "build_model",
    "check_norm",
    "default_num_groups",
]

TASKS = ("fashion", "fashion-cnn", "mnist1d", "mnist1d-seq", "fashion-seq", "stream-mlp")
SEQUENCE_NORMS = (*RNN_NORMS, "vertical_bn")
_SEQUENCE_TASKS = ("mnist1d-seq", "fashion-seq")

_WS_SUFFIX = "+ws"
_GROUPED = (GroupNorm, EvoNorm2dS0)
_FUSED_ACT = {BatchNorm2d: BatchNormAct2d, GroupNorm: GroupNormAct}


def default_num_groups(num_channels: int, max_groups: int = 32) -> int:
    """Groups for a plain ``"gn"`` / ``"evo_s0"``: the largest divisor of C that is <= min(32, C // 2).

    Example:
        >>> from normlab.lab.models import default_num_groups
        >>> [default_num_groups(c) for c in (16, 32, 64, 256, 40)]
        [8, 16, 32, 32, 20]
    """
    limit = max(1, min(max_groups, num_channels // 2))
    return next(g for g in range(limit, 0, -1) if num_channels % g == 0)


class _NormSpec:
    """What one spec string builds: norm modules (with or without their activation) and the convolution class."""

    def __init__(self, owner: str, spec, conv_layer: Callable | None, *, fuse_act: bool = False) -> None:
        base = spec
        ws = isinstance(spec, str) and spec.strip().lower().endswith(_WS_SUFFIX)
        if ws:
            base = spec.strip()[: -len(_WS_SUFFIX)]
        try:
            self.factory = get_norm_layer(base)
        except ValueError as e:
            raise ValueError(f"{owner}: norm={spec!r}: {e}") from None
        self.spec = spec
        self.conv = conv_layer if conv_layer is not None else (StdConv2d if ws else nn.Conv2d)
        cls = self.factory.build
        self._cls = cls if inspect.isclass(cls) else None
        self.is_identity = self._cls is nn.Identity
        # normlab's BatchNorm2d / GroupNorm (exactly those: not Batch Renorm, Ghost BN, ...) can apply the ReLU in
        # their normalizing pass (BatchNormAct2d / GroupNormAct): the same result, one pass less on the fused path
        self.fused_act = _FUSED_ACT.get(self._cls) if fuse_act else None

    def _is(self, *classes) -> bool:
        return self._cls is not None and issubclass(self._cls, classes)

    def norm(self, num_features: int, *, act: bool) -> nn.Module:
        """The norm of ``num_features`` channels; ``act`` says whether an activation follows it."""
        kwargs = {}
        defaults = self.factory.defaults
        if self._is(*_GROUPED) and "num_groups" not in defaults and "group_size" not in defaults:
            kwargs["num_groups"] = default_num_groups(num_features)
        if self._is(FilterResponseNorm2d):
            kwargs["tlu"] = act
        if self._is(EvoNorm2dS0, EvoNorm2dB0):
            kwargs["nonlinearity"] = act
        if act and self.fused_act is not None:
            return self.fused_act(num_features, act="relu", **{**self.factory.defaults, **kwargs})
        return self.factory(num_features, **kwargs)

    def act(self) -> nn.Module:
        """The activation after a norm built with ``act=True`` (Identity where the norm applies its own)."""
        if self.fused_act is not None or self._is(FilterResponseNorm2d, EvoNorm2dS0, EvoNorm2dB0):
            return nn.Identity()
        return nn.ReLU(inplace=True)

    def norm_act(self, num_features: int) -> nn.Sequential:
        return nn.Sequential(self.norm(num_features, act=True), self.act())

    def conv2d(self, cin: int, cout: int, kernel_size, *, stride=1, padding=0) -> nn.Module:
        return self.conv(cin, cout, kernel_size, stride=stride, padding=padding, bias=self.is_identity)


def _check_sizes(owner: str, name: str, values, length: int | None = None) -> tuple[int, ...]:
    values = tuple(values) if isinstance(values, Sequence) and not isinstance(values, str) else None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"{owner}: {name}={values!r} must be a non-empty sequence of positive integers")
    if length is not None and len(values) != length:
        raise ValueError(f"{owner}: {name}={values!r} must have {length} entries, one per stage")
    return values


def _check_channels(owner: str, x: torch.Tensor, dims: int, channels: int, layout: str) -> None:
    if x.dim() != dims or x.shape[1] != channels:
        raise ValueError(f"{owner}: expected input {layout} with {channels} channels, got shape {tuple(x.shape)}")


class _BasicBlock(nn.Module):
    """conv3x3-norm-act-conv3x3-norm, plus the (projected) shortcut, then act (He et al. 2016, ResNet v1)."""

    def __init__(self, spec: _NormSpec, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = spec.conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm1 = spec.norm(cout, act=True)
        self.act1 = spec.act()
        self.conv2 = spec.conv2d(cout, cout, 3, padding=1)
        self.norm2 = spec.norm(cout, act=False)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(spec.conv2d(cin, cout, 1, stride=stride), spec.norm(cout, act=False))
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet for 28x28 images: a 3x3 stem, stages of basic blocks at 28x28, 14x14, 7x7, global average
    pooling and a linear classifier (the CIFAR ResNets of He et al. 2016, arXiv 1512.03385, narrowed).

    Args:
        norm: a factory spec (``"bn"``, ``"gn"``, ``"gn+ws"``, ...; see the module docstring), a norm class or a
            :class:`normlab.NormLayerFactory`.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        widths: channels of each stage (the stem has ``widths[0]``).
        blocks: basic blocks per stage (same length as ``widths``); stage i > 0 starts with stride 2.
        conv_layer: the convolution class (default: nn.Conv2d, or StdConv2d for ``"X+ws"``).
        zero_init_residual: start each block's last norm with weight 0, so that blocks start as identities (Goyal
            et al. 2017), where the norm has a ``weight``.

    Shape:
        Input (N, in_channels, H, W) (any H, W >= 4; 28x28 for Fashion-MNIST), output (N, num_classes).

    Raises:
        ValueError: for an unknown norm (the message lists the valid ones), bad sizes, or input of the wrong shape.

    Example:
        >>> import torch
        >>> from normlab.lab.models import SmallResNet
        >>> model = SmallResNet("gn+ws")
        >>> tuple(model(torch.randn(2, 1, 28, 28)).shape)
        (2, 10)
    """

    def __init__(
        self,
        norm="bn",
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (1, 1, 1),
        conv_layer: Callable | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        check_positive_int(owner, "num_classes", num_classes)
        widths = _check_sizes(owner, "widths", widths)
        blocks = _check_sizes(owner, "blocks", blocks, len(widths))
        spec = _NormSpec(owner, norm, conv_layer)
        self.norm = norm
        self.stem = nn.Sequential(spec.conv2d(in_channels, widths[0], 3, padding=1), spec.norm_act(widths[0]))
        stages, cin = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            layers = []
            for b in range(count):
                layers.append(_BasicBlock(spec, cin, width, stride=2 if i > 0 and b == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        if zero_init_residual:
            for block in self.modules():
                if isinstance(block, _BasicBlock) and getattr(block.norm2, "weight", None) is not None:
                    nn.init.zeros_(block.norm2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(type(self).__name__, x, 4, self.in_channels, "(N, C, H, W)")
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class SmallCNN(nn.Module):
    """A plain small CNN for 28x28 images: conv3x3-norm-act layers with 2x2 max pooling between them (28, 14, 7
    and 3 positions a side for four layers), global average pooling and a linear classifier.

    The CPU-scale model of the lab's batch-size study (the "small 4-layer CNN" of normlab's reference protocol):
    cheap enough per step to train every batch size from 2 to 32 to convergence on 20,000 images in minutes.

    Args:
        norm: a factory spec, as for :class:`SmallResNet`.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        widths: channels of each conv layer; a max pooling follows every layer but the last.
        conv_layer: the convolution class (default: nn.Conv2d, or StdConv2d for ``"X+ws"``).

    Shape:
        Input (N, in_channels, H, W) with H, W >= 2 ** (len(widths) - 1), output (N, num_classes).

    Raises:
        ValueError: for an unknown norm, bad sizes, or input of the wrong shape.

    Example:
        >>> import torch
        >>> from normlab.lab.models import SmallCNN
        >>> tuple(SmallCNN("gn+ws")(torch.randn(2, 1, 28, 28)).shape)
        (2, 10)
    """

    def __init__(
        self,
        norm="bn",
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64, 64),
        conv_layer: Callable | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        check_positive_int(owner, "num_classes", num_classes)
        widths = _check_sizes(owner, "widths", widths)
        spec = _NormSpec(owner, norm, conv_layer)
        self.norm = norm
        layers, cin = [], in_channels
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [spec.conv2d(cin, width, 3, padding=1), spec.norm_act(width)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(type(self).__name__, x, 4, self.in_channels, "(N, C, H, W)")
        return self.fc(self.pool(self.features(x)).flatten(1))


class CNN1d(nn.Module):
    """A 1-D CNN for MNIST-1D (Greydanus 2020, arXiv 2011.14439): conv-norm-act layers (the first at stride 1, the
    others at stride 2), then a linear classifier on the flattened features.

    The convolutions are (1, k) 2-D convolutions over the signal viewed as (N, C, 1, L), so that every 2-D norm
    spec and StdConv2d apply unchanged.

    Args:
        norm: a factory spec, as for :class:`SmallResNet`.
        num_classes: outputs of the classifier.
        in_channels: channels of the signal.
        length: signal length L (MNIST-1D: 40); fixes the classifier's input size.
        widths: channels of each conv layer.
        kernel_size: odd kernel width of every conv layer.
        conv_layer: the convolution class (default: nn.Conv2d, or StdConv2d for ``"X+ws"``).

    Shape:
        Input (N, in_channels, length), output (N, num_classes).

    Raises:
        ValueError: for an unknown norm, bad sizes, an even kernel_size, or input of the wrong shape.

    Example:
        >>> import torch
        >>> from normlab.lab.models import CNN1d
        >>> tuple(CNN1d("gn")(torch.randn(3, 1, 40)).shape)
        (3, 10)
    """

    def __init__(
        self,
        norm="bn",
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        length: int = 40,
        widths: Sequence[int] = (32, 32, 64),
        kernel_size: int = 5,
        conv_layer: Callable | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        self.length = check_positive_int(owner, "length", length)
        check_positive_int(owner, "num_classes", num_classes)
        check_positive_int(owner, "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size={kernel_size} must be odd (same padding)")
        widths = _check_sizes(owner, "widths", widths)
        spec = _NormSpec(owner, norm, conv_layer)
        self.norm = norm
        layers, cin, size = [], in_channels, length
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [
                spec.conv2d(cin, width, (1, kernel_size), stride=(1, stride), padding=(0, kernel_size // 2)),
                spec.norm_act(width),
            ]
            cin, size = width, (size - 1) // stride + 1
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = type(self).__name__
        _check_channels(owner, x, 3, self.in_channels, "(N, C, L)")
        if x.shape[2] != self.length:
            raise ValueError(f"{owner}: expected signals of length={self.length}, got shape {tuple(x.shape)}")
        return self.fc(self.features(x.unsqueeze(2)).flatten(1))


class _Norm2dOnVectors(nn.Module):
    """Applies a 2-D norm to (N, F) features viewed as (N, F, 1, 1)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, :, None, None]).flatten(1)


class MLP(nn.Module):
    """Linear-norm-act layers and a linear classifier, for feature vectors (the online-learning streams).

    Each norm sees the (N, F) activations as (N, F, 1, 1): ``"bn"`` is BatchNorm over the batch, ``"ln"`` LayerNorm
    over the F features, ``"gn"`` GroupNorm over groups of features, ``"online"`` OnlineNorm. ``"in"`` is refused:
    one value per sample and feature has no instance statistics.

    Args:
        norm: a factory spec, as for :class:`SmallResNet` (``"+ws"`` does not apply to linear layers).
        in_features: features of the input.
        hidden: width of each hidden layer.
        num_classes: outputs of the classifier.

    Shape:
        Input (N, in_features), output (N, num_classes).

    Raises:
        ValueError: for an unknown norm or ``"in"``, bad sizes, or input of the wrong shape.

    Example:
        >>> import torch
        >>> from normlab.lab.models import MLP
        >>> tuple(MLP("online", in_features=8)(torch.randn(1, 8)).shape)
        (1, 10)
    """

    def __init__(self, norm="bn", in_features: int = 32, hidden: Sequence[int] = (128, 128), *, num_classes: int = 10):
        super().__init__()
        owner = type(self).__name__
        self.in_features = check_positive_int(owner, "in_features", in_features)
        check_positive_int(owner, "num_classes", num_classes)
        hidden = _check_sizes(owner, "hidden", hidden)
        if isinstance(norm, str) and norm.strip().lower().endswith(_WS_SUFFIX):
            raise ValueError(f"{owner}: norm={norm!r}: weight standardization applies to convolutions, not to an MLP")
        spec = _NormSpec(owner, norm, None)
        if spec._is(InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, nn.modules.instancenorm._InstanceNorm):
            raise ValueError(
                f"{owner}: norm={norm!r}: InstanceNorm has one value per sample and feature in an MLP, so no "
                "statistics to normalize with; use 'ln' or 'gn'"
            )
        self.norm = norm
        layers, cin = [], in_features
        for width in hidden:
            layers += [
                nn.Linear(cin, width, bias=spec.is_identity),
                _Norm2dOnVectors(spec.norm(width, act=True)),
                spec.act(),
            ]
            cin = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(type(self).__name__, x, 2, self.in_features, "(N, F)")
        return self.fc(self.features(x))


_LAYOUTS = ("ntf", "ncl", "rows")


class SequenceClassifier(nn.Module):
    """A stacked NormLSTM / NormGRU and a linear classifier on the last layer's output at the last step.

    Args:
        kind: ``"lstm"`` (:class:`normlab.NormLSTM`) or ``"gru"`` (:class:`normlab.NormGRU`).
        norm: ``"none"``, ``"ln"``, ``"bn_step"``, ``"bn_shared"``, ``"online"`` (see :mod:`normlab.layers.rnn`),
            or ``"vertical_bn"``: ``"none"`` in the recurrence and ``norm_between_layers="bn1d"``.
        input_size: features per step.
        hidden_size: H.
        num_layers: stacked recurrent layers.
        num_classes: outputs of the classifier.
        norm_between_layers: a factory spec for a norm between stacked layers ("bn1d", "ln", ...; see
            :class:`normlab.NormLSTM`), or None. ``"vertical_bn"`` sets it to ``"bn1d"``.
        layout: how inputs become (N, T, input_size) sequences: ``"ntf"`` takes them as they are; ``"ncl"`` reads
            a channels-first signal (N, input_size, L) as L steps (MNIST-1D (N, 1, 40): 40 steps of 1 feature);
            ``"rows"`` reads images (N, C, H, W) row by row as H steps of C * W features (Fashion-MNIST: 28 steps
            of 28).
        max_steps: per-step statistics kept by ``"bn_step"`` (longer sequences reuse the last step's).

    Shape:
        Input as ``layout`` says, any number of steps T >= 1; output (N, num_classes).

    Raises:
        ValueError: for an unknown kind, norm or layout, ``"vertical_bn"`` with one layer, or input whose shape does
            not match the layout and input_size.

    Example:
        >>> import torch
        >>> from normlab.lab.models import SequenceClassifier
        >>> model = SequenceClassifier("gru", "ln", input_size=28, hidden_size=16, layout="rows")
        >>> tuple(model(torch.randn(2, 1, 28, 28)).shape)
        (2, 10)
    """

    def __init__(
        self,
        kind: str = "lstm",
        norm: str = "ln",
        input_size: int = 1,
        hidden_size: int = 64,
        *,
        num_layers: int = 1,
        num_classes: int = 10,
        norm_between_layers=None,
        layout: str = "ntf",
        max_steps: int = 100,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        rnn_classes = {"lstm": NormLSTM, "gru": NormGRU}
        if kind not in rnn_classes:
            raise ValueError(f"{owner}: {unknown_name_error('kind', str(kind), list(rnn_classes))} (got {kind!r})")
        if norm not in SEQUENCE_NORMS:
            raise ValueError(f"{owner}: {unknown_name_error('norm', str(norm), SEQUENCE_NORMS)} (got {norm!r})")
        if layout not in _LAYOUTS:
            raise ValueError(f"{owner}: {unknown_name_error('layout', str(layout), _LAYOUTS)} (got {layout!r})")
        check_positive_int(owner, "num_classes", num_classes)
        if norm == "vertical_bn":
            if num_layers < 2:
                raise ValueError(
                    f"{owner}: norm='vertical_bn' normalizes between stacked layers; num_layers={num_layers} must "
                    "be >= 2"
                )
            norm, norm_between_layers = "none", "bn1d"
        self.kind, self.layout, self.input_size = kind, layout, input_size
        self.rnn = rnn_classes[kind](
            input_size,
            hidden_size,
            num_layers,
            norm=norm,
            batch_first=True,
            norm_between_layers=norm_between_layers,
            max_steps=max_steps,
        )
        self.fc = nn.Linear(hidden_size, num_classes)

    def as_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (N, T, input_size) according to ``layout``."""
        if self.layout == "ncl" and x.dim() == 3 and x.shape[1] == self.input_size:
            return x.transpose(1, 2)
        if self.layout == "rows" and x.dim() == 4 and x.shape[1] * x.shape[3] == self.input_size:
            return x.permute(0, 2, 1, 3).flatten(2)
        if self.layout == "ntf" and x.dim() == 3 and x.shape[2] == self.input_size:
            return x
        expected = {"ntf": "(N, T, input_size)", "ncl": "(N, input_size, L)", "rows": "(N, C, H, W), C*W = input_size"}
        raise ValueError(
            f"{type(self).__name__}: layout={self.layout!r} expects input {expected[self.layout]} with "
            f"input_size={self.input_size}, got shape {tuple(x.shape)}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.as_sequence(x))
        return self.fc(out[:, -1])


def _task_models() -> dict[str, Callable[..., nn.Module]]:
    return {
        "fashion": lambda norm, **kw: SmallResNet(norm, **kw),
        "fashion-cnn": lambda norm, **kw: SmallCNN(norm, **kw),
        "mnist1d": lambda norm, **kw: CNN1d(norm, **kw),
        "mnist1d-seq": lambda norm, **kw: SequenceClassifier(
            kw.pop("kind", "lstm"), norm, **{"input_size": 1, "num_layers": 2, "layout": "ncl", **kw}
        ),
        "fashion-seq": lambda norm, **kw: SequenceClassifier(
            kw.pop("kind", "lstm"), norm, **{"input_size": 28, "num_layers": 2, "layout": "rows", **kw}
        ),
        "stream-mlp": lambda norm, **kw: MLP(norm, **kw),
    }


def _check_task(task) -> str:
    if task not in TASKS:
        raise ValueError(f"build_model: {unknown_name_error('task', str(task), TASKS)} (got {task!r})")
    return task


def check_norm(task: str, norm) -> None:
    """Raise ValueError unless ``norm`` names a norm that ``task``'s model takes (without building the model).

    Example:
        >>> from normlab.lab.models import check_norm
        >>> check_norm("fashion", "gn+ws")
        >>> check_norm("mnist1d-seq", "vertical_bn")
    """
    if _check_task(task) in _SEQUENCE_TASKS:
        if norm not in SEQUENCE_NORMS:
            raise ValueError(f"{task}: {unknown_name_error('norm', str(norm), SEQUENCE_NORMS)} (got {norm!r})")
        return
    base = norm[: -len(_WS_SUFFIX)] if isinstance(norm, str) and norm.strip().lower().endswith(_WS_SUFFIX) else norm
    try:
        get_norm_layer(base)
    except ValueError as e:
        raise ValueError(f"{task}: norm={norm!r}: {e}") from None


def build_model(task: str, norm, **kwargs) -> nn.Module:
    """The model of a lab task with ``norm``; ``kwargs`` go to the model's constructor.

    ===============  ===========================================================================================
    ``fashion``      :class:`SmallResNet` for (N, 1, 28, 28) Fashion-MNIST images
    ``fashion-cnn``  :class:`SmallCNN` for the same images
    ``mnist1d``      :class:`CNN1d` for (N, 1, 40) MNIST-1D signals
    ``mnist1d-seq``  :class:`SequenceClassifier` (``kind="lstm"`` unless given, 2 layers) on MNIST-1D as 40 steps
                     of 1 feature (layout ``"ncl"``: the (N, 1, 40) signals as they come)
    ``fashion-seq``  :class:`SequenceClassifier` (2 layers) on Fashion-MNIST row by row: 28 steps of 28 features
                     (layout ``"rows"``: the (N, 1, 28, 28) images as they come)
    ``stream-mlp``   :class:`MLP` for (N, in_features) stream samples; pass ``in_features`` of the stream
    ===============  ===========================================================================================

    Raises:
        ValueError: for an unknown task (the message lists the valid ones) or anything the model refuses.

    Example:
        >>> import torch
        >>> from normlab.lab.models import build_model
        >>> model = build_model("mnist1d-seq", "bn_step", hidden_size=8)
        >>> tuple(model(torch.randn(4, 1, 40)).shape)
        (4, 10)
    """
    return _task_models()[_check_task(task)](norm, **kwargs)


class _Bottleneck(nn.Module):
    """conv1x1-norm-act, conv3x3(stride)-norm-act, conv1x1(4x)-norm, plus the (projected) shortcut, then act: the
    bottleneck block of ResNet v1.5 (stride on the 3x3 convolution, as in torchvision)."""

    expansion = 4

    def __init__(self, spec: _NormSpec, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = spec.conv2d(cin, width, 1)
        self.norm1 = spec.norm(width, act=True)
        self.act1 = spec.act()
        self.conv2 = spec.conv2d(width, width, 3, stride=stride, padding=1)
        self.norm2 = spec.norm(width, act=True)
        self.act2 = spec.act()
        self.conv3 = spec.conv2d(width, cout, 1)
        self.norm3 = spec.norm(cout, act=False)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(spec.conv2d(cin, cout, 1, stride=stride), spec.norm(cout, act=False))
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.act2(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 for ImageNet-sized images (He et al. 2016, arXiv 1512.03385; v1.5 as in torchvision) with its norm
    chosen by a factory spec: a 7x7 stem, four stages of 3, 4, 6, 3 bottleneck blocks (widths 64 to 512, 4x
    expansion), global average pooling and a linear classifier.

    With ``norm="bn"`` (or torch.nn.BatchNorm2d) it has torchvision's ``resnet50()`` architecture and its 25,557,032
    parameters; convolutions use torchvision's initialization (Kaiming normal, fan-out). Used by
    ``normlab bench resnet50`` to time training steps without depending on torchvision.

    Args:
        norm: a factory spec, as for :class:`SmallResNet` (``"bn"``, ``"gn:32"``, ``"none"``, a class, or a callable
            ``f(num_features)``).
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        conv_layer: the convolution class (default: nn.Conv2d, or StdConv2d for ``"X+ws"``).
        fuse_act: where the norm is normlab's BatchNorm2d or GroupNorm, build each norm + ReLU pair as one
            :class:`normlab.BatchNormAct2d` / :class:`normlab.GroupNormAct` (the same outputs and state_dict; the
            Triton kernels then apply the ReLU in the normalizing pass). Other norms are unaffected.

    Shape:
        Input (N, in_channels, H, W) (224x224 for ImageNet; any H, W >= 32), output (N, num_classes).

    Raises:
        ValueError: for an unknown norm, bad sizes, or input of the wrong shape.

    Example:
        >>> import torch
        >>> from normlab.lab.models import ResNet50
        >>> model = ResNet50("gn:32", num_classes=10)
        >>> tuple(model(torch.randn(1, 3, 32, 32)).shape)
        (1, 10)
    """

    layers = (3, 4, 6, 3)
    widths = (64, 128, 256, 512)

    def __init__(
        self,
        norm="bn",
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        conv_layer: Callable | None = None,
        fuse_act: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        check_positive_int(owner, "num_classes", num_classes)
        spec = _NormSpec(owner, norm, conv_layer, fuse_act=fuse_act)
        self.norm = norm
        self.stem = nn.Sequential(
            spec.conv2d(in_channels, 64, 7, stride=2, padding=3),
            spec.norm_act(64),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages, cin = [], 64
        for i, (width, count) in enumerate(zip(self.widths, self.layers)):
            blocks = []
            for b in range(count):
                blocks.append(_Bottleneck(spec, cin, width, stride=2 if i > 0 and b == 0 else 1))
                cin = width * _Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(type(self).__name__, x, 4, self.in_channels, "(N, C, H, W)")
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))
