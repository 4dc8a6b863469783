"""``fastbd demo`` (the main job on the embedded world) and ``fastbd env``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastbd.cli.common import add_command, add_device_flag


def cmd_env(args: argparse.Namespace) -> int:
    from fastbd.environment import environment_report

    report = environment_report()
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.which in ("poisoncam", "all"):
        from fastbd.demo.poisoncam import run

        start = time.perf_counter()
        report = run(Path(args.out) / "poisoncam", device=args.device, seed=args.seed,
                     retrain=args.retrain, cache_dir=args.cache, verbose=not args.quiet,
                     threat=args.threat)
        threat = report.threat
        print(f"SSL threat model ({threat['label']}, target class 0): linear-probe CA "
              f"{100 * threat['probe']['clean_accuracy']:.1f}%, ASR "
              f"{100 * threat['probe']['asr']:.1f}%"
              f" ({'cached' if threat['cached'] else 'trained'})")
        print(report.table())
        if report.retrain:
            before, after = report.retrain["before"], report.retrain["after"]
            print(f"retrained (plain SimCLR) on {report.retrain['kept_images']} kept images: CA "
                  f"{100 * before['clean_accuracy']:.1f}% -> {100 * after['clean_accuracy']:.1f}%"
                  f", ASR {100 * before['asr']:.1f}% -> {100 * after['asr']:.1f}%")
            if "unfiltered" in report.retrain:
                same = report.retrain["unfiltered"]
                print(f"retrained (plain SimCLR) on the unfiltered set: CA "
                      f"{100 * same['clean_accuracy']:.1f}%, ASR {100 * same['asr']:.1f}%")
        print(f"report: {Path(args.out) / 'poisoncam'} "
              f"({time.perf_counter() - start:.0f}s)")
        if args.which == "poisoncam":
            return 0
    if args.which in ("ubt", "all"):
        from fastbd.demo.ubt import run as run_ubt

        start = time.perf_counter()
        report = run_ubt(Path(args.out) / "ubt", device=args.device, seed=args.seed,
                         cache_dir=args.cache, verbose=not args.quiet)
        print(report.table())
        print(f"report: {Path(args.out) / 'ubt'} "
              f"({time.perf_counter() - start:.0f}s)")
        if args.which == "ubt":
            return 0
    return _ops_smoke(args)


def _ops_smoke(args: argparse.Namespace) -> int:
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    env = add_command(sub, "env", "versions, devices and available backends per op",
                      ["fastbd env", "fastbd env --json > env.json"])
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(run=cmd_env)

    demo = add_command(sub, "demo", "the main job on the embedded synthetic world",
                       ["fastbd demo", "fastbd demo poisoncam --out fastbd-out/demo",
                        "fastbd demo ops --device cuda"])
    demo.add_argument("which", nargs="?", default="all",
                      choices=["all", "poisoncam", "ubt", "ops"],
                      help="poisoncam: PoisonCAM vs PatchSearch on the poisoned SSL world; ubt: "
                      "UBT vs CleanCLIP and ABL on poisoned CLIPs; ops: the kernels against "
                      "their references; all: all three")
    add_device_flag(demo)
    demo.add_argument("--seed", type=int, default=0, help="seed of the worlds and the runs")
    demo.add_argument("--no-retrain", dest="retrain", action="store_false",
                      help="skip retraining the SSL encoder (plain SimCLR) on the cleaned set — "
                           "and, for a training-time attack, on the unfiltered set — and its "
                           "CA/ASR (retrained encoders are cached like the threat models)")
    demo.add_argument("--threat", choices=["implanted", "htba"], default="implanted",
                      help="poisoncam's SSL threat model: implanted (CorruptEncoder data + a "
                           "BadEncoder training-time attack: a real backdoor) or htba (the "
                           "papers' attack; implants none at this scale)")
    demo.add_argument("--cache", default="fastbd-out/cache", help="threat-model cache")
    demo.add_argument("--out", default="fastbd-out/demo", help="report directory")
    demo.set_defaults(run=cmd_demo, continued_by_rerun=True)
