"""``fastbd loop ssl`` / ``fastbd loop clip``: the papers' whole loops in one command, each step
the ``fastbd`` command a user would run (in this process), ending with a CA/ASR table before
and after every detector or defense.

* ``ssl`` (PoisonCAM's Table I protocol): train the SSL threat model on the (poisoned) images →
  linear-probe CA/ASR → each detector → retrain the same way on its ``filtered.txt`` → CA/ASR.
* ``clip`` (UBT's): train the backdoored CLIP and a clean reference (on other pairs than the
  training pairs: ``--clean-csv``, or on the synthetic world a disjoint world of the same look)
  → zero-shot CA/ASR → each defense → CA/ASR of the defended model.

Without ``--file-list``/``--csv`` the loop first exports the poisoned synthetic world
(``fastbd attack``) and runs on those files. Each step writes its own sub-folder of ``--out``;
a rerun skips the steps that finished with the same command and continues an interrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

from fastbd.cli.common import add_command, add_device_flag, add_image_source_flags, prepare_out

log = logging.getLogger(__name__)
STEPS_FILE = "loop_steps.json"
"""The finished steps of a loop in ``--out``: each step's name and its command line."""


class Steps:
    """Runs a loop's steps, in order, through ``fastbd.cli.main``; a step whose command finished
    before (recorded in ``STEPS_FILE``, its result's manifest present) is skipped — until one
    step runs again, after which every later step runs too (its inputs may have changed)."""

    def __init__(self, out: Path, common: list[str]) -> None:
        self.out = out
        self.common = common
        self.path = out / STEPS_FILE
        try:
            self.done: dict[str, list[str]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.done = {}  # none yet, or unreadable: every step runs
        self.rerunning = False

    def run(self, name: str, argv: list[str]) -> Path:
        """Run ``fastbd <argv> --out <out>/<name>``; its output folder. A failed or
        interrupted step raises ``StepFailed`` with the command's exit status."""
        from fastbd.cli import main
        from fastbd.storage import MANIFEST, write_text_atomically

        folder = self.out / name
        argv = [*argv, "--out", str(folder)]
        if not self.rerunning and self.done.get(name) == argv and (folder / MANIFEST).is_file():
            return folder
        self.rerunning = True
        state = folder / "search_state.pt"
        if argv[0] in _detector_names() and state.is_file():
            if (folder / MANIFEST).is_file():
                state.unlink()  # a finished search, now redone with other inputs
            else:
                argv = [*argv, "--resume"]  # an interrupted one: continue it
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # each step's own summary: in its files
            status = main([*self.common, *argv])
        log.info("step %s (fastbd %s): exit %d after %.1f s", name, argv[0], status,
                 time.perf_counter() - start)
        if status != 0:
            raise StepFailed(name, status)
        self.done[name] = [a for a in argv if a != "--resume"]
        write_text_atomically(json.dumps(self.done, indent=1), self.path)
        return folder


class StepFailed(Exception):
    def __init__(self, step: str, status: int) -> None:
        super().__init__(f"step {step} ended with exit status {status}")
        self.step = step
        self.status = status


def _detector_names() -> set[str]:
    from fastbd import registry

    return set(registry.DETECTORS)


def _names(text: str, known: dict, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"--{what}: expected names among {', '.join(known)}, got {text!r}")
    return names


def _flag(name: str, value) -> list[str]:
    return [] if value is None else [name, str(value)]


def _trigger_flags(args: argparse.Namespace, exported_spec: Path | None) -> list[str]:
    """``eval``'s trigger flags: ``--trigger`` or ``--attack-spec`` when given, else the
    synthetic world export's own ``attack.json`` unless ``--attack`` names another, else
    ``--attack``."""
    if getattr(args, "trigger", None):
        return ["--trigger", args.trigger]
    if args.attack_spec:
        return ["--attack-spec", args.attack_spec]
    if exported_spec is not None and args.attack is None:
        return ["--attack-spec", str(exported_spec)]
    return ["--attack", args.attack or args.default_attack]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def cmd_loop(args: argparse.Namespace) -> int:
    ssl = args.kind == "ssl"
    args.arch = args.arch or ("smallconv16" if ssl else "tiny")
    args.default_attack = "htba" if ssl else args.poison
    out = prepare_out(args.out)
    common = ["--quiet"] if args.quiet else []
    seeds = _seed_list(args.seeds) if args.seeds else None
    per_seed = {}
    try:
        for seed in seeds or [args.seed]:
            run = copy.copy(args)  # a loop fills in defaults per run
            run.seed = seed
            steps = Steps(out / f"seed{seed}" if seeds else out, common)
            per_seed[seed] = ssl_loop(run, steps) if ssl else clip_loop(run, steps)
    except StepFailed as failed:
        print(f"fastbd loop: {failed}; rerun the same command to continue from it (finished "
              "steps are skipped)", file=sys.stderr)
        return failed.status
    from fastbd.storage import ResultFiles

    files = ResultFiles(out)
    if seeds:
        rows = aggregate_rows(per_seed)
        files.json("loop.json", {"kind": args.kind, "seeds": seeds, "rows": rows,
                                 "per_seed": {str(s): r for s, r in per_seed.items()}})
    else:
        rows = per_seed[args.seed]
        files.json("loop.json", {"kind": args.kind, "rows": rows})
    table = loop_table(args.kind, rows)
    files.text("loop.md", table + "\n")
    files.close()
    print(table)
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--seeds takes seeds separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds must be distinct non-negative seeds, got {text!r}")
    return seeds


def aggregate_rows(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Each row's CA and ASR (and removed images / suspicious pairs) over the seeds: the mean
    under the plain names, ``<name>_std`` the sample standard deviation (0 with one seed) and
    ``seeds`` how many runs had the row."""
    rows: dict[str, dict] = {}
    names = dict.fromkeys(name for runs in per_seed.values() for name in runs)
    for name in names:
        runs = [r[name] for r in per_seed.values() if name in r]
        row: dict[str, object] = {"seeds": len(runs)}
        for key in ("clean_accuracy", "asr", "removed", "suspicious"):
            values = [float(r[key]) for r in runs if r.get(key) is not None]
            if values:
                mean = sum(values) / len(values)
                spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                          if len(values) > 1 else 0.0)
                row[key], row[f"{key}_std"] = mean, spread ** 0.5
        rows[name] = row
    return rows


def ssl_loop(args: argparse.Namespace, steps: Steps) -> dict[str, dict]:
    from fastbd import registry
    from fastbd.eval.probe import ProbeConfig

    detectors = _names(args.detectors, registry.DETECTORS, "detectors")
    if args.file_list or args.image_folder:
        if not (args.val_list and args.probe_list):
            raise ValueError("--val-list (clean labelled images CA and ASR are measured on) and "
                             "--probe-list (clean labelled training images the linear probe "
                             "learns from — not the poisoned set, whose triggered images "
                             "would teach the probe the trigger) are needed with "
                             "--file-list/--image-folder")
        source = (["--file-list", args.file_list] if args.file_list
                  else ["--image-folder", args.image_folder])
        val_list, probe_list = args.val_list, args.probe_list
    else:
        data = steps.run("data", ["attack", "--attack", "htba", "--fraction",
                                  str(args.fraction), "--n-train", str(args.n_train), "--n-eval",
                                  str(args.n_eval), "--seed", str(args.seed)])
        source = ["--file-list", str(data / "train.txt")]
        val_list = str(data / "val.txt")
        probe_list = args.probe_list or str(data / "train_clean.txt")
        if args.labelled_fraction is None:  # the world's probe (ProbeConfig), as its figures
            args.labelled_fraction = ProbeConfig().labelled_fraction
        if args.config is None:  # the world's own threat-model training (SSLThreatConfig)
            args.config = str(world_ssl_config(steps.out))
    model = ["--arch", args.arch, *_flag("--image-size", args.image_size)]
    training = [*model, *_flag("--method", args.method), *_flag("--epochs", args.epochs),
                *(["--icutmix"] if args.icutmix else []),
                *_flag("--batch-size", args.batch_size), *_flag("--lr", args.lr),
                *_flag("--config", args.config), "--seed", str(args.seed),
                "--device", args.device, *(["--skip-bad"] if args.skip_bad else [])]
    trigger = _trigger_flags(args, None if args.file_list or args.image_folder else
                             Path(source[1]).parent / "attack.json")
    evaluation = [*model, "--train-list", probe_list, "--val-list", val_list, *trigger,
                  *_flag("--labelled-fraction", args.labelled_fraction),
                  *_flag("--trigger-side", args.trigger_side), "--target", str(args.target),
                  "--device", args.device, "--seed", str(args.seed)]

    def evaluated(name: str, checkpoint: Path) -> dict:
        folder = steps.run(f"eval-{name}", ["eval", "ssl", "--checkpoint", str(checkpoint),
                                            *evaluation])
        return _read_json(folder / "eval.json")

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint = steps.run("train-poisoned", ["train-ssl", *source, *training]) / "encoder.pt"
    rows = {"poisoned": {**evaluated("poisoned", checkpoint), "removed": 0}}
    for detector in detectors:
        found = steps.run(detector, [detector, *source, *model, "--checkpoint", str(checkpoint),
                                     *_flag("--preset", args.preset),
                                     *_flag("--config", args.detector_config),
                                     "--device", args.device,
                                     *(["--skip-bad"] if args.skip_bad else [])])
        result = _read_json(found / "result.json")
        retrained = steps.run(f"train-{detector}", ["train-ssl", "--file-list",
                                                    str(found / "filtered.txt"), *training])
        metrics = result.get("metrics") or {}
        rows[detector] = {**evaluated(detector, retrained / "encoder.pt"),
                          "removed": int(result["removed"]),
                          "backdoor": result.get("backdoor"),
                          "check": (result.get("check") or {}).get("statistic"),
                          "precision": metrics.get("precision"),
                          "recall": metrics.get("recall")}
    return rows


def world_ssl_config(out: Path) -> Path:
    """``SSLThreatConfig().ssl`` (the synthetic world's SimCLR recipe: 40 epochs, crops of
    50–100 % of the image) as a config file in ``out``, for the world loop's trainings."""
    from dataclasses import asdict

    from fastbd.storage import write_text_atomically
    from fastbd.world import SSLThreatConfig

    fields = asdict(SSLThreatConfig().ssl)
    fields.pop("seed")  # the loop's --seed sets it
    path, text = out / "world_ssl.json", json.dumps(fields, indent=1)
    if not path.is_file() or path.read_text() != text:  # a rerun leaves it as it was
        write_text_atomically(text, path)
    return path


def clip_loop(args: argparse.Namespace, steps: Steps) -> dict[str, dict]:
    from fastbd import registry
    from fastbd.world import REFERENCE_WORLD_OFFSET

    defenses = _names(args.defenses, registry.CLIP_DEFENSES, "defenses")
    columns = ["--image-key", args.image_key, "--caption-key", args.caption_key,
               "--separator", args.separator]
    if args.csv:
        if not (args.eval_csv and args.class_names):
            raise ValueError("--eval-csv and --class-names (the labelled pairs CA and ASR are "
                             "measured on, and their classes) are needed with --csv")
        train_csv, eval_csv, class_names = args.csv, args.eval_csv, args.class_names
        clean_csv = args.clean_csv
    else:
        world = ["attack", "--attack", args.poison, "--n-train", str(args.n_train), "--n-eval"]
        data = steps.run("data", [*world, str(args.n_eval), "--seed", str(args.seed),
                                  *_flag("--rate", args.rate)])
        train_csv, eval_csv = str(data / "train.csv"), str(data / "val.csv")
        class_names = str(data / "classes.txt")
        clean_csv = args.clean_csv
        if clean_csv is None:
            other = steps.run("reference-data", [
                *world, "1", "--seed", str(args.seed + REFERENCE_WORLD_OFFSET)])
            clean_csv = str(unpoisoned_rows(other / "train.csv", other / "clean.csv"))
    if args.reference_checkpoint is None and clean_csv is None and any(
            registry.CLIP_DEFENSES[d].needs_reference for d in defenses):
        raise ValueError("give --reference-checkpoint (a clean model) or --clean-csv (clean "
                         "pairs to train one on)")
    if "cleanclip" in defenses and clean_csv is None:
        raise ValueError("cleanclip fine-tunes on clean pairs: give --clean-csv")
    model = ["--arch", args.arch]
    training = [*model, *_flag("--image-size", args.image_size), *_flag("--epochs", args.epochs),
                *_flag("--batch-size", args.batch_size), *_flag("--lr", args.lr),
                *_flag("--config", args.config), "--seed", str(args.seed),
                "--device", args.device, *columns]
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint = steps.run("train-poisoned", ["train-clip", "--csv", train_csv,
                                                  *training]) / "clip.pt"
    if args.reference_checkpoint:
        reference = Path(args.reference_checkpoint)
    elif clean_csv:
        reference = steps.run("train-clean", ["train-clip", "--csv", clean_csv,
                                              *training]) / "clip.pt"
    else:
        reference = None
    trigger = _trigger_flags(args, None if args.csv else Path(train_csv).parent / "attack.json")
    evaluation = [*model, "--eval-csv", eval_csv, "--class-names", class_names,
                  *_flag("--templates", args.templates), *trigger,
                  "--target", str(args.target), "--device", args.device, "--seed",
                  str(args.seed), *columns]

    def evaluated(name: str, weights: Path) -> dict:
        folder = steps.run(f"eval-{name}", ["eval", "clip", "--checkpoint", str(weights),
                                            *evaluation])
        return _read_json(folder / "eval.json")

    rows = {"poisoned": evaluated("poisoned", checkpoint)}
    for defense in defenses:
        entry = registry.CLIP_DEFENSES[defense]
        pairs = train_csv if entry.pairs == "training" else clean_csv
        flags = [defense, "--csv", pairs, *model, "--checkpoint", str(checkpoint),
                 "--device", args.device, *columns]
        if entry.needs_reference:
            flags += ["--reference-checkpoint", str(reference)]
        folder = steps.run(defense, flags)
        result = _read_json(folder / "result.json")
        rows[defense] = {**evaluated(defense, folder / "model.pt"),
                         "suspicious": result.get("suspicious"),
                         "suspicious_poisoned": result.get("suspicious_poisoned")}
    return rows


def unpoisoned_rows(train_csv: Path, clean_csv: Path) -> Path:
    """The clean pairs of a synthetic-world export: the rows of its ``train.csv`` whose
    ``is_backdoor`` is 0. The loop reads them from a *disjoint* world of the same look (seed
    offset by ``REFERENCE_WORLD_OFFSET``), never from the world being defended, whose clean
    rows are ground truth no defender has."""
    from io import StringIO

    from fastbd.storage import write_text_atomically

    with open(train_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    text = StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(r for r in rows if r["is_backdoor"] == "0")
    return write_text_atomically(text.getvalue(), clean_csv)


def loop_table(kind: str, rows: dict[str, dict]) -> str:
    """The loop's markdown table: CA, ASR and what each detector removed (and its backdoor
    check's verdict) / defense suspected."""
    last = "removed" if kind == "ssl" else "suspicious (poisoned)"
    lines = [f"| model | CA % | ASR % | {last} |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        if "seeds" in row:  # aggregated over seeds: mean ± std
            count = "removed" if kind == "ssl" else "suspicious"
            lines.append(f"| {name} ({row['seeds']} seeds) | "
                         f"{_mean_std(row, 'clean_accuracy', 100)} | "
                         f"{_mean_std(row, 'asr', 100)} | {_mean_std(row, count, 1, 0)} |")
            continue
        if kind == "ssl":
            extra = str(row.get("removed", ""))
            if row.get("backdoor") is False:
                extra += f" (no backdoor found: check {row['check']:.2f})"
        elif row.get("suspicious") is None:
            extra = ""
        else:
            extra = f"{row['suspicious']} ({row.get('suspicious_poisoned', '?')})"
        lines.append(f"| {name} | {100 * row['clean_accuracy']:.1f} | "
                     f"{100 * row['asr']:.1f} | {extra} |")
    return "\n".join(lines)


def _mean_std(row: dict, key: str, scale: float, digits: int = 1) -> str:
    if key not in row:
        return ""
    return f"{scale * row[key]:.{digits}f} ± {scale * row[key + '_std']:.{digits}f}"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from fastbd.attacks import ATTACKS, CLIP_ATTACKS
    from fastbd.training.ssl import SSL_METHODS

    loop = add_command(sub, "loop", "a paper's whole loop in one command: train the threat "
                       "model, evaluate, detect or defend, (retrain,) evaluate again — a CA/ASR "
                       "table before and after", [
                           "fastbd loop ssl --out fastbd-out/loop-ssl",
                           "fastbd loop ssl --file-list train.txt --val-list val.txt --arch "
                           "resnet18 --image-size 96 --epochs 100 --detectors "
                           "poisoncam,patchsearch --device cuda --out fastbd-out/loop",
                           "fastbd loop clip --defenses ubt,abl --out fastbd-out/loop-clip",
                           "fastbd loop clip --csv train.csv --eval-csv val.csv --class-names "
                           "classes.txt --reference-checkpoint clean.pt --arch RN50 "
                           "--checkpoint poisoned.pt --device cuda"])
    loop.add_argument("kind", choices=("ssl", "clip"),
                      help="PoisonCAM's loop (SSL encoder, detectors, retraining) or UBT's "
                           "(CLIP, defenses)")
    loop.add_argument("--out", default="fastbd-out/loop", help="output folder (a sub-folder "
                      "per step)")
    loop.add_argument("--seed", type=int, default=0, help="seed of every step")
    loop.add_argument("--seeds", help="run the whole loop once per seed (e.g. 0,1,2,3,4, the "
                      "papers' five runs), each in <out>/seed<N>, and report the mean ± std "
                      "over them")
    loop.add_argument("--target", type=int, default=0, help="the attack's target class")
    loop.add_argument("--attack", choices=ATTACKS, help="the trigger ASR is measured with "
                      "(default: the synthetic world's planted trigger; on your files htba for "
                      "ssl, --poison for clip)")
    loop.add_argument("--attack-spec", help="the attack.json fastbd attack wrote for your "
                      "files: measure the trigger it planted")
    loop.add_argument("--trigger-side", type=float, help="ssl: patch trigger side as a "
                      "fraction of the image side (default 50/224)")
    loop.add_argument("--checkpoint", help="an existing poisoned model to start from instead "
                      "of training one (retraining still trains from scratch)")
    loop.add_argument("--arch", help="model architecture (default: smallconv16 for ssl, tiny "
                      "for clip)")
    loop.add_argument("--image-size", type=int, help="model input side (default: the model's)")
    loop.add_argument("--epochs", type=int, help="training epochs (default: the training "
                      "config's)")
    loop.add_argument("--batch-size", type=int, help="training batch size")
    loop.add_argument("--lr", type=float, help="training peak learning rate")
    loop.add_argument("--config", help="training config file (SSLConfig / CLIPTrainConfig "
                      "fields; ssl on the synthetic world: its threat model's recipe)")
    loop.add_argument("--n-train", type=int, default=5000,
                      help="synthetic world (no --file-list/--csv): training images")
    loop.add_argument("--n-eval", type=int, default=1000,
                      help="synthetic world: validation images")
    add_image_source_flags(loop, "ssl: the (possibly poisoned) training images")
    loop.add_argument("--val-list", help="ssl: clean '<path> <label>' list CA/ASR are "
                      "measured on")
    loop.add_argument("--probe-list", help="ssl: clean '<path> <label>' list the linear probe "
                      "trains on (--labelled-fraction of it, stratified; synthetic world: its "
                      "clean training images)")
    loop.add_argument("--labelled-fraction", type=float,
                      help="ssl: share of --probe-list the probe learns from (default 0.01, "
                           "the papers'; 0.10 on the synthetic world)")
    loop.add_argument("--trigger", help="ssl: a trigger image (PNG) whose ASR is measured")
    loop.add_argument("--icutmix", action="store_true",
                      help="ssl: train both encoders with i-CutMix (needs --method mocov3): "
                           "the 'poisoned' row is i-CutMix alone, each detector's row the "
                           "detector with i-CutMix")
    loop.add_argument("--method", choices=SSL_METHODS, help="ssl: self-supervised method "
                      "(default SimCLR)")
    loop.add_argument("--fraction", type=float, default=0.5,
                      help="ssl, synthetic world: share of the target class HTBA poisons")
    loop.add_argument("--detectors", default="poisoncam",
                      help="ssl: comma-separated detectors to compare")
    loop.add_argument("--preset", choices=("paper", "fast"), help="ssl: the detectors' preset")
    loop.add_argument("--detector-config", help="ssl: the detectors' config file")
    loop.add_argument("--skip-bad", action="store_true", help="ssl: skip unreadable images")
    loop.add_argument("--csv", help="clip: the (possibly poisoned) training pairs")
    loop.add_argument("--eval-csv", help="clip: labelled pairs CA/ASR/retrieval are measured "
                      "on")
    loop.add_argument("--class-names", help="clip: class names in label order (comma-separated, "
                      "a file, or 'imagenet')")
    loop.add_argument("--templates", help="clip: zero-shot prompt templates file, or 'openai'")
    loop.add_argument("--clean-csv", help="clip: clean pairs the reference model trains on and "
                      "CleanCLIP fine-tunes on — other pairs than the training pairs, as a "
                      "public model's data is (a model trained on the training pairs minus "
                      "the poison knows the answer); synthetic world: a disjoint world of the "
                      "same look")
    loop.add_argument("--reference-checkpoint", help="clip: a clean model (instead of training "
                      "one on --clean-csv)")
    loop.add_argument("--image-key", default="image", help="clip: the CSVs' image column")
    loop.add_argument("--caption-key", default="caption", help="clip: the CSVs' caption column")
    loop.add_argument("--separator", default=",", help="clip: the CSVs' column separator")
    loop.add_argument("--defenses", default="ubt", help="clip: comma-separated defenses")
    loop.add_argument("--poison", choices=CLIP_ATTACKS, default="badnet",
                      help="clip, synthetic world: the attack planted in the pairs")
    loop.add_argument("--rate", type=float, help="clip, synthetic world: poisoned share")
    add_device_flag(loop)
    loop.set_defaults(run=cmd_loop, continued_by_rerun=True)
