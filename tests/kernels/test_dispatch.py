"""The dispatch (normlab.kernels): backend choice, the environment variable, and every factory layer through the
Triton kernels (CPU tensors run through Triton's interpreter here; conftest.py sets TRITON_INTERPRET=1)."""

import collections
import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normlab
from normlab import functional, kernels
from normlab.kernels import native
from tests.helpers import run
from tests.layers.test_all_layers import SPECS, input_for, make, randomize
from tests.tolerances import assert_close

triton_ops = pytest.importorskip("normlab.kernels.triton_ops")


def test_backends_resolve_to_their_implementations():
    x = torch.randn(2, 4, 3, 3)
    assert kernels.resolve("group_norm", x, "reference") is functional.group_norm
    assert kernels.resolve("group_norm", x, "native") is native.group_norm
    assert kernels.resolve("group_norm", x, "triton") is triton_ops.group_norm
    assert kernels.resolve("group_norm", x, "auto") is native.group_norm  # CPU input: no kernel under auto
    assert kernels.resolve("evonorm_b0", x, "auto") is functional.evonorm_b0  # no native version
    # an op without a kernel runs as under auto when triton is forced
    assert kernels.resolve("batch_renorm", x, "triton") is functional.batch_renorm
    with pytest.raises(ValueError, match="unknown backend .*'tritn'.*Did you mean 'triton'"):
        kernels.resolve("group_norm", x, "tritn")


def test_every_op_with_a_kernel_is_a_functional_op_with_the_same_parameters():
    import inspect

    assert set(triton_ops.FUSES_ACT) < set(triton_ops.OPS)
    assert set(triton_ops.FUSES_NAN_GUARD) < set(triton_ops.OPS)
    for op in triton_ops.OPS:
        ref = inspect.signature(getattr(functional, op)).parameters
        ours = inspect.signature(getattr(triton_ops, op)).parameters
        assert list(ref) == [p for p in ours if p not in ("act", "nan_guard")], op
        assert ("act" in ours) == (op in triton_ops.FUSES_ACT), op
        assert ("nan_guard" in ours) == (op in triton_ops.FUSES_NAN_GUARD), op


class FakeCuda(torch.Tensor):
    """A CPU tensor that the dispatch takes for a CUDA one."""

    @property
    def is_cuda(self):
        return True


def test_auto_takes_the_kernel_for_cuda_inputs_unless_torch_was_measured_faster(monkeypatch):
    x = torch.randn(2, 4, 3, 3).as_subclass(FakeCuda)
    monkeypatch.setattr(triton_ops, "SLOWER_THAN_TORCH", {})
    monkeypatch.setattr(triton_ops, "SLOWER_THAN_TORCH_EAGER", {})
    assert kernels.resolve("group_norm", x, "auto") is triton_ops.group_norm
    monkeypatch.setitem(triton_ops.SLOWER_THAN_TORCH, "group_norm", lambda t: t.shape[0] < 4)
    assert kernels.resolve("group_norm", x, "auto") is native.group_norm
    assert kernels.resolve("group_norm", torch.randn(8, 4, 3, 3).as_subclass(FakeCuda), "auto") is (
        triton_ops.group_norm
    )
    assert kernels.resolve("group_norm", x, "triton") is triton_ops.group_norm  # forcing ignores the table


def test_auto_gpu_routes_by_the_gpu_time_table_alone(monkeypatch):
    x = torch.randn(2, 4, 3, 3).as_subclass(FakeCuda)
    monkeypatch.setattr(triton_ops, "SLOWER_THAN_TORCH", {})
    monkeypatch.setattr(triton_ops, "SLOWER_THAN_TORCH_EAGER", {"group_norm": lambda t: True})
    assert kernels.resolve("group_norm", x, "auto") is native.group_norm  # the eager table
    assert kernels.resolve("group_norm", x, "auto-gpu") is triton_ops.group_norm  # ignored
    monkeypatch.setitem(triton_ops.SLOWER_THAN_TORCH, "group_norm", lambda t: True)
    assert kernels.resolve("group_norm", x, "auto-gpu") is native.group_norm  # the GPU-time table applies
    assert kernels.resolve("group_norm", torch.randn(2, 4, 3, 3), "auto-gpu") is native.group_norm  # CPU: torch's
    with kernels.use_backend("auto-gpu"):
        assert kernels.get_backend() == "auto-gpu"


def test_compiling_hands_inductor_plain_ops_unless_triton_is_forced(monkeypatch):
    """Under torch.compile, auto and auto-gpu resolve to torch's op (else the reference) even where they would run a
    kernel eagerly; forcing triton still compiles the kernels in."""
    x = torch.randn(2, 4, 3, 3).as_subclass(FakeCuda)
    monkeypatch.setattr(triton_ops, "SLOWER_THAN_TORCH", {})
    monkeypatch.setattr(triton_ops, "SLOWER_THAN_TORCH_EAGER", {})
    for op in triton_ops.OPS:
        assert kernels.resolve(op, x, "auto") is getattr(triton_ops, op), op  # eager: the kernel
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for op in triton_ops.OPS:
        plain = getattr(native, op, getattr(functional, op))
        assert kernels.resolve(op, x, "auto") is plain, op
        assert kernels.resolve(op, x, "auto-gpu") is plain, op
        assert kernels.resolve(op, x, "triton") is getattr(triton_ops, op), op


def _aten_ops(module, x) -> list[collections.Counter]:
    """The aten ops (with multiplicity) of the forward and the backward graph torch.compile's AOTAutograd hands to
    its compiler for a training step of ``module`` at ``x``."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, _inputs):
        graphs.append(collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True)
    compiled(x.clone().requires_grad_()).sum().backward()
    return graphs


@pytest.mark.parametrize("pair", [
    (lambda: torch.nn.GroupNorm(4, 16), lambda: normlab.GroupNorm(16, num_groups=4)),
    (lambda: torch.nn.GroupNorm(1, 16), lambda: normlab.LayerNorm(16)),
    (lambda: torch.nn.InstanceNorm2d(16, affine=True), lambda: normlab.InstanceNorm2d(16, affine=True)),
    (lambda: torch.nn.BatchNorm2d(16), lambda: normlab.BatchNorm2d(16, nan_guard=False)),
    # the norm + ReLU modules of `bench resnet50`
    (
        lambda: torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.ReLU()),
        lambda: normlab.GroupNormAct(16, num_groups=4, act="relu"),
    ),
    (
        lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(16), torch.nn.ReLU()),
        lambda: normlab.BatchNormAct2d(16, act="relu", nan_guard=False),
    ),
], ids=["group_norm", "layer_norm", "instance_norm", "batch_norm", "group_norm_act", "batch_norm_act"])  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_compiled_layers_trace_to_the_graph_of_torchs_own(pair, channels_last, autocast):
    """What Inductor receives for a normlab layer under auto is what it receives for torch's layer: the same aten
    ops, forward and backward (so the compiled model cannot be slower for the norm's sake), in both layouts and under
    autocast, as `bench resnet50` compiles them (GroupNorm's copy of channels-last input to a contiguous layout and
    back added two clones to the forward and one to the backward)."""
    make_torch, make_normlab = pair
    x = torch.randn(4, 16, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with kernels.use_backend("auto"), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        assert _aten_ops(make_normlab(), x) == _aten_ops(make_torch(), x)


def test_compiled_batch_norm_nan_guard_adds_only_its_commit():
    """With its NaN guard (the default), normlab's BatchNorm2d compiles to torch's graph plus the guard's commit:
    ops on per-channel tensors (a finiteness test and selects), no second normalization."""
    x = torch.randn(4, 16, 6, 6)
    theirs = _aten_ops(torch.nn.BatchNorm2d(16), x)
    ours = _aten_ops(normlab.BatchNorm2d(16), x)
    assert ours[1] == theirs[1]  # the same backward
    extra = ours[0] - theirs[0]
    assert not theirs[0] - ours[0]
    assert "aten.where.self" in extra and not any("batch_norm" in op or "convolution" in op for op in extra)


@pytest.mark.parametrize(
    "op,shape,dtype,channels_last,torch_wins",
    [
        ("group_norm", (32, 256, 56, 56), torch.bfloat16, True, False),  # the target shape: the kernel
        ("group_norm", (32, 64, 112, 112), torch.bfloat16, True, False),  # 2 channels per group, channels-last
        ("group_norm", (32, 64, 112, 112), torch.bfloat16, False, False),
        ("group_norm", (2, 64, 8, 8), torch.bfloat16, False, True),  # tiny: the host cost decides
        ("batch_norm", (32, 256, 56, 56), torch.bfloat16, True, False),
        ("batch_norm", (2, 256, 56, 56), torch.float32, False, True),
        ("batch_norm", (2, 256, 56, 56), torch.bfloat16, False, False),
        ("layer_norm", (16384, 1024), torch.bfloat16, False, False),  # transformer rows: the channel-norm kernel
        ("rms_norm", (16384, 1024), torch.float32, False, False),
        ("layer_norm", (64, 1024), torch.bfloat16, False, True),  # tiny
        ("batch_norm", (32, 64, 112, 112), torch.float32, True, False),  # 0.98x: within noise, large
        ("batch_norm", (2, 256, 56, 56), torch.float32, True, True),
        ("batch_norm", (32, 64, 112, 112), torch.float32, False, False),
        ("instance_norm", (32, 256, 56, 56), torch.bfloat16, True, False),
        ("instance_norm", (2, 256, 56, 56), torch.bfloat16, True, True),
        ("instance_norm", (2, 256, 56, 56), torch.float32, True, False),
        ("instance_norm", (32, 64, 112, 112), torch.float32, False, True),
        ("instance_norm", (32, 256, 56, 56), torch.float32, False, False),
        ("filter_response_norm", (2, 64, 8, 8), torch.float32, False, False),  # torch has no FRN
        ("evonorm_s0", (2, 64, 8, 8), torch.float32, False, False),
    ],
)
def test_measured_gpu_time_routing_to_torch(op, shape, dtype, channels_last, torch_wins):
    """The cases where an H100 measured torch faster in GPU time (SLOWER_THAN_TORCH) go to torch; the issue's shapes
    keep the kernels."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert triton_ops.prefers_torch(op, x, wall_time=False) == torch_wins


GPU_RESULTS = (
    Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu-h100-2026-11-26-run4" / "kernels.csv"
)
BENCH_OPS = {
    "gn": "group_norm", "in": "instance_norm", "bn": "batch_norm", "ln2d": "layer_norm2d", "rms2d": "rms_norm2d",
    "frn": "filter_response_norm", "evo_s0": "evonorm_s0", "ln": "layer_norm", "rms": "rms_norm",
}  # fmt: skip


BENCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _measured_cases():
    with GPU_RESULTS.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["pass"] == "fwd+bwd"]
    for r in rows:
        x = torch.empty([int(v) for v in r["shape"].split("x")], dtype=BENCH_DTYPES[r["dtype"]], device="meta")
        if r["layout"] == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        yield r, BENCH_OPS[r["op"]], x


def test_gpu_time_table_agrees_with_the_committed_h100_measurements():
    """Against benchmarks/results/gpu-h100-2026-11-26-run4/kernels.csv (CUDA-graph replays): every case where the
    kernel measured more than 3% slower than torch goes to torch under the GPU-time table, and no case where it
    measured more than 3% faster does. FRN and EvoNorm-S0, which torch lacks, always keep their kernels."""
    for row, op, x in _measured_cases():
        speedup, to_torch = float(row["graph_speedup_vs_eager"]), triton_ops.prefers_torch(op, x, wall_time=False)
        case = (op, row["shape"], row["dtype"], row["layout"], speedup)
        if op in ("filter_response_norm", "evonorm_s0"):
            assert not to_torch, case
        elif speedup < 0.97:
            assert to_torch, case
        elif speedup > 1.03:
            assert not to_torch, case


def test_eager_routing_agrees_with_the_committed_h100_measurements():
    """``auto`` in eager calls (prefers_torch) against the same measurements: a kernel that saves more than
    EAGER_GPU_SAVING_MS of GPU time per forward+backward (plus a third for the measurement's spread) runs, one that
    saves less than two thirds of it goes to torch; the band between is left to the table."""
    threshold = triton_ops.EAGER_GPU_SAVING_MS
    decided = 0
    for row, op, x in _measured_cases():
        saved = float(row["eager_graph_ms"]) - float(row["normlab_graph_ms"])
        to_torch = triton_ops.prefers_torch(op, x)
        case = (op, row["shape"], row["dtype"], row["layout"], f"saved {saved:.3f} ms")
        if op in ("filter_response_norm", "evonorm_s0"):
            assert not to_torch, case
        elif saved < threshold * 2 / 3:
            assert to_torch, case
        elif saved > threshold * 4 / 3:
            assert not to_torch, case
        else:
            continue
        decided += 1
    assert decided >= 70  # of the 88 measured cases


def test_environment_variable_sets_the_default_backend():
    code = (
        "import normlab.kernels as k, torch; "
        "print(k.get_backend(), k.resolve('layer_norm2d', torch.zeros(1, 2)).__module__)"
    )
    env = {**os.environ, "NORMLAB_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["triton", "normlab.kernels.channel_norm"]
    env["NORMLAB_BACKEND"] = "fast"
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stderr
    assert "unknown backend (NORMLAB_BACKEND / set_backend) 'fast'" in err


def test_forcing_triton_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_ops", False)
    monkeypatch.setattr(kernels, "_triton_error", "Triton is not installed (pip install triton)")
    with pytest.raises(RuntimeError, match="backend='triton' for 'group_norm': Triton is not installed"):
        kernels.resolve("group_norm", torch.randn(2, 4, 3), "triton")
    assert kernels.resolve("group_norm", torch.randn(2, 4, 3), "auto") is native.group_norm


def _layer_step(module, x, backend):
    with kernels.use_backend(backend):
        out = run(module, x)
    return out + [b.clone() for b in module.buffers() if b.is_floating_point()]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("training", [True, False])
def test_every_factory_layer_under_the_triton_backend_matches_the_reference(spec, training):
    layer = randomize(make(spec)).train(training)
    ref = copy.deepcopy(layer)
    x = input_for(layer)
    if spec in ("online", "online1d", "mabn"):
        x = x[:2]  # their scans are slow through the interpreter and have no kernel anyway
    for layout in (torch.contiguous_format, torch.channels_last):
        xs = x.contiguous(memory_format=layout) if x.dim() == 4 else x
        assert_close_all(_layer_step(layer, xs, "triton"), _layer_step(ref, xs, "reference"), spec)


def assert_close_all(actual, expected, spec):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, scale=10, msg=spec)


@pytest.mark.parametrize("module", [
    lambda: normlab.GroupNorm(8, num_groups=4),
    lambda: normlab.BatchNorm2d(8),
    lambda: normlab.LayerNorm2d(8),
    lambda: normlab.BatchNormAct2d(8, act="silu"),
])  # fmt: skip
def test_layers_on_the_triton_backend_compile_without_graph_breaks(module):
    layer = randomize(module())
    ref = copy.deepcopy(layer)
    x = torch.randn(4, 8, 3, 5)
    torch._dynamo.reset()
    with kernels.use_backend("triton"):
        compiled = torch.compile(layer, fullgraph=True)
        got = run(compiled, x) + [b.clone() for b in layer.buffers() if b.is_floating_point()]
        explained = torch._dynamo.explain(copy.deepcopy(ref))(x)
    assert explained.graph_break_count == 0
    with kernels.use_backend("reference"):
        expected = run(ref, x) + [b.clone() for b in ref.buffers() if b.is_floating_point()]
    assert_close_all(got, expected, type(layer).__name__)


def test_compiling_right_after_choosing_triton_does_not_meet_an_import_in_traced_code():
    # a fresh interpreter, where nothing has loaded the kernels yet: set_backend("triton") loads them
    code = (
        "import torch, normlab\n"
        "normlab.kernels.set_backend('triton')\n"
        "m = torch.compile(normlab.GroupNorm(8, num_groups=2), fullgraph=True)\n"
        "print(tuple(m(torch.randn(2, 8, 3, 3)).shape))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "NORMLAB_BACKEND": "auto"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(2, 8, 3, 3)"
