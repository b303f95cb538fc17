"""The batch-norm layers' NaN guard fused into the Triton kernels (``batch_norm(..., nan_guard=(tracked, nonfinite))``).

On the Triton path the layer hands the kernel its counters instead of cloning the buffers and committing with
torch.where: the guarded update must commit exactly what the unguarded path and the reference commit, skip and count
non-finite batches, warn once, work under torch.compile(fullgraph=True), and issue no op besides the kernel's.
"""

import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normlab
from normlab import kernels
from normlab.kernels import batch_norm as bnk
from normlab.layers.norm_act import BatchNormAct2d
from tests.helpers import in_format, randomize_weight_and_bias
from tests.tolerances import assert_close

LAYERS = {
    "1d": (lambda **kw: normlab.BatchNorm1d(5, **kw), (6, 5), False),
    "2d": (lambda **kw: normlab.BatchNorm2d(5, **kw), (3, 5, 3, 4), False),
    "2d-channels-last": (lambda **kw: normlab.BatchNorm2d(5, **kw), (3, 5, 3, 4), True),
    "3d": (lambda **kw: normlab.BatchNorm3d(5, **kw), (2, 5, 2, 2, 3), False),
    "act": (lambda **kw: BatchNormAct2d(5, act="silu", **kw), (3, 5, 3, 4), True),
}
# finite batches, NaN, +Inf and -Inf in one value, and finite values whose float32 variance overflows to Inf
SEQUENCE = ("finite", "nan", "finite", "inf", "overflow", "-inf", "finite")


@pytest.fixture
def triton_batch_norm(monkeypatch):
    """backend="triton" with only the batch-norm kernels (the other ops as under auto), loaded outside traced code."""
    monkeypatch.setattr(kernels, "_triton_impl", lambda op: getattr(bnk, op, None))
    with kernels.use_backend("triton"):
        assert kernels.fuses_nan_guard("batch_norm", torch.empty(2, 3))
        yield


def _batch(shape, kind: str, step: int, channels_last: bool = False, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64) * 2 + step
    first = (0,) * (len(shape) - 2)
    if kind in ("nan", "inf", "-inf"):
        x[(1, shape[1] - 1) + first] = float(kind)  # one value, in the last channel
    elif kind == "overflow":
        sign = (torch.arange(shape[0]) % 2 * 2 - 1).double().view((-1,) + (1,) * (len(shape) - 2))
        x[:, 0] = 1e20 * sign
    return in_format(x.to(dtype), channels_last)


def _state(bn):
    return [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.num_nonfinite_batches)]


def _assert_same_state(ours, ref):
    assert_close(ours.running_mean, ref.running_mean)
    assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    assert int(ours.num_nonfinite_batches) == int(ref.num_nonfinite_batches)


def _pair(make, **kw):
    ours, ref = make(**kw), make(**kw)
    randomize_weight_and_bias(ours)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_guarded_layer_commits_and_skips_like_the_reference(triton_batch_norm, layer, momentum):
    """Step by step over finite and non-finite batches: the same outputs, running statistics and counters as the
    same layer on the reference backend (which guards around the call); a skipped batch changes nothing."""
    ours = _run_sequence_against_the_reference(layer, momentum)
    assert int(ours.num_batches_tracked) == 3 and int(ours.num_nonfinite_batches) == 4


def _run_sequence_against_the_reference(layer: str, momentum, after_step=lambda ours: None):
    """Step ``LAYERS[layer]`` over :data:`SEQUENCE` (current backend) next to the same layer on the reference backend:
    the same outputs, running statistics and counters after every step, and a skipped batch changes nothing;
    ``after_step(ours)`` runs after each. Returns our layer."""
    make, shape, channels_last = LAYERS[layer]
    ours, ref = _pair(make, momentum=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step, kind in enumerate(SEQUENCE):
            x = _batch(shape, kind, step, channels_last)
            before = _state(ours)
            y = ours(x)
            with kernels.use_backend("reference"):
                expected = ref(x)
            if kind == "finite":
                assert_close(y, expected)
            else:
                assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
            _assert_same_state(ours, ref)
            after_step(ours)
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guarded_kernel_commits_bitwise_what_the_unguarded_kernel_writes(monkeypatch, dtype):
    """The commit loops over the channels in several blocks: a NaN in the first or the last block skips the whole
    update; a finite batch commits exactly the unguarded in-place update (also with bfloat16 buffers)."""
    monkeypatch.setattr(bnk, "_MAX_BLOCK_COMMIT", 4)
    c = 11
    assert bnk._commit_block(c) == 4
    mean, var = torch.randn(c).to(dtype), (torch.rand(c) + 0.5).to(dtype)
    tracked, nonfinite = torch.tensor(7), torch.tensor(2)
    for channel in (0, c - 1):
        x = torch.randn(3, c, 2, 3).to(dtype)
        x[1, channel, 1, 2] = float("nan")
        before = mean.clone(), var.clone()
        bnk.batch_norm(x, mean, var, training=True, momentum=0.3, nan_guard=(tracked, nonfinite))
        assert torch.equal(mean, before[0]) and torch.equal(var, before[1])
    assert int(tracked) == 7 and int(nonfinite) == 4
    x = torch.randn(3, c, 2, 3).to(dtype)
    unguarded = mean.clone(), var.clone()
    y_ref = bnk.batch_norm(x, *unguarded, training=True, momentum=0.3)
    y = bnk.batch_norm(x, mean, var, training=True, momentum=0.3, nan_guard=(tracked, nonfinite))
    assert torch.equal(y, y_ref)
    assert torch.equal(mean, unguarded[0]) and torch.equal(var, unguarded[1])
    assert not torch.equal(var, before[1])
    assert int(tracked) == 8 and int(nonfinite) == 4


def test_nonfinite_batch_warns_once(triton_batch_norm):
    bn = normlab.BatchNorm2d(3)
    bn(_batch((4, 3, 2, 2), "finite", 0))
    before = _state(bn)
    with pytest.warns(RuntimeWarning, match=r"BatchNorm2d\(3\): a training batch had non-finite statistics"):
        bn(_batch((4, 3, 2, 2), "nan", 1))
    with warnings.catch_warnings(record=True) as caught:  # (the interpreter's numpy warns about inf - inf)
        warnings.simplefilter("always")
        bn(_batch((4, 3, 2, 2), "inf", 2))
    assert not [w for w in caught if "non-finite statistics" in str(w.message)]
    assert all(torch.equal(a, b) for a, b in zip(_state(bn)[:3], before[:3], strict=True))
    assert int(bn.num_nonfinite_batches) == 2
    bn(_batch((4, 3, 2, 2), "finite", 3))
    assert int(bn.num_batches_tracked) == 2 and not torch.equal(bn.running_var, before[1])


class _RecordOps(TorchDispatchMode):
    """The ops dispatched at the top level (a custom op counts once, not the ops inside it)."""

    # views and the CPU warning check's read of num_nonfinite_batches (every 64 steps on accelerators)
    IGNORED = ("aten.select.", "aten.view.", "aten.detach.", "aten._local_scalar_dense.")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not str(func).startswith(self.IGNORED) and not _inside_triton_interpreter():
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _inside_triton_interpreter() -> bool:
    """Whether the op comes from Triton's interpreter running a kernel (its copies are a GPU kernel's loads and
    stores, not ops of normlab's)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/triton/runtime/interpreter" in name:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("layer", ["2d", "act"])
def test_guarded_step_runs_only_the_kernels(triton_batch_norm, layer):
    """No clone, sum, isfinite, where, copy_ or add_ around the kernels: the guard costs no launch of its own (the
    unguarded step adds num_batches_tracked += 1, the guard around the reference clones the buffers). In eager mode
    the kernels run without their custom op (see normlab.kernels._triton_utils.traced): torch sees only the
    allocations of their outputs and workspaces."""
    make, shape, channels_last = LAYERS[layer]
    x = _batch(shape, "finite", 0, channels_last)
    counted = {}
    for name, backend, guard in [("fused", "triton", True), ("off", "triton", False), ("ref", "reference", True)]:
        bn = make(nan_guard=guard)
        with kernels.use_backend(backend), _RecordOps() as record:
            bn(x)
        counted[name] = record.ops
    allocations = ("aten.empty.", "aten.empty_like.", "aten.empty_strided.")
    launched = {name: [op for op in ops if not op.startswith(allocations)] for name, ops in counted.items()}
    assert launched["fused"] == []
    assert launched["off"] == ["aten.add_.Tensor"]
    assert "aten.clone.default" in counted["ref"]


def test_compiled_fullgraph_matches_eager_and_fuses_the_guard(triton_batch_norm):
    """torch.compile(fullgraph=True) with Inductor: the forward graph is the one kernel op (no copies, no generated
    kernels), and the running statistics and counters follow the eager reference over finite and NaN batches."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    ours, ref = _pair(lambda: normlab.BatchNorm2d(4))
    compiled = torch.compile(ours, fullgraph=True)
    shape = (3, 4, 3, 3)
    for step, kind in enumerate(("finite", "nan", "finite", "inf")):
        x = _batch(shape, kind, step, channels_last=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if step == 0:
                y, codes = run_and_get_code(compiled, x)  # the forward's code (the backward compiles lazily)
                code = "\n".join(codes)
            else:
                y = compiled(x)
            with kernels.use_backend("reference"):
                expected = ref(x)
        if kind == "finite":
            assert_close(y, expected)
        _assert_same_state(ours, ref)
    assert int(ours.num_batches_tracked) == 2 and int(ours.num_nonfinite_batches) == 2
    assert code.count("torch.ops.normlab.batch_norm_train.default(") == 1
    for absent in ("copy_", "where", "clone", "async_compile.cpp", "async_compile.triton("):
        assert absent not in code, absent


def test_bad_nan_guard_raises():
    x, mean, var = torch.randn(2, 3, 4), torch.zeros(3), torch.ones(3)
    counters = (torch.tensor(0), torch.tensor(0))
    with pytest.raises(ValueError, match=r"nan_guard guards a training update .* training=False"):
        bnk.batch_norm(x, mean, var, training=False, nan_guard=counters)
    with pytest.raises(ValueError, match=r"nan_guard guards a training update .* running_mean None"):
        bnk.batch_norm(x, None, None, training=True, nan_guard=counters)
    with pytest.raises(ValueError, match=r"nan_guard's num_nonfinite_batches must be a 0-dim int64 .* torch.int32"):
        bnk.batch_norm(x, mean, var, training=True, nan_guard=(counters[0], torch.tensor(0, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"nan_guard's num_batches_tracked must be .* shape \(1,\)"):
        bnk.batch_norm(x, mean, var, training=True, nan_guard=(torch.zeros(1, dtype=torch.long), counters[1]))
    with pytest.raises(ValueError, match=r"nan_guard must be \(num_batches_tracked, num_nonfinite_batches\)"):
        bnk.batch_norm(x, mean, var, training=True, nan_guard=counters[0])
    with pytest.raises(ValueError, match="nan_guard cannot be combined with process_group"):
        bnk.batch_norm(x, mean, var, training=True, process_group=object(), nan_guard=counters)


@pytest.mark.gpu
def test_cuda_guarded_step_launches_only_the_three_kernels():
    """On an H100: a guarded training forward launches the stats, merge and normalize kernels and nothing else,
    commits like the reference, and skips and counts a NaN batch."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ours, ref = _pair(lambda: normlab.BatchNorm2d(256, device="cuda"))
    x = torch.randn(8, 256, 14, 14, device="cuda").to(memory_format=torch.channels_last)
    with kernels.use_backend("triton"):
        assert kernels.fuses_nan_guard("batch_norm", x)
        ours(x)  # compiles the kernels; the guard reads its counter on the first step
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ours(x)
            torch.cuda.synchronize()
    launched = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    assert len(launched) == 3 and any("_normalize_kernel" in name for name in launched), launched
    _assert_two_steps_then_a_skipped_nan_batch(ours, ref, x, "triton")


def _assert_two_steps_then_a_skipped_nan_batch(ours, ref, x, backend: str) -> None:
    """After two guarded steps of ``ours`` on ``backend`` at ``x``: the reference's state after the same two; then a
    batch with a NaN changes no statistic and is counted."""
    with kernels.use_backend("reference"):
        ref(x)
        ref(x)
    _assert_same_state(ours, ref)
    bad = x.clone()
    bad[0, 3, 0, 0] = float("nan")
    before = _state(ours)
    with kernels.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours(bad)
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    assert int(ours.num_batches_tracked) == 2 and int(ours.num_nonfinite_batches) == 1


def test_only_the_triton_batch_norm_fuses_the_guard():
    x = torch.randn(2, 3, 4)
    assert kernels.fuses_nan_guard("batch_norm", x, "triton")
    for op, backend in [("batch_norm", "reference"), ("batch_norm", "native"), ("batch_norm", "auto")]:
        assert not kernels.fuses_nan_guard(op, x, backend), (op, backend)  # CPU input: auto runs torch's op
    assert not kernels.fuses_nan_guard("frozen_batch_norm", x, "triton")
    bn = normlab.BatchNorm2d(3)
    with kernels.use_backend("triton"):
        assert bn._kernel_commits_guard(torch.randn(2, 3, 2, 2), None)
        assert not bn._kernel_commits_guard(torch.randn(2, 3, 2, 2), group=object())  # synced: the reference runs
        assert not normlab.GhostBatchNorm2d(3, virtual_batch_size=2)._kernel_commits_guard(x, None)


# ---- the standalone commit (one launch) for updates made outside the fused kernels ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [5, 1500])  # 1500: more than one block of the commit's loops
@pytest.mark.parametrize("kind", ["finite", "nan", "inf", "-inf"])
def test_commit_if_finite_commits_or_counts(dtype, channels, kind):
    running_mean, running_var = torch.randn(channels, dtype=dtype), torch.rand(channels, dtype=dtype) + 0.5
    new_mean, new_var = torch.randn(channels, dtype=dtype), torch.rand(channels, dtype=dtype) + 0.5
    if kind != "finite":
        new_var[channels // 2] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    tracked, nonfinite = torch.tensor(7), torch.tensor(2)
    before = running_mean.clone(), running_var.clone()
    bnk.commit_if_finite(new_mean, new_var, running_mean, running_var, tracked, nonfinite)
    if kind == "finite":
        assert torch.equal(running_mean, new_mean) and torch.equal(running_var, new_var)
        assert (int(tracked), int(nonfinite)) == (8, 2)
    else:
        assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
        assert (int(tracked), int(nonfinite)) == (7, 3)


def test_commit_if_finite_bad_input():
    c = torch.zeros(4)
    counters = torch.tensor(0), torch.tensor(0)
    with pytest.raises(ValueError, match=r"new_var must be a contiguous \(4,\) torch.float32 tensor"):
        bnk.commit_if_finite(c, torch.zeros(8)[::2], c.clone(), c.clone(), *counters)
    with pytest.raises(ValueError, match="num_nonfinite_batches must be a 0-dim int64 tensor"):
        bnk.commit_if_finite(c, c.clone(), c.clone(), c.clone(), counters[0], torch.tensor(0.0))


def test_layers_commit_through_the_kernel_only_for_cuda_buffers(monkeypatch):
    """kernels.commit_if_finite declines CPU buffers (the CPU layers read the sum directly) and hands CUDA ones to the
    one-launch kernel when normlab's kernels are loaded."""
    stats = [torch.zeros(3) for _ in range(4)]
    counters = torch.tensor(0), torch.tensor(0)
    assert not kernels.commit_if_finite(*stats, *counters)

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    calls = []
    monkeypatch.setattr(kernels, "_triton_ops", kernels._triton_ops or kernels._load_triton_ops())
    monkeypatch.setattr(bnk, "commit_if_finite", lambda *args: calls.append(args))
    fake = [s.as_subclass(FakeCuda) for s in stats]
    assert kernels.commit_if_finite(*fake, *counters) and len(calls) == 1
    strided = torch.zeros(6).as_subclass(FakeCuda)[::2]
    assert not kernels.commit_if_finite(fake[0], fake[1], strided, fake[3], *counters)  # torch ops do it then
    monkeypatch.setattr(kernels, "_triton_ops", False)  # a CUDA machine where normlab's kernels failed to load
    assert not kernels.commit_if_finite(*fake, *counters) and len(calls) == 1  # the torch ops commit then


# ---- torch's batch norm with the guard committed in one launch (the staged batch statistics) ----------------------


@pytest.fixture
def staged_commit(monkeypatch):
    """The native backend (torch's batch norm, which does not fuse the guard) with the one-launch commit enabled for
    CPU buffers, as it is for CUDA ones (the commit kernel runs through Triton's interpreter), except under the
    reference backend, which keeps the copies and torch ops to compare with; yields the list of commit calls."""
    calls = []
    commit = kernels.commit_batch_stats
    monkeypatch.setattr(kernels, "commits_in_one_launch", lambda *_: kernels.get_backend() != "reference")
    monkeypatch.setattr(kernels, "commit_batch_stats", lambda *args: calls.append(args) or commit(*args))
    with kernels.use_backend("native"):
        yield calls


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_staged_guard_commits_and_skips_like_the_reference(staged_commit, layer, momentum):
    """Step by step over finite and non-finite batches: the same outputs, running statistics and counters as the
    reference backend's guard (copies and torch ops), through one commit call per step and no cloned buffers."""

    def zeroed(ours):
        assert not any(t.any() for t in ours._staged)  # ready for the next step

    ours = _run_sequence_against_the_reference(layer, momentum, after_step=zeroed)
    assert len(staged_commit) == len(SEQUENCE)
    assert int(ours.num_batches_tracked) == 3 and int(ours.num_nonfinite_batches) == 4


def test_staged_guard_follows_edits_of_the_running_statistics(staged_commit):
    """Nothing is cached from the buffers: edits between steps (in place, through .data, load_state_dict,
    reset_running_stats, a dtype change) are what the next step updates."""
    ours, ref = _pair(lambda: normlab.BatchNorm2d(5))
    edits = [
        lambda bn: None,
        lambda bn: bn.double(),  # first: the rest compares float64 statistics
        lambda bn: bn.running_mean.fill_(3.0),
        lambda bn: bn.running_var.data.mul_(4.0),  # .data: no version counter to notice it by
        lambda bn: bn.load_state_dict({**bn.state_dict(), "running_mean": torch.arange(5.0)}),
        lambda bn: bn.reset_running_stats(),
    ]
    for step, edit in enumerate(edits):
        with torch.no_grad():
            edit(ours), edit(ref)
        x = _batch((3, 5, 3, 4), "finite", step).to(ours.running_mean.dtype)
        y = ours(x)
        with kernels.use_backend("reference"):
            assert_close(y, ref(x))
        _assert_same_state(ours, ref)
    assert all(t.dtype == torch.float64 for t in ours._staged)
    assert len(staged_commit) == len(edits)


def test_staged_guard_two_forwards_then_one_backward(staged_commit):
    """A layer used twice before the backward (as torch's batch norm allows): gradients and statistics as the
    reference's."""
    ours, ref = _pair(lambda: BatchNormAct2d(5, act="silu"))
    x1, x2 = _batch((3, 5, 3, 4), "finite", 0), _batch((3, 5, 3, 4), "finite", 1)
    grads = []
    for bn, backend in ((ours, "native"), (ref, "reference")):
        with kernels.use_backend(backend):
            a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
            (bn(a) * bn(b)).sum().backward()
        grads.append([a.grad, b.grad, bn.weight.grad, bn.bias.grad])
    for got, expected in zip(*grads):
        assert_close(got, expected)
    _assert_same_state(ours, ref)


def test_staged_guard_runs_only_where_the_commit_takes_one_launch():
    """CPU buffers (and compiled code, synchronized layers, Ghost BN / Batch Renorm) keep the copies and torch ops."""
    bn = normlab.BatchNorm2d(3)
    assert not kernels.commits_in_one_launch(bn.running_mean, bn.running_var)  # CPU
    assert not bn._stages_batch_stats(None)
    bn(torch.randn(4, 3, 2, 2))
    assert bn._staged is None
    with pytest.raises(RuntimeError, match="commit_batch_stats: needs CUDA buffers"):
        kernels.commit_batch_stats(*(torch.zeros(3),) * 4, torch.tensor(0), torch.tensor(0), 0.1)


def test_staged_guard_skips_synchronized_and_other_batch_norms(monkeypatch):
    monkeypatch.setattr(kernels, "commits_in_one_launch", lambda running_mean, running_var: True)
    assert normlab.BatchNorm2d(3)._stages_batch_stats(None)
    assert not normlab.BatchNorm2d(3)._stages_batch_stats(group=object())
    assert not normlab.GhostBatchNorm2d(3, virtual_batch_size=2)._stages_batch_stats(None)
    assert not normlab.BatchRenorm2d(3)._stages_batch_stats(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [5, 1500])  # 1500: more than one block of the commit's loops
@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("kind", ["finite", "nan", "inf"])
def test_commit_batch_stats_folds_or_counts_and_zeroes(dtype, channels, momentum, kind):
    running = torch.randn(channels, dtype=torch.float64), torch.rand(channels, dtype=torch.float64) + 0.5
    batch = torch.randn(channels, dtype=torch.float64), torch.rand(channels, dtype=torch.float64) + 0.5
    if kind != "finite":
        batch[1][channels - 1] = float(kind)
    rmean, rvar, bmean, bvar = (t.to(dtype, copy=True) for t in (*running, *batch))
    tracked, nonfinite = torch.tensor(4), torch.tensor(1)
    before = rmean.clone(), rvar.clone()
    bnk.commit_batch_stats(bmean, bvar, rmean, rvar, tracked, nonfinite, momentum)
    assert not bmean.any() and not bvar.any()
    if kind != "finite":
        assert torch.equal(rmean, before[0]) and torch.equal(rvar, before[1])
        assert (int(tracked), int(nonfinite)) == (4, 2)
        return
    m = 1 / 5 if momentum is None else momentum  # cumulative: 1 / (batches tracked + 1)
    for got, r, b in zip((rmean, rvar), running, batch):
        assert_close(got, (m * b.to(dtype).double() + (1 - m) * r.to(dtype).double()).to(dtype))
    assert (int(tracked), int(nonfinite)) == (5, 1)


def test_commit_batch_stats_bad_input():
    c = torch.zeros(4)
    counters = torch.tensor(0), torch.tensor(0)
    with pytest.raises(ValueError, match=r"commit_batch_stats: batch_var must be a contiguous \(4,\) torch.float32"):
        bnk.commit_batch_stats(c, torch.zeros(8)[::2], c.clone(), c.clone(), *counters, 0.1)
    with pytest.raises(ValueError, match="commit_batch_stats: num_batches_tracked must be a 0-dim int64 tensor"):
        bnk.commit_batch_stats(c, c.clone(), c.clone(), c.clone(), torch.tensor([0]), counters[1], None)


@pytest.mark.gpu
def test_cuda_staged_guard_adds_one_launch_to_torchs_batch_norm():
    """On a GPU, a guarded training step of normlab's BatchNorm2d running torch's batch norm launches what torch's
    batch norm launches plus the commit (which also counts the batch: torch's layer launches an add for that), and
    still skips and counts a NaN batch."""
    import torch.nn.functional as F
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ours, ref = _pair(lambda: normlab.BatchNorm2d(256, device="cuda"))
    theirs = torch.nn.BatchNorm2d(256, device="cuda")
    x = torch.randn(8, 256, 14, 14, device="cuda").to(memory_format=torch.channels_last)

    def launches(step):
        step()  # warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]

    def torch_batch_norm():
        F.batch_norm(x, theirs.running_mean, theirs.running_var, theirs.weight, theirs.bias, training=True)

    with kernels.use_backend("native"):
        assert ours._stages_batch_stats(None)
        ours_launches, their_launches = launches(lambda: ours(x)), launches(torch_batch_norm)
    assert len(ours_launches) == len(their_launches) + 1, (ours_launches, their_launches)
    assert any("_commit_batch_stats_kernel" in name for name in ours_launches), ours_launches
    _assert_two_steps_then_a_skipped_nan_batch(ours, ref, x, "native")
