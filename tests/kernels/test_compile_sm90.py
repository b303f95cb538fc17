"""Every Triton kernel of every kernel module compiles for an H100 (sm_90), without a GPU.

The CPU suite runs the kernels through Triton's interpreter, which accepts code that Triton's compiler rejects (a
constexpr branch that uses a None pointer, a shape the layout pass cannot handle, ...). Here one subprocess per
module (without ``TRITON_INTERPRET``, see :mod:`tests.kernels._sm90`) calls the module's ops forward and backward
at ResNet-50 and transformer shapes with Triton pretending to be an H100, so every launch the launchers make is
compiled for sm_90 with the block sizes a GPU would get. The subprocesses start together (at the first test) and
each test reads its module's report: the kernel was reached, every variant of it compiled, none spills registers
(except float64 variants, whose tiles are sized for 16/32-bit data, and the KNOWN_SPILLS) and each fits an H100's
shared memory.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.kernels import _sm90  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KNOWN_SPILLS: dict[tuple[str, str], dict] = {}
"""Spills that are known and accepted, by (module, kernel): the launch parameters of the spilling variants. Empty:
the one found (batch_norm._grad_input_kernel with 64 x 64 NCHW tiles at (32, 2048, 7, 7) bf16, 255 registers with
4 warps) was fixed by giving such tiles 8 warps."""
KERNELS = [
    (module, kernel)
    for module in _sm90.CASES
    for kernel in _sm90.kernel_names(importlib.import_module(f"normlab.kernels.{module}"))
]


@pytest.fixture(scope="module")
def report(request):
    """``report(module)``: the compile report of a module; the subprocesses of all selected modules run at once."""
    selected = [
        item.callspec.params["module"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module  # doctests have neither module nor callspec
        and "module" in getattr(getattr(item, "callspec", None), "params", {})
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, without its warning

    def start(module):
        return subprocess.Popen(
            [sys.executable, "-m", "tests.kernels._sm90", module],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = {module: start(module) for module in dict.fromkeys(selected)}
    done = {}

    def get(module):
        if module not in procs:  # a test that is not parametrized by module, selected alone
            procs[module] = start(module)
        if module not in done:
            out, err = procs[module].communicate(timeout=600)
            done[module] = procs[module].returncode, out, err
        code, out, err = done[module]
        if code == _sm90.NO_BACKEND:
            pytest.skip(err.strip())
        assert code == 0, f"compiling normlab.kernels.{module} for sm_90 crashed:\n{err[-4000:]}"
        return json.loads(out)

    yield get
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _label(variant: dict) -> str:
    dtypes = "/".join(sorted(set(variant["dtypes"].values())))
    return f"{variant['kernel']}[{dtypes}] {variant['params']}"


def _spills(variant: dict) -> bool:
    """A stack frame that holds spilled registers, unless ptxas spills nothing without the ``--regAllocOptLevel=2``
    that Triton 3.9 adds (a ptxas workaround that alone makes a few small kernels spill a few bytes)."""
    return bool(variant["stack"]) and variant.get("spill_stores_default_regalloc") != 0


@pytest.mark.parametrize("module,kernel", KERNELS, ids=[f"{m}.{k}" for m, k in KERNELS])
def test_kernel_compiles_for_sm90(report, module, kernel):
    result = report(module)
    assert kernel in result["kernels"]
    failed = [v for v in result["failed"] if v["kernel"] == kernel]
    assert not failed, f"{module}.{kernel} does not compile for sm_90:\n" + "\n".join(
        f"{_label(v)}\n{v['error']}" for v in failed
    )
    variants = [v for v in result["compiled"] if v["kernel"] == kernel]
    assert variants, f"{module}.{kernel}: no launch of tests/kernels/_sm90.py reaches it; add a call that does"
    spilling = [v for v in variants if _spills(v) and "float64" not in v["dtypes"].values()]
    known = KNOWN_SPILLS.get((module, kernel), {})
    unexpected = [v for v in spilling if not known or not known.items() <= v["params"].items()]
    assert not unexpected, f"{module}.{kernel} spills registers on sm_90:\n" + "\n".join(
        f"{_label(v)}: {v['regs']} registers, {v['stack']} bytes stack frame" for v in unexpected
    )
    assert not known or spilling, f"{module}.{kernel} no longer spills at {known}: remove it from KNOWN_SPILLS"
    too_big = [v for v in variants if v["shared"] > _sm90.MAX_SHARED]
    assert not too_big, f"{module}.{kernel} needs more shared memory than an H100 has:\n" + "\n".join(
        f"{_label(v)}: {v['shared']} bytes" for v in too_big
    )


def test_narrow_channels_last_groups_load_16_byte_vectors(report):
    """The ROWS layout's point (normlab.kernels.group_norm): channels-last groups of 2 channels in bfloat16 are loaded
    as rows of contiguous channels, 16 bytes at a time, in every loop of the main kernels; along the 2-channel axis
    they were 4-byte loads."""
    rows = [v for v in report("group_norm")["compiled"] if v["params"].get("ROWS")]
    assert {v["kernel"] for v in rows} == {"_stats_kernel", "_normalize_kernel", "_bwd_reduce_kernel", "_bwd_dx_kernel"}
    fused = [v for v in rows if v["params"].get("FUSED_MERGE") or v["params"].get("FUSED_SUMS")]
    assert fused and len(fused) < len(rows)  # both kinds compiled
    for v in rows:
        if v in fused:  # one more loop, over the float32 split partials (pairs of groups, or one split at a time)
            assert "v4.b32" in v["loop_loads"] and set(v["loop_loads"]) <= {"v4.b32", "v2.b32", "b32"}, _label(v)
        else:
            assert v["loop_loads"] == ["v4.b32"], f"{_label(v)}: loads {v['loop_loads']} in its loops"


ROW_CASES = [
    ("group_norm", "S_DIV", {"_stats_kernel", "_normalize_kernel", "_bwd_reduce_kernel", "_bwd_dx_kernel"}),
    ("batch_norm", "S_DIV", {"_stats_nchw_kernel", "_grad_sums_nchw_kernel"}),
    ("batch_norm", "C_DIV", {"_stats_cl_kernel", "_grad_sums_cl_kernel"}),
    ("channel_norm", "STRIDE_C_DIV", {"_channel_norm_fwd_kernel", "_channel_norm_bwd_kernel"}),
]
"""(module, the constexpr that carries a row length's power-of-2 factor, the kernels whose loops take it)."""


@pytest.mark.parametrize("module,hint,kernels", ROW_CASES, ids=[f"{m}-{h}" for m, h, _ in ROW_CASES])
def test_rows_load_the_widest_vectors_their_alignment_allows(report, module, hint, kernels):
    """float32 rows of 14 x 14 positions (NCHW) or of 24 channels (channels_last) are 16-byte aligned, but Triton knows
    a runtime size only as divisible by 16 or not; the kernels' power-of-2 hint
    (normlab.kernels._triton_utils.with_factor) lets their loops load 16-byte vectors of x (and dy)."""
    rows = [
        v
        for v in report(module)["compiled"]
        if v["params"].get(hint) in (4, 8) and v["dtypes"]["x_ptr"] == "float32" and v["kernel"] in kernels
    ]
    assert {v["kernel"] for v in rows} == kernels
    for v in rows:
        assert "v4.b32" in v["loop_loads"], f"{_label(v)}: loads {v['loop_loads']} in its loops"


@pytest.mark.parametrize(
    "mode",
    [("--odd-shapes", "--quick"), ("--resnet50",)],
    ids=["an-odd-shape", "resnet50-benchmark"],
)
def test_sweep_compiles_without_spills(mode):
    """``--odd-shapes --quick``: every op at a detection feature map, (2, 256, 25, 38) in both layouts, bfloat16 and
    float32 (the full sweep, all of ``_sm90.ODD_SHAPES``, takes minutes); ``--resnet50``: the BatchNorm and GroupNorm
    kernels the ResNet-50 benchmark launches, at every layer of both its configurations. Each compiles for sm_90
    without spilling."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    argv = [sys.executable, "-m", "tests.kernels._sm90", *mode]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode == _sm90.NO_BACKEND:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report["compiled"] and not report["failed"], [f"{_label(v)}\n{v['error']}" for v in report["failed"]]
    spilling = [_label(v) for v in report["compiled"] if _spills(v)]
    assert not spilling, spilling
