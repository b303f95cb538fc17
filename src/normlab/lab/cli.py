"""The ``normlab`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo, run_lab_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        defaults = DemoConfig()
        run_demo(DemoConfig(epochs=args.epochs or defaults.epochs, seed=args.seed))
        return 0
    try:
        report = run_lab_demo(args.out, level=args.level, quiet=args.quiet, data_dir=args.data_dir, jobs=args.jobs)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"normlab demo: error: {err}", file=sys.stderr)
        return 2
    print(f"\nreport: {report}")
    return 0


# The studies whose training runs are data-parallel under torchrun (the others evaluate or time in one process).
_DISTRIBUTED_STUDIES = ("batch-size",)


def _study(args: argparse.Namespace) -> int:
    """``normlab study ...``; under ``torchrun --nproc_per_node K -m normlab.lab.cli study batch-size ...`` every run
    is data-parallel over the K processes (gloo on CPU, NCCL with one GPU each), with the protocol's batch size per
    process, and rank 0 writes the report."""
    import torch.distributed as dist

    from .report import write_report
    from .studies import get_study
    from .trainer import init_distributed, torchrun_world_size

    if torchrun_world_size() > 1 and args.name not in _DISTRIBUTED_STUDIES:
        print(
            f"normlab study: error: {args.name!r} does not run under torchrun (WORLD_SIZE="
            f"{os.environ['WORLD_SIZE']}); studies that do: {', '.join(_DISTRIBUTED_STUDIES)}",
            file=sys.stderr,
        )
        return 2
    info = init_distributed()  # rank 0 of 1 without torchrun
    distributed = info.world_size > 1
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = args.quiet or info.rank > 0
    echo = (lambda *a, **k: None) if quiet else print
    suffix = f"-ddp{info.world_size}" if distributed else ""
    out = Path(args.out) if args.out else Path("runs") / f"{args.name}-{args.level}{suffix}"
    try:
        get_study(args.name).run(
            out,
            level=args.level,
            norms=args.norms,
            seeds=args.seeds,
            quiet=quiet,
            echo=echo,
            data_dir=args.data_dir,
            jobs=1 if distributed else args.jobs,
        )
        if info.rank == 0:
            report = write_report(out, echo=print)
            print(f"\nresults and plots: {out}\nreport: {report}")
        if distributed:
            dist.barrier()  # every rank tears its process group down together, after rank 0's report
    except (ValueError, FileNotFoundError, ImportError) as err:
        where = f" (rank {info.rank})" if distributed else ""
        print(f"normlab study: error{where}: {err}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    try:
        report = write_report(args.run_dir)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"normlab report: error: {err}", file=sys.stderr)
        return 2
    print(f"\nreport: {report}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _jobs(text: str) -> int:
    return default_jobs() if text == "auto" else _positive_int(text)


def default_jobs() -> int:
    """Training processes for ``--jobs auto``: one per CPU this process may use, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


def _add_jobs(parser) -> None:
    parser.add_argument(
        "--jobs",
        type=_jobs,
        default="auto",
        metavar="N",
        help="training runs at once, one process each (default auto: one per CPU, at most 8); the speed study "
        "always runs alone, and results do not depend on N",
    )


def _add_study_parsers(sub) -> None:
    from .studies import LEVELS, list_studies

    study = sub.add_parser(
        "study",
        help="run one study of the lab (batch-size, speed, inference, online, rnn) and write its report",
        description="Run a study; finished runs in the output folder are kept, so an interrupted study resumes.",
    )
    study.add_argument("name", choices=list_studies(), metavar="NAME", help=", ".join(list_studies()))
    levels = study.add_mutually_exclusive_group()
    level_help = {
        "smoke": "seconds: tiny data, for tests",
        "quick": "CPU minutes (default)",
        "full": "the GPU-scale protocol",
    }
    for level in LEVELS:
        levels.add_argument(f"--{level}", dest="level", action="store_const", const=level, help=level_help[level])
    study.set_defaults(level="quick")
    study.add_argument("--norms", nargs="+", metavar="SPEC", help="norm specs to compare (default: the study's)")
    study.add_argument("--seeds", type=_positive_int, metavar="N", help="seeds per configuration")
    study.add_argument("--out", metavar="DIR", help="output folder (default: runs/NAME-LEVEL)")
    study.add_argument("--data-dir", metavar="DIR", help="where to look for Fashion-MNIST first")
    study.add_argument("--quiet", action="store_true", help="no progress output (for CI logs)")
    study.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the lab's small models run "
        "fastest single-threaded on CPU; 0 keeps torch's choice)",
    )
    _add_jobs(study)
    study.set_defaults(func=_study)
    report = sub.add_parser("report", help="regenerate report.md and plots of a results folder from its files")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(func=_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description="Normalization beyond BatchNorm: the lab.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="the quick version of every study (at most 10 minutes on 2 CPU cores), with a report",
        description="Run the --quick version of all five studies into runs/<timestamp> and write report.md with "
        "plots; --tiny runs the 30-second BatchNorm-vs-GroupNorm demonstration instead.",
    )
    demo.add_argument("--out", metavar="DIR", help="output folder (default: runs/<timestamp>); reuse it to resume")
    demo.add_argument("--smoke", dest="level", action="store_const", const="smoke", help="seconds (for tests)")
    demo.set_defaults(level="quick")
    demo.add_argument("--data-dir", metavar="DIR", help="where to look for Fashion-MNIST first")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.add_argument("--tiny", action="store_true", help="the 30-second BatchNorm vs GroupNorm demonstration")
    demo.add_argument("--epochs", type=int, default=None, help="--tiny: training epochs (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="--tiny: seed")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the lab's small models run "
        "fastest single-threaded on CPU; 0 keeps torch's choice)",
    )
    _add_jobs(demo)
    demo.set_defaults(func=_demo)
    from ..doctor.cli import add_doctor_parser
    from ..export import add_export_parser
    from .data import NAMED_DATASETS, named_batches

    add_doctor_parser(sub, named_datasets=NAMED_DATASETS, load_named=named_batches)
    add_export_parser(sub)
    _add_study_parsers(sub)
    from .bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def run() -> None:
    """The ``normlab`` console script and ``python -m normlab.lab.cli``: :func:`main`, then exit with its status.

    Under torchrun (``WORLD_SIZE`` > 1) the process ends with ``os._exit`` once the output is flushed, skipping the
    interpreter's teardown. torch's DistributedDataParallel keeps its gloo process group, and that group's threads,
    alive after ``destroy_process_group`` (torch 2.13), and when those threads outlive the interpreter a rank is
    sometimes killed by SIGABRT at exit ("terminate called without an active exception") after all its work is
    done: 3 runs in 20 of the batch-size smoke study on a loaded 2-core machine. Nothing is left to do at that
    point: the study's files are closed and the process group is destroyed.
    """
    from .trainer import torchrun_world_size

    status = main()
    if torchrun_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
