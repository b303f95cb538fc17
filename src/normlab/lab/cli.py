"""The ``normlab`` command line."""

from __future__ import annotations

import argparse
import sys

import torch


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = DemoConfig()
    run_demo(DemoConfig(epochs=args.epochs or defaults.epochs, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description="Normalization beyond BatchNorm: the lab.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="BatchNorm vs GroupNorm at batch sizes 32 and 2 (about a minute on CPU)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default 8)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    demo.set_defaults(func=_demo)
    from ..doctor.cli import add_doctor_parser
    from ..export import add_export_parser

    add_doctor_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
