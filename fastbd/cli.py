"""The ``fastbd`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import torch

log = logging.getLogger("fastbd")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_env(args: argparse.Namespace) -> int:
    from fastbd.environment import environment_report

    report = environment_report()
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fastbd.environment import environment_report
    from fastbd.smoke import run_smoke

    if not args.quiet:
        print("\n".join(environment_report().lines()))
    result = run_smoke(args.device)
    path = result.save(args.out)
    print(f"\nops smoke run on {result.device}: each backend against the torch reference")
    print(f"{'op':<14} {'backend':<8} {'seconds':>9} {'max|err|':>10}  ok")
    for check in result.checks:
        print(f"{check.op:<14} {check.backend:<8} {check.seconds:>9.4f} "
              f"{check.max_abs_error:>10.2e}  {'yes' if check.ok else 'NO'}")
    print(f"\nwrote {path}")
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbd", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="versions, devices and available backends per op")
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(run=cmd_env)

    demo = sub.add_parser("demo", help="the main job on the embedded synthetic world")
    demo.add_argument("which", nargs="?", default="ops", choices=["ops"],
                      help="what to run (the ops smoke run for now)")
    demo.add_argument("--device", default=_default_device())
    demo.add_argument("--out", default="fastbd-out/demo", help="report directory")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
