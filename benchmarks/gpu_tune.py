"""Sweep the launch constants of normlab's Triton kernels at the shapes of issue 6's targets (CUDA GPU only).

Each kernel module keeps its launch configuration in module constants (``_TILE``, ``_NUM_WARPS``,
``_PROGRAMS_PER_SM``, ...) that its config functions read at every launch. This script sets a candidate's values,
times the normlab layer's forward and forward+backward (``triton.testing.do_bench``, median) next to torch's eager
layer in the same process, checks the candidate's output and input gradient against torch's, restores the
constants, and writes one CSV row per (case, candidate, pass). The summary printed last gives, per case, the
baseline (the constants as committed), the fastest candidate and torch eager.

    python benchmarks/gpu_tune.py --out tune.csv                    # every case and candidate, timed
    python benchmarks/gpu_tune.py --warm --shard 0 --shards 8       # compile only (fills Triton's disk cache)
    python benchmarks/gpu_tune.py --host                            # only the host cost per call

``--warm`` runs each assigned (case, candidate) once without timing: run several shards in parallel first, so that
the timed run that follows finds every kernel compiled (benchmarks/gpu_all.sh does this).
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPE = (32, 256, 56, 56)
SMALL = (2, 256, 56, 56)

# (op of normlab.lab.bench.KERNEL_OPS, shape, dtype, layout)
CASES = [
    ("gn", SHAPE, torch.bfloat16, "channels_last"),
    ("in", SHAPE, torch.bfloat16, "channels_last"),
    ("bn", SHAPE, torch.bfloat16, "channels_last"),
    ("gn", SHAPE, torch.bfloat16, "nchw"),
    ("bn", SHAPE, torch.bfloat16, "nchw"),
    ("gn", SMALL, torch.bfloat16, "channels_last"),
    ("bn", SMALL, torch.bfloat16, "channels_last"),
    ("gn", SHAPE, torch.float32, "nchw"),
    ("bn", SHAPE, torch.float32, "nchw"),
    ("ln2d", SHAPE, torch.bfloat16, "channels_last"),
    ("frn", SHAPE, torch.bfloat16, "channels_last"),
]

MODULES = {"gn": "group_norm", "in": "group_norm", "bn": "batch_norm", "ln2d": "channel_norm", "frn": "frn"}

CANDIDATES = {
    "group_norm": [
        {},
        {"_NUM_WARPS": 4},
        {"_NUM_WARPS": 16},
        {"_TILE": 2048},
        {"_TILE": 2048, "_NUM_WARPS": 4},
        {"_TILE": 8192},
        {"_TILE": 8192, "_NUM_WARPS": 16},
        {"_PROGRAMS_PER_SM": 2},
        {"_PROGRAMS_PER_SM": 8},
        {"_TILE_CHANNELS": 256},
        {"_TILE_POSITIONS": 512},
        {"_TILE_POSITIONS": 2048},
        {"_FUSE_SPLITS": 0},  # the split partials merged by launches of their own, not in the normalize / dx kernels
    ],
    "batch_norm": [
        {},
        {"_NUM_WARPS": 8},
        {"_TILE": 2048},
        {"_TILE": 8192},
        {"_TILE": 8192, "_NUM_WARPS": 8},
        {"_MAX_BLOCK_C": 32},
        {"_MAX_BLOCK_C": 128},
        {"_MAX_BLOCK_S": 512},
        {"_MAX_BLOCK_S": 2048},
        {"_TARGET_PROGRAMS": 2 * 132},
        {"_TARGET_PROGRAMS": 8 * 132},
        {"_MERGE_PROGRAMS": 1},  # the statistics' merge in 64-channel blocks (as measured in run 2), not about 32
    ],
    "channel_norm": [
        {},
        {"_TILE": 2048},
        {"_TILE": 8192},
        {"_PROGRAMS_PER_SM": 2},
        {"_PROGRAMS_PER_SM": 8},
        {"_ACC_2D": True},  # parameter gradients summed per element over the tiles, over rows once at the end
        {"_ACC_2D": True, "_TILE": 8192},
    ],
    "frn": [{}, {"_TILE": 2048}, {"_TILE": 8192}, {"_PROGRAMS_PER_SM": 2}, {"_PROGRAMS_PER_SM": 8}],
}

COLUMNS = [
    "op",
    "shape",
    "dtype",
    "layout",
    "module",
    "candidate",
    "pass",
    "normlab_ms",
    "eager_ms",
    "speedup_vs_eager",
    "bw_frac",
    "normlab_graph_ms",
    "eager_graph_ms",
    "graph_speedup_vs_eager",
    "graph_bw_frac",
    "rel_err_y",
    "rel_err_dx",
    "status",
    "device",
    "torch",
    "triton",
]


def _jobs():
    """Every (case index, candidate) pair, in a fixed order (shards take every k-th)."""
    return [(i, cand) for i, case in enumerate(CASES) for cand in CANDIDATES[MODULES[case[0]]]]


class _Patched:
    """Set a module's launch constants for the duration of a with-block."""

    def __init__(self, module, values: dict) -> None:
        self.module, self.values, self.saved = module, values, {}

    def __enter__(self):
        for name, value in self.values.items():
            if not hasattr(self.module, name):
                raise AttributeError(f"{self.module.__name__} has no launch constant {name}")
            self.saved[name] = getattr(self.module, name)
            setattr(self.module, name, value)
        self._clear_caches()

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.module, name, value)
        self._clear_caches()

    def _clear_caches(self):
        """The config functions are cached (functools.lru_cache): forget configs made with other constants."""
        for obj in vars(self.module).values():
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@functools.lru_cache(maxsize=1)
def _build(case, device):
    """(x, dy, normlab module, torch module) of a case; the last case's are kept (consecutive jobs share them)."""
    from normlab.lab.bench import KERNEL_OPS

    op_name, shape, dtype, layout = case
    op = KERNEL_OPS[op_name]
    gen = torch.Generator(device).manual_seed(0)  # drawn where they are used: fast for 25M-element inputs
    x = torch.randn(shape, generator=gen, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn(shape, generator=gen, device=device).to(dtype)
    if layout == "channels_last":  # as x: a gradient in another layout would add a copy to every timing
        dy = dy.contiguous(memory_format=torch.channels_last)
    ours = op.normlab(shape[1]).to(device=device, dtype=dtype).train()
    theirs = (op.torch or op.normlab)(shape[1]).to(device=device, dtype=dtype).train()
    with torch.no_grad():  # same (non-trivial) affine parameters in both
        for p in ours.parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device).to(dtype))
        ours_params = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            key = name.split(".")[-1]
            if key in ours_params and ours_params[key].shape == p.shape:
                p.copy_(ours_params[key])
    return x, dy, ours, theirs


def _passes(module, x, dy, backend):
    from normlab import kernels

    params = [p for p in module.parameters() if p.requires_grad]

    def fwd():
        with kernels.use_backend(backend):
            return module(x)

    def fwd_bwd():
        with kernels.use_backend(backend):
            return torch.autograd.grad(module(x), [x, *params], dy)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _profile(device) -> None:
    """Per-kernel CUDA time of one forward+backward at the issue's shape for GroupNorm, InstanceNorm, BatchNorm,
    LayerNorm2d and FRN (committed constants), normlab and torch: which launch costs what."""
    from torch.profiler import ProfilerActivity, profile

    for case in CASES[:3] + CASES[9:11]:  # GN, IN, BN, LayerNorm2d, FRN at the shape
        x, dy, ours, theirs = _build(case, device)
        for name, module, backend in (("normlab", ours, "triton"), ("torch", theirs, "reference")):
            fn = _passes(module, x, dy, backend)["fwd+bwd"]
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            print(f"\n== profile {case[0]} {case[1]} {case[2]} {case[3]} {name} (10 x fwd+bwd)")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=70))


def _graph_columns(pass_: str, ours: float | None, theirs: float | None, nbytes: int, copy_gbps: float) -> dict:
    """The CUDA-graph columns of a fwd+bwd row (the graph times only forward+backward)."""
    if pass_ != "fwd+bwd" or ours is None:
        return {}
    return {
        "normlab_graph_ms": f"{ours:.5f}",
        "eager_graph_ms": None if theirs is None else f"{theirs:.5f}",
        "graph_speedup_vs_eager": None if theirs is None else f"{theirs / ours:.3f}",
        "graph_bw_frac": f"{nbytes / (ours * 1e6) / copy_gbps:.3f}",
    }


def _host_costs(device) -> None:
    """Host time per call (microseconds) at a tiny shape, where the GPU waits for the host: normlab's fwd+bwd vs
    torch's, and one bare launch of a Triton kernel vs one of torch's elementwise ops."""
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(p, n, a1, a2, a3, a4, a5, a6, a7, a8, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(p + offs, tl.load(p + offs, mask=offs < n) + a1, mask=offs < n)

    def host_us(fn, reps=300):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        elapsed = time.perf_counter() - t0
        torch.cuda.synchronize()
        return elapsed / reps * 1e6

    buf = torch.zeros(1024, device=device)
    args = (buf, 1024, 1.0, 2, 3, 4, 5, 6, 7, 8)
    print("\nhost cost per call (us), tiny shapes: the GPU waits for the host")
    print(f"  one Triton launch (10 args): {host_us(lambda: _touch[(1,)](*args, BLOCK=1024)):.1f}")
    print(f"  one torch elementwise op (add_): {host_us(lambda: buf.add_(1.0)):.1f}")
    for op in ("gn", "bn", "ln2d", "frn", "in"):
        x, dy, ours, theirs = _build((op, (2, 64, 8, 8), torch.bfloat16, "channels_last"), device)
        times = []
        for module, backend in ((ours, "triton"), (theirs, "reference")):
            fns = _passes(module, x, dy, backend)
            times += [host_us(fns["fwd"]), host_us(fns["fwd+bwd"])]
        print(
            f"  {op:5} fwd: normlab {times[0]:6.1f}  torch {times[2]:6.1f}    "
            f"fwd+bwd: normlab {times[1]:6.1f}  torch {times[3]:6.1f}"
        )
    _host_breakdown(device, host_us, _touch, args)
    _host_auto(device, host_us)


def _print_profile(fn, title: str, orders=("cumulative",), calls: int = 200) -> None:
    """Run ``fn`` ``calls`` times under cProfile and print the 30 costliest functions by each of ``orders``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    for order in orders:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(order).print_stats(30)
        print(f"\n== Python profile, {title} x {calls}, by {order}")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))


def _host_auto(device, host_us) -> None:
    """Host time per call of the default dispatch (``auto``, which on this machine mostly runs torch's op in eager):
    BatchNorm with and without its NaN guard, GroupNorm, next to torch's modules; then a Python profile of the
    guarded BatchNorm forward."""
    import normlab

    x = torch.randn(2, 64, 8, 8, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    modules = {
        "normlab BatchNorm2d auto": normlab.BatchNorm2d(64),
        "normlab BatchNorm2d(nan_guard=False) auto": normlab.BatchNorm2d(64, nan_guard=False),
        "torch BatchNorm2d": torch.nn.BatchNorm2d(64),
        "normlab GroupNorm(32) auto": normlab.GroupNorm(64, num_groups=32),
        "torch GroupNorm(32)": torch.nn.GroupNorm(32, 64),
    }
    print("\nhost cost per call (us), float32 (2, 64, 8, 8), the default dispatch")
    for name, module in modules.items():
        fns = _passes(module.to(device).train(), x, dy, "auto")
        print(f"  {name:42} fwd {host_us(fns['fwd']):6.1f}   fwd+bwd {host_us(fns['fwd+bwd']):6.1f}")
    _print_profile(
        _passes(modules["normlab BatchNorm2d auto"], x, dy, "auto")["fwd"], "normlab BatchNorm2d auto forward"
    )


def _host_breakdown(device, host_us, touch, args) -> None:
    """Where normlab's host time goes (a help for the launcher work, not a result): the backward run on the calling
    thread instead of autograd's device thread, a Python profile of GroupNorm's forward+backward, and one launch
    through the compiled kernel's launcher without Triton's argument binding."""
    x, dy, ours, theirs = _build(("gn", (2, 64, 8, 8), torch.bfloat16, "channels_last"), device)
    fns = {
        "normlab": _passes(ours, x, dy, "triton")["fwd+bwd"],
        "torch": _passes(theirs, x, dy, "reference")["fwd+bwd"],
    }
    with torch.autograd.set_multithreading_enabled(False):
        print(
            "  gn    fwd+bwd, backward on the calling thread: "
            + "  ".join(f"{k} {host_us(f):6.1f}" for k, f in fns.items())
        )
        title = "normlab gn fwd+bwd (backward on the calling thread)"
        _print_profile(fns["normlab"], title, orders=("tottime", "cumulative"))
    try:  # Triton 3.3-3.6's launcher signature; other versions: reported, not needed
        kernel = touch[(1,)](*args, BLOCK=1024)
        stream = torch.cuda.current_stream(device).cuda_stream
        meta = (kernel.function, kernel.packed_metadata, None, None, None)

        def direct():  # every argument, constexprs included, as JITFunction.run passes them
            kernel.run(1, 1, 1, stream, *meta, *args, 1024)

        print(f"  one launch through the compiled kernel's launcher (no binding): {host_us(direct):.1f}")
    except Exception as err:
        print(f"  direct launch failed: {type(err).__name__}: {err}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tune.csv", help="the CSV to write")
    parser.add_argument("--warm", action="store_true", help="compile only: run each job once, no timing, no CSV")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shapes, two candidates per module (a test of the script)"
    )
    parser.add_argument("--host", action="store_true", help="only the host costs per call (a GPU), no sweep")
    args = parser.parse_args(argv)
    if args.host:
        if not torch.cuda.is_available():
            print("gpu_tune: --host needs a CUDA GPU", file=sys.stderr)
            return 2
        _host_costs(torch.device("cuda"))
        return 0
    if args.smoke:
        CASES[:] = [(op, (2, 32, 5, 3), dtype, layout) for op, _, dtype, layout in CASES[:2] + CASES[2:5:2]]
        for name in CANDIDATES:
            CANDIDATES[name][:] = CANDIDATES[name][:2]
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_tune: needs a CUDA GPU (--smoke runs a tiny CPU configuration)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    jobs = _jobs()[args.shard :: args.shards]

    if args.warm:
        for i, cand in jobs:
            case = CASES[i]
            x, dy, ours, _ = _build(case, device)
            module = importlib.import_module(f"normlab.kernels.{MODULES[case[0]]}")
            try:
                with _Patched(module, cand):
                    _passes(ours, x, dy, "triton")["fwd+bwd"]()
            except Exception as err:  # reported again, with its row, by the timed run
                print(f"warm {case[0]} {cand}: {type(err).__name__}: {err}", file=sys.stderr)
        return 0

    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    env = {"device": name, "torch": torch.__version__, "triton": triton.__version__}
    from normlab.lab import bench

    if device.type == "cuda":  # the benchmarks' own timers: do_bench medians, CUDA-graph replays
        time_ms, graph_ms = bench.cuda_timer(smoke=False), bench.cuda_graph_timer()
    else:  # --smoke on CPU: the times mean nothing
        time_ms, graph_ms = bench.cpu_timer(reps=3), (lambda fn: None)
    copy_gbps = bench.copy_bandwidth_gbps(device, time_ms, (1 << 28) if device.type == "cuda" else (1 << 10))
    print(f"{env['device']}: copy {copy_gbps:.0f} GB/s, torch {env['torch']}, triton {env['triton']}", flush=True)
    if device.type == "cuda":
        try:
            _host_costs(device)
        except Exception as err:  # a help for reading the times, not a result
            print(f"host costs failed: {type(err).__name__}: {err}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    best: dict[int, list] = {}
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        eager: dict[int, dict] = {}
        for i, cand in jobs:
            case = CASES[i]
            op, shape, dtype, layout = case
            module = importlib.import_module(f"normlab.kernels.{MODULES[op]}")
            x, dy, ours, theirs = _build(case, device)
            if i not in eager:
                eager[i] = {name: time_ms(fn) for name, fn in _passes(theirs, x, dy, "reference").items()}
                eager[i]["graph"] = graph_ms(_passes(theirs, x, dy, "reference")["fwd+bwd"])
                ref = _passes(theirs, x, dy, "reference")["fwd+bwd"]()
                ref_y = _passes(theirs, x, dy, "reference")["fwd"]().detach()
                eager[i]["ref"] = (ref_y, ref[0])
            ref_y, ref_dx = eager[i]["ref"]
            row = {
                "op": op,
                "shape": "x".join(map(str, shape)),
                "dtype": str(dtype).replace("torch.", ""),
                "layout": layout,
                "module": MODULES[op],
                "candidate": json.dumps(cand, sort_keys=True),
                **env,
            }
            try:
                with _Patched(module, cand):
                    fns = _passes(ours, x, dy, "triton")
                    y = fns["fwd"]().detach()
                    dx = fns["fwd+bwd"]()[0]
                    errs = {"rel_err_y": _rel(y, ref_y), "rel_err_dx": _rel(dx, ref_dx)}
                    times = {name: time_ms(fn) for name, fn in fns.items()}
                    times["graph"] = graph_ms(fns["fwd+bwd"])
                status = "ok"
            except Exception as err:
                times, errs, status = {}, {}, f"error: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
            for name in ("fwd", "fwd+bwd"):
                ms = times.get(name)
                e = eager[i][name]
                nbytes = bench.roofline_bytes(math.prod(shape), x.element_size(), name)
                writer.writerow(
                    {
                        **row,
                        "pass": name,
                        "normlab_ms": None if ms is None else f"{ms:.5f}",
                        "eager_ms": f"{e:.5f}",
                        "speedup_vs_eager": None if ms is None else f"{e / ms:.3f}",
                        "bw_frac": None if ms is None else f"{nbytes / (ms * 1e6) / copy_gbps:.3f}",
                        **_graph_columns(name, times.get("graph"), eager[i]["graph"], nbytes, copy_gbps),
                        **{k: f"{v:.2e}" for k, v in errs.items()},
                        "status": status,
                    }
                )
            fh.flush()
            ms = times.get("graph") or times.get("fwd+bwd")  # tune on the GPU's time where measured
            print(
                f"{op:5} {row['shape']:12} {row['dtype']:9} {layout:13} {row['candidate']:40} "
                f"fwd+bwd {'-' if ms is None else f'{ms:.4f}':>8} ms  "
                f"eager {eager[i]['graph'] or eager[i]['fwd+bwd']:.4f}  "
                f"err {errs.get('rel_err_dx', float('nan')):.1e}  {status[:60]}",
                flush=True,
            )
            if ms is not None:
                best.setdefault(i, []).append((ms, row["candidate"]))

    if device.type == "cuda":
        try:
            _profile(device)
        except Exception as err:  # the profile is a help for reading the times, not a result
            print(f"profile failed: {type(err).__name__}: {err}")
    print("\nper case (fwd+bwd, CUDA-graph times on a GPU): baseline ms, best ms (candidate), eager ms, speedup")
    for i, results in best.items():
        op, shape, dtype, layout = CASES[i]
        base = next((ms for ms, c in results if c == "{}"), statistics.median(r[0] for r in results))
        ms, cand = min(results)
        e = eager[i]["graph"] or eager[i]["fwd+bwd"]
        print(
            f"{op:5} {'x'.join(map(str, shape)):12} {str(dtype)[6:]:9} {layout:13} base {base:.4f}  best {ms:.4f} "
            f"{cand:36} eager {e:.4f}  x{e / ms:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
