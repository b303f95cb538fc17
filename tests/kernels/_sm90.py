"""Compile a kernel module's Triton kernels for an H100 (sm_90) without a GPU, as its launchers would launch them.

``python -m tests.kernels._sm90 <module> [--table]`` (``<module>`` a key of :data:`CASES`; or ``--odd-shapes
[--quick]``, every op at :data:`ODD_SHAPES`; or ``--resnet50``, what ``normlab bench resnet50`` launches) runs in a
process WITHOUT ``TRITON_INTERPRET`` (the interpreter accepts code that Triton's compiler rejects). The process
pretends to be an H100 to Triton (an offline driver whose target is sm_90, and 132 SMs for the launchers that ask)
and turns every kernel launch into a compile-only warmup. It then calls the module's public ops forward and backward on
uninitialized CPU tensors at ResNet-50 and transformer shapes, so the modules' own launch-configuration functions
pick the block sizes, flags and warps that a GPU would get, and Triton's JIT compiles each launch.

A variant is a distinct (kernel, keyword launch parameters, tensor argument dtypes); each is compiled once, at the
first launch that uses it (later launches that differ only in the JIT's divisibility specialization of integer
arguments are not compiled again). Prints one JSON object ``{"kernels": [...], "compiled": [...], "failed":
[...]}`` (``--table``: a readable table instead) with, per variant, the registers, the stack frame (``cuobjdump``)
and shared memory; a variant with a stack frame also gets the spill-store bytes that ``ptxas -v`` reports without
Triton's ``--regAllocOptLevel=2`` workaround (which alone makes some small kernels spill a few bytes). Offline
there is no ``n_spills``: Triton reads it from the driver when it loads a kernel onto a GPU.

Exits with :data:`NO_BACKEND` when Triton cannot compile for NVIDIA GPUs here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace

NO_BACKEND = 77
"""Exit status when this Triton has no NVIDIA backend (or no ptxas)."""
SM_COUNT = 132
"""The H100 SXM's SM count, seen by the launchers that size their grids from the device."""
MAX_SHARED = 232448
"""Shared memory one block may use on sm_90 (227 KiB)."""

CONV_SHAPES = [(32, 256, 56, 56), (2, 256, 56, 56), (32, 64, 112, 112), (32, 2048, 7, 7)]
"""ResNet-50 activations: stage 1 at batch 32 and at batch 2, the stem output, the stage-4 output (many channels,
few positions: the channel loops of the NCHW channel norm, FRN's single-tile channels_last path)."""
ROWS = (16384, 1024)
"""Transformer rows (tokens, features) as an (N, C) input."""


# ---- the process as an offline H100 ---------------------------------------------------------------------------


class _OfflineH100:
    """What Triton's JIT asks the active driver when it compiles: the target, the device and the stream."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _Recorder:
    """Replaces ``JITFunction.run``: compile each new variant through Triton's JIT, never launch."""

    def __init__(self, jit_function_cls, tools):
        self.tools = tools
        self.compiled: dict[str, dict] = {}
        self.failed: dict[str, dict] = {}
        self._run = jit_function_cls.run

        def run(fn, *args, grid, warmup, **kwargs):
            self._compile(fn, *args, grid=grid, **kwargs)

        jit_function_cls.run = run

    def _compile(self, fn, *args, grid, **kwargs) -> None:
        variant = _describe(fn, args, kwargs)
        key = json.dumps(variant, sort_keys=True)
        if key in self.compiled or key in self.failed:
            return
        try:
            kernel = self._run(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as error:  # every compiler error is a finding to report
            self.failed[key] = dict(variant, error=f"{type(error).__name__}: {error}"[-3000:])
            return
        self.compiled[key] = dict(variant, **_resources(kernel, self.tools))


def _describe(fn, args, kwargs) -> dict:
    """The kernel, its keyword launch parameters (the constexprs and num_warps) and its tensor arguments' dtypes."""
    names = [p.name for p in fn.params]
    tensors = dict(zip(names, args))
    tensors.update(kwargs)
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items() if hasattr(v, "data_ptr")}
    params = {k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in kwargs.items() if k not in dtypes}
    return {"kernel": fn.__name__, "params": params, "dtypes": dtypes}


def _resources(kernel, tools) -> dict:
    """Registers and stack frame of the compiled kernel (cuobjdump), its shared memory, and for a kernel with a
    stack frame the spill stores that ptxas reports without Triton's ``--regAllocOptLevel=2``."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        usage = subprocess.run([tools.cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)
        regs, stack = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        result = {"regs": regs, "stack": stack, "shared": kernel.metadata.shared}
        result["loop_loads"] = loop_global_loads(kernel.asm["ptx"])
        if stack:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as fh:
                fh.write(kernel.asm["ptx"])
            cmd = [tools.ptxas, "-v", "-lineinfo", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.o")]
            log = subprocess.run(cmd, capture_output=True, text=True).stderr
            m = re.search(r"(\d+) bytes spill stores", log)
            result["spill_stores_default_regalloc"] = int(m.group(1)) if m else None
    return result


def loop_global_loads(ptx: str) -> list[str]:
    """The widths of the global loads inside the kernel's loops (a backward branch's body in the PTX), e.g.
    ``["v4.b32"]``: 16-byte vectors, or ``"b16"`` for scalar 2-byte loads."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\$L__BB\d+_\d+):", line))}
    widths = set()
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            for body in lines[labels[m.group(1)] : i]:
                load = re.search(r"ld\.global(?:\.\w+)*?\.((?:v[248]\.)?[bfsu]\d+)\b", body)
                if load:
                    widths.add(load.group(1))
    return sorted(widths)


def _as_cuda(module, name: str) -> None:
    """Call ``module.name(..., device)`` with a CUDA device in place of the CPU device it gets, so that it reads
    the SM count (from the patched ``torch.cuda.get_device_properties``) as it would on the GPU."""
    import torch

    original = getattr(module, name)
    setattr(module, name, lambda *args: original(*args[:-1], torch.device("cuda")))


# ---- the calls per module -------------------------------------------------------------------------------------


def _x(shape, dtype, channels_last: bool):
    import torch

    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=layout).requires_grad_()


def _vec(c: int, grad: bool = True):
    import torch

    return torch.empty(c).requires_grad_(grad)


def _fwd_bwd(fn, x, *args, **kwargs) -> None:
    """Forward, then backward to every tensor argument that requires a gradient."""
    import torch

    y = fn(x, *args, **kwargs)
    inputs = [t for t in (x, *args) if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(y, inputs, torch.empty_like(y))


def _run_cases(sweep, main, *, rows: bool = True) -> None:
    """``sweep(x, c)`` at (32, 256, 56, 56) bfloat16 in both layouts; ``main(x, c)`` at the other ResNet shapes in
    both layouts, the transformer rows, float32 in both layouts and float64 (NCHW).

    A sweep calls the module's ops with each value of each of their options (in pairs, not their product: an
    activation with parameters, another without, ...); main is the module's representative call, which compiles
    the block sizes of the other shapes and the other pointer types.
    """
    import torch

    big, *others = CONV_SHAPES
    for cl in (True, False):
        sweep(_x(big, torch.bfloat16, cl), big[1])
    inputs = [(shape, torch.bfloat16, cl) for shape in others for cl in (True, False)]
    inputs += [(ROWS, torch.bfloat16, False)] if rows else []
    inputs += [(big, torch.float32, True), (big, torch.float32, False), (big, torch.float64, False)]
    for shape, dtype, cl in inputs:
        main(_x(shape, dtype, cl), shape[1])


def _group_norm():
    import torch

    from normlab.kernels import group_norm as k

    def sweep(x, c):
        _fwd_bwd(k.group_norm, x, 32, _vec(c), _vec(c), act="silu")
        _fwd_bwd(k.group_norm, x, 32, act="relu")
        _fwd_bwd(k.rms_norm, x, _vec(c))
        running = _vec(c, grad=False), _vec(c, grad=False)
        _fwd_bwd(k.instance_norm, x, *running, _vec(c), _vec(c), act="silu")
        _fwd_bwd(k.instance_norm, x, *running, _vec(c), _vec(c), use_input_stats=False, act="silu")
        _fwd_bwd(k.evonorm_s0, x, 32, _vec(c), _vec(c), _vec(c))
        _fwd_bwd(k.evonorm_s0, x, 32, None, None, _vec(c))

    def main(x, c):
        if x.dim() == 2:
            _fwd_bwd(k.layer_norm, x, _vec(c), _vec(c))
            _fwd_bwd(k.rms_norm, x, _vec(c))
        else:
            _fwd_bwd(k.group_norm, x, 32, _vec(c), _vec(c), act="silu")
            if c == 64 and not x.is_contiguous():  # channels-last groups of 2: the ROWS layout, also with the gate
                _fwd_bwd(k.evonorm_s0, x, 32, _vec(c), _vec(c), _vec(c))

    _run_cases(sweep, main)
    # the same ResNet-50 shapes with the split partials merged by launches of their own (_FUSE_SPLITS = 0), where the
    # normalizing and dx kernels merge them above
    fuse_splits, k._FUSE_SPLITS = k._FUSE_SPLITS, 0
    try:
        for cl in (True, False):
            sweep(_x(CONV_SHAPES[0], torch.bfloat16, cl), CONV_SHAPES[0][1])
            main(_x(CONV_SHAPES[2], torch.bfloat16, cl), CONV_SHAPES[2][1])
    finally:
        k._FUSE_SPLITS = fuse_splits
    # ResNet-50's stage 3 in float32 NCHW: rows of 14 x 14 positions, 16-byte aligned but not a multiple of 16
    _fwd_bwd(k.group_norm, _x((32, 1024, 14, 14), torch.float32, False), 32, _vec(1024), _vec(1024))
    # instance norm over rows of 7 x 7 positions, which load element by element (spilled with 4 warps)
    _fwd_bwd(k.instance_norm, _x((1, 512, 7, 7), torch.bfloat16, False), None, None, _vec(512), _vec(512))
    return k


def _channel_norm():
    import torch

    from normlab.kernels import channel_norm as k

    _as_cuda(k, "_backward_programs")

    def sweep(x, c):
        _fwd_bwd(k.layer_norm2d, x, _vec(c), _vec(c), act="silu")
        _fwd_bwd(k.layer_norm2d, x, act="relu")
        _fwd_bwd(k.rms_norm2d, x, _vec(c))

    def main(x, c):
        _fwd_bwd(k.layer_norm2d, x, _vec(c), _vec(c), act="silu")

    _run_cases(sweep, main)
    # ResNet-50's stage 3 in float32 NCHW: rows of 14 x 14 positions, 16-byte aligned but not a multiple of 16
    _fwd_bwd(k.layer_norm2d, _x((32, 1024, 14, 14), torch.float32, False), _vec(1024), _vec(1024))
    # channels_last rows of 40 channels (a stride that is not a multiple of 16: spilled without its hint)
    _fwd_bwd(k.layer_norm2d, _x((8, 40, 56, 56), torch.bfloat16, True), _vec(40), _vec(40))
    return k


def _frn():
    from normlab.kernels import frn as k

    _as_cuda(k, "_launch")

    def sweep(x, c):
        _fwd_bwd(k.filter_response_norm, x, _vec(c), _vec(c), _vec(c), 1e-6, _vec(c))
        _fwd_bwd(k.filter_response_norm, x, _vec(c), _vec(c))
        _fwd_bwd(k.filter_response_norm, x)

    def main(x, c):
        _fwd_bwd(k.filter_response_norm, x, _vec(c), _vec(c), _vec(c))

    _run_cases(sweep, main, rows=False)  # FRN takes 3-D to 5-D inputs
    return k


def _batch_norm():
    import torch

    from normlab.kernels import batch_norm as k

    def running(c):
        return _vec(c, grad=False), _vec(c, grad=False)

    def sweep(x, c):
        _fwd_bwd(k.batch_norm, x, *running(c), _vec(c), _vec(c), True, act="silu")
        _fwd_bwd(k.batch_norm, x, None, None, None, None, True, act="relu")
        counters = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
        _fwd_bwd(k.batch_norm, x, *running(c), _vec(c), _vec(c), True, act="silu", nan_guard=counters)
        _fwd_bwd(k.batch_norm, x, *running(c), _vec(c), _vec(c), False)
        _fwd_bwd(k.frozen_batch_norm, x, *running(c), act="relu")
        for dtype in (torch.float32, torch.bfloat16):  # the layers' standalone guard commit, float and half buffers
            stats = [torch.empty(c, dtype=dtype) for _ in range(4)]
            k.commit_if_finite(*stats, *counters)
            k.commit_batch_stats(*stats, *counters, 0.1)  # the layers' commit of torch's batch statistics
            k.commit_batch_stats(*stats, *counters, None)  # cumulative average

    def main(x, c):
        _fwd_bwd(k.batch_norm, x, *running(c), _vec(c), _vec(c), True, act="silu")

    _run_cases(sweep, main)
    # ResNet-50's stage 3 in float32 NCHW: rows of 14 x 14 positions, 16-byte aligned but not a multiple of 16
    _fwd_bwd(k.batch_norm, _x((32, 1024, 14, 14), torch.float32, False), *running(1024), _vec(1024), _vec(1024), True)
    # MobileNet-like channels_last: rows of 24 channels, 32-byte aligned in float32 but not a multiple of 16
    _fwd_bwd(k.batch_norm, _x((32, 24, 112, 112), torch.float32, True), *running(24), _vec(24), _vec(24), True)
    return k


ODD_SHAPES = [
    (2, 256, 25, 38),  # detection feature maps: odd sizes, batch 2
    (2, 256, 100, 152),
    (32, 24, 112, 112),  # MobileNet-like channel counts
    (8, 40, 56, 56),
    (16, 1024, 14, 14),  # ResNet-50 stages 3 and 4
    (1, 512, 7, 7),
    (4, 96, 56, 56),  # ConvNeXt-like
    (64, 3, 224, 224),  # a norm over RGB input
]
"""Shapes the ResNet-50 cases above miss, for ``--odd-shapes``: every op, both layouts, bfloat16 and float32."""


def _odd_shapes(shapes=ODD_SHAPES) -> None:
    """Every public op at the odd shapes (a sweep for compile failures and spills; about two minutes)."""
    import torch

    from normlab.kernels import batch_norm, channel_norm, frn, group_norm

    _as_cuda(channel_norm, "_backward_programs")
    _as_cuda(frn, "_launch")
    for shape in shapes:
        c = shape[1]
        for dtype in (torch.bfloat16, torch.float32):
            for cl in (True, False):
                x = _x(shape, dtype, cl)
                running = _vec(c, grad=False), _vec(c, grad=False)
                _fwd_bwd(batch_norm.batch_norm, x, *running, _vec(c), _vec(c), True, act="relu")
                _fwd_bwd(batch_norm.frozen_batch_norm, x, *running, _vec(c), _vec(c), act="silu")
                if c % 8 == 0:
                    _fwd_bwd(group_norm.group_norm, x, 8, _vec(c), _vec(c), act="silu")
                    _fwd_bwd(group_norm.evonorm_s0, x, 8, _vec(c), _vec(c), _vec(c))
                _fwd_bwd(group_norm.instance_norm, x, None, None, _vec(c), _vec(c))
                _fwd_bwd(group_norm.rms_norm, x, _vec(c))
                _fwd_bwd(channel_norm.layer_norm2d, x, _vec(c), _vec(c))
                _fwd_bwd(frn.filter_response_norm, x, _vec(c), _vec(c), _vec(c))


RESNET50_LAYERS = [
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28), (256, 28, 28),
    (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7),
]  # fmt: skip
"""(C, H, W) of every normalization in ResNet-50 (torchvision's v1.5 layout: the stride on the 3 x 3 convolutions)."""


def _resnet50() -> None:
    """What ``normlab bench resnet50`` launches: BatchNorm (with its fused NaN guard) and GroupNorm(32), each with the
    fused ReLU of ``BatchNormAct2d`` / ``GroupNormAct``, at every ResNet-50 layer of its two configurations (batch 64
    bfloat16 channels-last, batch 32 float32 NCHW), forward and backward."""
    import torch

    from normlab.kernels import batch_norm, group_norm

    for n, dtype, cl in ((64, torch.bfloat16, True), (32, torch.float32, False)):
        for c, h, w in RESNET50_LAYERS:
            x = _x((n, c, h, w), dtype, cl)
            running = _vec(c, grad=False), _vec(c, grad=False)
            counters = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)
            _fwd_bwd(batch_norm.batch_norm, x, *running, _vec(c), _vec(c), True, act="relu", nan_guard=counters)
            _fwd_bwd(group_norm.group_norm, x, 32, _vec(c), _vec(c), act="relu")


CASES = {"group_norm": _group_norm, "channel_norm": _channel_norm, "frn": _frn, "batch_norm": _batch_norm}
"""Per kernel module (``normlab.kernels.<name>``): the calls whose launches are compiled."""


def kernel_names(module) -> list[str]:
    """The module's kernels: its @triton.jit functions named ``*_kernel`` (the others are helpers they call), also
    when the module was imported under the interpreter."""
    from triton.runtime import KernelInterface

    kernels = (name for name, v in vars(module).items() if isinstance(v, KernelInterface))
    return sorted(name for name in kernels if name.endswith("_kernel"))


def _nvidia_tools():
    """Paths of the ptxas that Triton uses for sm_90 and of cuobjdump, or None without an NVIDIA backend."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.knobs import nvidia

        tools = SimpleNamespace(ptxas=get_ptxas(90).path, cuobjdump=nvidia.cuobjdump.path)
    except (ImportError, AttributeError, RuntimeError):
        return None
    return tools if all(os.path.exists(p) for p in vars(tools).values()) else None


def _table(report: dict) -> str:
    lines = [f"{len(report['compiled'])} compiled, {len(report['failed'])} failed"]
    for v in report["compiled"]:
        dtypes = "/".join(sorted(set(v["dtypes"].values())))
        spills = f" spills={v['spill_stores_default_regalloc']}" if v["stack"] else ""
        lines.append(
            f"{v['kernel']:26s} regs={v['regs']} stack={v['stack']}{spills} smem={v['shared']} {dtypes} {v['params']}"
        )
    lines += [f"FAILED {v['kernel']} {v['params']} {v['dtypes']}\n{v['error']}" for v in report["failed"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # before triton.jit defines the kernels
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    tools = _nvidia_tools()
    if tools is None:
        print("Triton has no NVIDIA backend (or no ptxas / cuobjdump) here", file=sys.stderr)
        return NO_BACKEND
    torch.set_num_threads(1)
    driver.set_active(_OfflineH100(GPUTarget("cuda", 90, 32)))
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(multi_processor_count=SM_COUNT)
    recorder = _Recorder(JITFunction, tools)
    from normlab.kernels import _triton_utils

    _triton_utils.INTERPRET = True  # let the public functions take CPU tensors: nothing runs, the recorder compiles
    if argv[0] == "--odd-shapes":  # [--quick]: the first odd shape only
        _odd_shapes(ODD_SHAPES[:1] if "--quick" in argv else ODD_SHAPES)
        kernels = []
    elif argv[0] == "--resnet50":
        _resnet50()
        kernels = []
    else:
        kernels = kernel_names(CASES[argv[0]]())
    compiled, failed = list(recorder.compiled.values()), list(recorder.failed.values())
    report = {"kernels": kernels, "compiled": compiled, "failed": failed}
    print(_table(report) if "--table" in argv else json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
