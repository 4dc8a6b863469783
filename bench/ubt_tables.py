"""The UBT paper's comparison on the embedded world: Table III (CA, ASR and KL to a model
retrained on clean data, for no defense / CleanCLIP / RoCLIP / UBT under each attack), Table VII's
retrieval ASR, Table VIII's training and defense times, Table I (UBT against every attack,
TrojVQA's optimised patch included), Table II (ABL as the paper runs it, with
and without UBT's text mask), Table IV (UBT's unlearning ablation: gradient ascent only, image
mask, image + text mask, text mask = UBT), Table V (the defenses on a clean model) and Table IX
(BadNet at the paper's poison counts, as shares of the world's pairs).

Every cell uses the world's CLIP threat of its attack (5,000 32-px pairs, 1 % poisoned, WaNet
10 %; a tiny CLIP trained 8 epochs from scratch) and, for UBT, the independent reference (the
same CLIP trained on a disjoint world of the same look, ``independent_reference``); CleanCLIP
fine-tunes on 1,000 clean pairs of another fresh world, as ``fastbd demo ubt`` does; RoCLIP
trains the tiny CLIP on the poisoned pairs with its caption pool instead of the plain loss
(the same schedule). KL is ``fastbd.eval.zeroshot.zero_shot_kl`` against the CLIP trained on the
world's pairs without the poison (an evaluation's ground truth, never given to a defense). The
world is not CC3M and the threat model is trained from scratch, not a fine-tuned pre-trained
CLIP: the paper's numbers are quoted beside ours for their ordering, not for equality.

    python bench/ubt_tables.py --jobs 2                 # seed 0, every cell (~20 min, 2 cores)
    python bench/ubt_tables.py --seeds 0,1,2 --jobs 2

Finished cells are kept in ``bench/results/ubt-tables-<machine>.json`` and skipped on a rerun
(``--redo ubt,ubt-ga`` measures those methods' cells again); each run rewrites the "UBT tables"
section of ``docs/results.md``. One torch thread per worker; defense seconds are CPU seconds
(``time.process_time``) of that worker, training seconds those recorded with the cached model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from results_doc import add_sweep_flags, write_section

ATTACKS = ("badnet", "blended", "sig", "wanet", "trojvqa", "ssba")
METHODS = ("none", "cleanclip", "roclip", "ubt")
ABLATION_ATTACKS = ("badnet", "blended")
TABLE_II = ("none", "abl-paper", "abl-paper-textmask", "ubt")
TABLE_IV = ("none", "ubt-ga", "ubt-image", "ubt-image-text", "ubt")
TABLE_V = ("none", "cleanclip", "ubt")
VARIANTS = {"abl-paper": {}, "abl-paper-textmask": {"masked_captions": True},
            "ubt-ga": {"masked_captions": False},
            "ubt-image": {"masked_captions": False, "masked_images": True},
            "ubt-image-text": {"masked_images": True}}
"""The ablation rows: ABL (``ABLPaperConfig``) or UBT (``fastbd.ubt.Config``) fields."""
PAPER_TABLE_II = {
    "badnet": {"none": (62.61, 80.92), "abl-paper": (51.55, 89.63),
               "abl-paper-textmask": (51.57, 89.56), "ubt": (61.51, 0.00)},
    "blended": {"none": (62.58, 97.99), "abl-paper": (50.67, 99.95),
                "abl-paper-textmask": (50.69, 99.94), "ubt": (60.60, 0.08)}}
PAPER_TABLE_IV = {
    "badnet": {"none": (62.61, 80.92), "ubt-ga": (61.29, 0.01), "ubt-image": (61.20, 0.15),
               "ubt-image-text": (61.02, 0.02), "ubt": (61.51, 0.00)},
    "blended": {"none": (62.58, 97.99), "ubt-ga": (60.81, 0.16), "ubt-image": (59.90, 0.20),
                "ubt-image-text": (60.33, 0.15), "ubt": (60.56, 0.08)}}
PAPER_TABLE_V = {"none": 62.69, "cleanclip": 59.38, "ubt": 62.69}
PAPER_TABLE_I = {"badnet": ((62.61, 80.92), (61.51, 0.00)),
                 "blended": ((62.58, 97.99), (60.60, 0.08)),
                 "sig": ((62.77, 90.90), (62.70, 0.27)),
                 "trojvqa": ((62.45, 96.19), (62.13, 0.00)),
                 "ssba": ((62.77, 66.22), (62.20, 4.33))}
"""The paper's Tables II and IV (CA %, ASR %), V (CA % of a clean model) and I (CA %, ASR %
without defense and with UBT)."""
PAPER_TABLE_III = {
    "badnet": {"none": (62.61, 80.92, 0.035), "cleanclip": (58.95, 14.6, 0.263),
               "roclip": (61.04, 63.41, 0.145), "ubt": (61.51, 0.00, 0.074)},
    "blended": {"none": (62.58, 97.99, 0.034), "cleanclip": (59.43, 2.24, 0.150),
                "roclip": (60.36, 31.09, 0.142), "ubt": (60.60, 0.08, 0.072)},
    "sig": {"none": (62.77, 90.90, 0.035), "cleanclip": (59.44, 48.48, 0.787),
            "roclip": (60.82, 80.20, 0.143), "ubt": (62.70, 0.27, 0.039)},
    "ssba": {"none": (62.77, 66.22, 0.036), "cleanclip": (58.90, 15.53, 0.199),
             "roclip": (60.61, 40.05, 0.143), "ubt": (62.20, 4.33, 0.044)}}
"""The paper's Table III: CA %, ASR %, KL (CC3M, ImageNet-1K zero-shot)."""
PAPER_TABLE_VIII = {"none": (2826, None), "cleanclip": (2826, 11400), "roclip": (53946, None),
                    "ubt": (2826, 7402)}
"""The paper's Table VIII: training and defense seconds."""
PAPER_TABLE_IX = {750: ((62.80, 66.92), (61.87, 0.08)), 1000: ((62.79, 72.45), (61.81, 0.02)),
                  1500: ((62.61, 80.92), (61.51, 0.00)), 2000: ((62.72, 81.00), (61.95, 0.06)),
                  3000: ((62.29, 84.69), (62.08, 0.00)), 5000: ((62.74, 89.20), (61.77, 0.00))}
"""The paper's Table IX: BadNet with that many poisoned pairs of 500K, (CA %, ASR %) without
defense and with UBT."""
PAPER_PAIRS = 500_000
TABLE_IX = tuple(f"badnet@{count / PAPER_PAIRS:g}" for count in PAPER_TABLE_IX
                 if count / PAPER_PAIRS != 0.01)
"""Table IX's cells: BadNet at the paper's poison counts as shares of the pairs (1 %, the
world's own BadNet rate, is Table III's BadNet cell)."""


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def cells(seeds: list[int]) -> list[tuple[int, str, str]]:
    """Every (seed, attack, method) a table reads, each once."""
    wanted = [(attack, method) for attack in ATTACKS for method in METHODS]
    wanted += [(attack, method) for attack in ABLATION_ATTACKS for method in VARIANTS]
    wanted += [("none", method) for method in TABLE_V]
    wanted += [(attack, method) for attack in TABLE_IX for method in ("none", "ubt")]
    return [(seed, attack, method) for seed in seeds for attack, method in wanted]


def key(cell: tuple) -> str:
    return "/".join(str(part) for part in cell)


def threat_config(seed: int, attack: str):
    """The world's threat for ``attack`` — ``name@rate`` for another poison rate than the
    world's."""
    from fastbd.world import CLIPThreatConfig

    name, _, rate = attack.partition("@")
    return CLIPThreatConfig(attack=name, seed=seed, rate=float(rate) if rate else None)


def prepare(seed: int, attacks: list[str], cache: str) -> None:
    """Train (or find cached) every model the seed's cells of ``attacks`` read, one at a time,
    so that parallel cells never train the same cached model at once."""
    from fastbd.world import build_clip_threat, independent_reference

    base = threat_config(seed, "none")
    for config in (base, independent_reference(base),
                   *(threat_config(seed, attack) for attack in attacks)):
        build_clip_threat(config, cache_dir=cache, verbose=False)


def run(cell: tuple, cache: str) -> dict:
    """One defense of one attack: CA, ASR, retrieval ASR, KL to the retrained model, seconds.
    On the clean model (attack ``none``) ASR is measured with BadNet's trigger."""
    from fastbd.baselines import ABLPaperConfig, CleanCLIPConfig, RoCLIPObjective, abl, cleanclip
    from fastbd.eval.zeroshot import evaluate_zero_shot, zero_shot_kl
    from fastbd.models.clip import tokenize
    from fastbd.ubt import Config, defend
    from fastbd.world import (
        ZERO_SHOT_TEMPLATES,
        build_clip_threat,
        independent_reference,
        world_attack,
    )
    from fastbd.world.synthetic import make_world

    seed, attack, method = cell
    config = threat_config(seed, attack)
    threat = build_clip_threat(config, cache_dir=cache, verbose=False)
    retrained = build_clip_threat(replace(config, attack="none", rate=None), cache_dir=cache,
                                  verbose=False).model
    context = config.model.context_length
    training_s, defense_s, extra = threat.train_seconds, None, {}
    start = time.process_time()
    if method == "none":
        model = threat.model
    elif method == "roclip":
        defended = build_clip_threat(config, cache_dir=cache, verbose=False,
                                     objective=RoCLIPObjective())
        model, training_s = defended.model, defended.train_seconds
    elif method == "cleanclip":
        clean_world = make_world(replace(config.world, seed=config.world.seed + 1000,
                                         n_train=1000, n_eval=1))
        model = cleanclip(threat.model, clean_world.train.images,
                          tokenize(threat.tokenizer, clean_world.train.captions, context),
                          config=CleanCLIPConfig(), verbose=False).model
        defense_s = time.process_time() - start
    else:
        reference = build_clip_threat(independent_reference(config), cache_dir=cache,
                                      verbose=False).model
        tokens = tokenize(threat.tokenizer, threat.poisoned.captions, context)
        if method.startswith("abl"):
            model = abl(threat.model, threat.poisoned.images, tokens, reference=reference,
                        config=ABLPaperConfig(**VARIANTS[method]), verbose=False).model
        else:
            result = defend(threat.model, threat.poisoned.images, tokens, reference=reference,
                            config=Config(**VARIANTS.get(method, {})), verbose=False)
            model, extra = result.model, {"declined": not result.poisoned}
        defense_s = time.process_time() - start
    world = threat.world
    evaluation = evaluate_zero_shot(
        model, threat.tokenizer, world.eval.images, world.eval.labels, world.class_names,
        ZERO_SHOT_TEMPLATES, world_attack("badnet" if attack == "none" else config.attack,
                                          world.config.image_size, seed,
                                          threat.config.attack_options), config.target,
        tokens=tokenize(threat.tokenizer, world.eval.captions, context), seed=seed)
    kl = zero_shot_kl(model, retrained, threat.tokenizer, world.eval.images, world.class_names,
                      ZERO_SHOT_TEMPLATES)
    return {"key": key(cell), "seed": seed, "attack": attack, "method": method,
            "ca": evaluation.clean_accuracy, "asr": evaluation.asr,
            "retrieval_asr": evaluation.retrieval_asr, "kl": kl, "training_s": training_s,
            "defense_s": defense_s, "poisoned_pairs": int(threat.poisoned.poison_mask.sum()),
            **extra}


def _mean(rows: list[dict], name: str) -> float | None:
    values = [r[name] for r in rows if r.get(name) is not None]
    return sum(values) / len(values) if values else None


def _fmt(value, scale: float = 100, digits: int = 1) -> str:
    return "–" if value is None else f"{scale * value:.{digits}f}"


def tables(rows: list[dict]) -> str:
    """Markdown: Table III (with the paper's values), retrieval ASR, times; means over seeds."""
    seeds = sorted({r["seed"] for r in rows if r["attack"] in ATTACKS and r["method"] in METHODS})
    by = {}
    for r in rows:
        by.setdefault((r["attack"], r["method"]), []).append(r)
    lines = [f"Table III: seeds {', '.join(map(str, seeds))} (means over the seeds each table "
             "names). CA and ASR are zero-shot "
             "on the world's 1,000 evaluation images; KL = mean KL(retrained ‖ model) of the "
             "zero-shot class distributions; the last column is the paper's Table III (CC3M, "
             "ImageNet-1K zero-shot).", "",
             "| attack | defense | CA % | ASR % | KL | retrieval ASR % | paper CA / ASR / KL |",
             "|---|---|---:|---:|---:|---:|---|"]
    for attack in ATTACKS:
        for method in METHODS:
            group = by.get((attack, method))
            if not group:
                continue
            paper = PAPER_TABLE_III.get(attack, {}).get(method)
            quoted = "–" if paper is None else f"{paper[0]:.2f} / {paper[1]:.2f} / {paper[2]:.3f}"
            lines.append(f"| {attack} | {method} | {_fmt(_mean(group, 'ca'))} | "
                         f"{_fmt(_mean(group, 'asr'))} | {_fmt(_mean(group, 'kl'), 1, 3)} | "
                         f"{_fmt(_mean(group, 'retrieval_asr'))} | {quoted} |")
    lines += ["", "Training and defense time (Table VIII; means over attacks and seeds): "
              "training s are the wall seconds recorded when the cached model was trained (one "
              "thread; RoCLIP's defense is its training), defense s the CPU seconds of the "
              "defense's worker:", "",
              "| defense | training s | defense s | total s | paper training / defense s |",
              "|---|---:|---:|---:|---|"]
    for method in METHODS:
        group = [r for r in rows if r["method"] == method and r["attack"] in ATTACKS]
        if not group:
            continue
        train, defense = _mean(group, "training_s"), _mean(group, "defense_s")
        paper = PAPER_TABLE_VIII[method]
        lines.append(f"| {method} | {train:.0f} | {_fmt(defense, 1, 0)} | "
                     f"{train + (defense or 0):.0f} | {paper[0]} / {paper[1] or '–'} |")
    lines += ["", "Table I — UBT against each attack (TrojVQA: dual-key with the patch optimised "
              "against an attacker's surrogate CLIP towards a semantic target that is neither "
              "the target nor a class, `fastbd.attacks.optimise_patch`; SSBA: "
              "per-image residuals of a steganography encoder trained on the world, "
              "`fastbd.attacks.ssba`):", "",
              "| attack | CA % before → after | ASR % before → after | paper before → after |",
              "|---|---|---|---|"]
    for attack in ATTACKS:
        before, after = by.get((attack, "none")), by.get((attack, "ubt"))
        if before and after:
            paper = PAPER_TABLE_I.get(attack)
            quoted = ("–" if paper is None else
                      f"{paper[0][0]:.2f} / {paper[0][1]:.2f} → {paper[1][0]:.2f} / "
                      f"{paper[1][1]:.2f}")
            lines.append(f"| {attack} | {_fmt(_mean(before, 'ca'))} → {_fmt(_mean(after, 'ca'))}"
                         f" | {_fmt(_mean(before, 'asr'))} → {_fmt(_mean(after, 'asr'))} | "
                         f"{quoted} |")
    for title, methods, paper in (
            ("Table II — ABL as the paper runs it (fixed 1 % split, batch 64, lr 1e-6, 10 "
             "epochs), with UBT's text mask, and UBT", TABLE_II, PAPER_TABLE_II),
            ("Table IV — UBT's unlearning: gradient ascent only (GA), image mask + GA (occlusion "
             "relevance on a 7 × 7 grid), image + text mask + GA, text mask + GA (UBT)",
             TABLE_IV, PAPER_TABLE_IV)):
        measured = sorted({r["seed"] for r in rows if r["method"] in methods
                           and r["attack"] in ABLATION_ATTACKS and r["method"] in VARIANTS})
        title += f" (seeds {', '.join(map(str, measured)) or '–'})"
        lines += ["", f"{title}:", "", "| attack | defense | CA % | ASR % | paper CA / ASR |",
                  "|---|---|---:|---:|---|"]
        for attack in ABLATION_ATTACKS:
            for method in methods:
                group = [r for r in by.get((attack, method), []) if r["seed"] in measured]
                if group:
                    quoted = paper[attack][method]
                    lines.append(f"| {attack} | {method} | {_fmt(_mean(group, 'ca'))} | "
                                 f"{_fmt(_mean(group, 'asr'))} | "
                                 f"{quoted[0]:.2f} / {quoted[1]:.2f} |")
    clean_seeds = sorted({r["seed"] for r in rows if r["attack"] == "none"})
    lines += ["", "Table V — the defenses on a clean model (the world without poison; ASR with "
              f"BadNet's trigger; seeds {', '.join(map(str, clean_seeds)) or '–'}):", "",
              "| defense | CA % | ASR % | KL | paper CA |", "|---|---:|---:|---:|---:|"]
    for method in TABLE_V:
        group = by.get(("none", method))
        if group:
            lines.append(f"| {method} | {_fmt(_mean(group, 'ca'))} | "
                         f"{_fmt(_mean(group, 'asr'))} | {_fmt(_mean(group, 'kl'), 1, 3)} | "
                         f"{PAPER_TABLE_V[method]:.2f} |")
    ix_seeds = sorted({r["seed"] for r in rows if r["attack"] in TABLE_IX})
    lines += ["", "Table IX — BadNet with the paper's poison counts (of its 500K pairs) as shares "
              f"of the world's 5,000 (seeds {', '.join(map(str, ix_seeds)) or '–'}; 1 % is "
              "Table III's BadNet):", "",
              "| paper's poisoned pairs | share | poisoned pairs here | CA % before → after | "
              "ASR % before → after | paper before → after |", "|---:|---:|---:|---|---|---|"]
    for count, paper in PAPER_TABLE_IX.items():
        share = count / PAPER_PAIRS
        attack = "badnet" if share == 0.01 else f"badnet@{share:g}"
        before = [r for r in by.get((attack, "none"), []) if r["seed"] in ix_seeds]
        after = [r for r in by.get((attack, "ubt"), []) if r["seed"] in ix_seeds]
        if before and after:
            pairs = before[0].get("poisoned_pairs", "–")
            lines.append(f"| {count} | {100 * share:.2f} % | {pairs} | "
                         f"{_fmt(_mean(before, 'ca'))} → {_fmt(_mean(after, 'ca'))} | "
                         f"{_fmt(_mean(before, 'asr'))} → {_fmt(_mean(after, 'asr'))} | "
                         f"{paper[0][0]:.2f} / {paper[0][1]:.2f} → {paper[1][0]:.2f} / "
                         f"{paper[1][1]:.2f} |")
    declined = [r["key"] for r in rows if r.get("declined")]
    if declined:
        lines += ["", f"UBT's check declined (model returned unchanged): {', '.join(declined)}."]
    return "\n".join(lines)


def plan(rows: list[dict], seeds: list[int], attacks: set[str], redo: set[str]
         ) -> tuple[list[dict], list[tuple[int, str, str]]]:
    """The rows kept and the cells to run for ``seeds`` and ``attacks`` (empty: every attack):
    the cells not finished, and those of the ``redo`` methods measured again — only the asked
    seeds' and attacks' rows of those methods are dropped."""
    wanted = [c for c in cells(seeds) if not attacks or c[1] in attacks]
    again = {key(c) for c in wanted if c[2] in redo}
    kept = [r for r in rows if r["key"] not in again]
    done = {r["key"] for r in kept}
    return kept, [c for c in wanted if key(c) not in done]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--attacks", default="",
                        help="only these attacks' cells (comma-separated; 'none' = the clean "
                             "model, 'badnet@0.002' = a Table IX cell); default every cell")
    add_sweep_flags(parser, "ubt-tables", "cells")
    args = parser.parse_args()
    _threads()
    seeds = [int(s) for s in args.seeds.split(",")]
    path = Path(args.json)
    saved = json.loads(path.read_text()) if path.is_file() else {"cells": []}
    saved["cells"], todo = plan(saved["cells"], seeds, set(filter(None, args.attacks.split(","))),
                                set(filter(None, args.redo.split(","))))
    for seed in sorted({c[0] for c in todo}):
        prepare(seed, list(dict.fromkeys(c[1] for c in todo if c[0] == seed)), args.cache)
    with ProcessPoolExecutor(args.jobs, initializer=_threads) as pool:
        for row in pool.map(run, todo, [args.cache] * len(todo)) if todo else []:
            saved["cells"].append(row)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=1))
            print(json.dumps(row), flush=True)
    text = tables(saved["cells"])
    if not args.no_docs:
        write_section("ubt-tables", "## UBT tables (`bench/ubt_tables.py`)\n\nOne thread per "
                      "cell, 2-core AMD EPYC.\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
