"""One prepared GPU run: on a fresh GPU machine with the project copied to it, run the CUDA
tests, the kernels' compile check with the machine's Triton, every GPU benchmark and the scale
harness, each step under its own time limit, and write one JSON (``bench/results/<gpu>-<date>.json``
or ``--out``) plus the regenerated performance page.

    bench/gpu_validate.sh [--out DIR] [--budget-s 480]      # the wrapper: wheels, PYTHONPATH
    python bench/gpu_validate.py --dry-run                  # the plan, checked, no GPU needed

The GPU machines have torch, Triton, CuPy, timm and pytest but not open_clip; carry it and
its two missing needs as wheels in ``.whl/`` (git-ignored; the wrapper installs them):
``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4``.

Without a CUDA GPU visible to torch it stops at once with exit 2 and says so. A step that fails
or runs out of time is recorded and the next one runs; the JSON is rewritten after every step,
so a run cut short keeps what it measured. Exit 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    """A command (run from the repository root, ``{out}`` replaced by the output folder), the
    files it writes under ``{out}`` and its share of the time budget."""

    name: str
    command: tuple[str, ...]
    writes: tuple[str, ...]
    share: float


STEPS = (
    Step("environment", ("{python}", "-m", "fastbd", "env", "--json"), (), 0.02),
    Step("cuda_tests", ("{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                        "tests", "--timeout", "120"), (), 0.2),
    Step("kernel_compile", ("{python}", "bench/kernel_compile.py", "--json",
                            "{out}/kernel-compile.json"), ("kernel-compile.json",), 0.1),
    Step("gpu_benchmarks", ("{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                            "cuda", "bench", "--benchmark-json", "{out}/benchmarks.json",
                            "--benchmark-min-rounds", "3", "--timeout", "300"),
         ("benchmarks.json",), 0.35),
    Step("scale_harness", ("{python}", "bench/scale.py", "--size", "gpu", "--out",
                           "{out}/scale.json"), ("scale.json",), 0.33),
)
"""The run, in order. Shares of the budget sum to 1; the CUDA tests come first so a broken
kernel is seen before any timing."""


def gpu_slug() -> str:
    """``h200``, ``h100-sxm``, … from the device name (for the JSON's file name)."""
    import torch

    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def check_gpu() -> str | None:
    """None when a CUDA GPU is visible to torch, else why not (one line)."""
    try:
        import torch
    except ImportError:
        return "torch is not importable"
    if not torch.cuda.is_available():
        return (f"no CUDA GPU visible to torch {torch.__version__} (CUDA build "
                f"{torch.version.cuda or 'none'}); run this on the GPU machine")
    return None


def check_plan() -> list[str]:
    """The plan's problems: scripts that are missing, shares that do not sum to 1."""
    problems = [f"{step.name}: {part} does not exist" for step in STEPS
                for part in step.command if part.endswith(".py") and not (ROOT / part).is_file()]
    if abs(sum(step.share for step in STEPS) - 1.0) > 1e-9:
        problems.append("the steps' budget shares do not sum to 1")
    return problems


def run_step(step: Step, out: Path, budget_s: float, python: str) -> dict:
    command = [part.format(out=out, python=python) for part in step.command]
    limit = max(30.0, step.share * budget_s)
    start = time.perf_counter()
    record = {"command": " ".join(command), "limit_s": limit}
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=limit, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        record.update(returncode=done.returncode, passed=done.returncode == 0,
                      output_tail=(done.stdout + done.stderr)[-4000:])
        if step.name == "environment" and done.returncode == 0:
            record["report"] = json.loads(done.stdout)
    except subprocess.TimeoutExpired as timeout:
        record.update(returncode=None, passed=False, timed_out=True,
                      output_tail=((timeout.stdout or b"").decode(errors="replace")
                                   if isinstance(timeout.stdout, bytes)
                                   else timeout.stdout or "")[-4000:])
    record["seconds"] = time.perf_counter() - start
    for name in step.writes:
        path = out / name
        if path.is_file():
            record[name] = json.loads(path.read_text())
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the step files (default bench/results)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="the whole run's time limit, shared among the steps")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the plan and print it; needs no GPU")
    args = parser.parse_args(argv)
    problems = check_plan()
    if problems:
        print("gpu_validate: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.dry_run:
        for step in STEPS:
            print(f"{step.name:<16} {step.share * args.budget_s:>5.0f} s  "
                  f"{' '.join(step.command)}")
        return 0
    why = check_gpu()
    if why:
        print(f"gpu_validate: {why}", file=sys.stderr)
        return 2
    from fastbd.storage import write_text_atomically

    out = Path(args.out or ROOT / "bench" / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / f"{gpu_slug()}-{time.strftime('%Y-%m-%d')}.json"
    result = {"gpu": None, "budget_s": args.budget_s, "steps": {}}
    for step in STEPS:
        print(f"gpu_validate: {step.name} …", flush=True)
        record = run_step(step, out, args.budget_s, sys.executable)
        result["steps"][step.name] = record
        if step.name == "environment" and "report" in record:
            result["gpu"] = record["report"].get("cuda_devices")
        write_text_atomically(json.dumps(result, indent=2, default=str), result_path)
        print(f"gpu_validate: {step.name} {'passed' if record['passed'] else 'FAILED'} in "
              f"{record['seconds']:.0f} s", flush=True)
    if (out / "scale.json").is_file():
        benchmarks = (["--benchmarks", str(out / "benchmarks.json")]
                      if (out / "benchmarks.json").is_file() else [])
        page = subprocess.run([sys.executable, "bench/scale.py", "--page",
                               str(out / "scale.json"), *benchmarks],
                              cwd=ROOT, capture_output=True, text=True)
        if page.returncode == 0:
            write_text_atomically(page.stdout, out / "performance.md")
    print(f"gpu_validate: wrote {result_path}")
    return 0 if all(r["passed"] for r in result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
