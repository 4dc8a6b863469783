"""UBT with the reference a defender has, at poison rates the defender does not know.

Every cell (world seed × attack × rate) trains — or loads from the threat-model cache — a tiny
CLIP on the poisoned synthetic world and judges it with a clean reference trained on a disjoint
world of the same look (``fastbd.world.independent_reference``: world seed + 2000), never on
the training pairs. Each cell runs UBT with its default split (``adaptive``) and ranking
(``cross-match``) and CleanCLIP (1,000 clean pairs of another disjoint world, as the demo); at
1 % also UBT with the paper's fixed 1 % split, UBT with the paper's ranking (``overfit``) and
ABL; zero-shot CA/ASR after each. Clean models — the clean CLIP of each seed's world and one trained
with another training seed — give the check statistic's distribution without a backdoor.

    python bench/rate_sweep.py --jobs 2                  # the full sweep (hours on 2 cores)
    python bench/rate_sweep.py --seeds 0 --rates 0.01    # a part of it
    python bench/rate_sweep.py --looks noisy,many-classes --seeds 0 --rates 0.01 \
        --attacks badnet,blended,sig --defenses ubt,cleanclip   # worlds of another look

``--looks`` runs the cells on worlds of another look (``fastbd.world.LOOKS``: noisier, fainter
objects, twice the classes), never used to choose UBT's constants.

Finished cells are kept in the JSON (``bench/results/rate-sweep-<machine>.json``) and skipped on a
rerun (``--redo ubt,ubt-fixed`` measures those defenses again in finished cells), so the sweep can
be run in parts and continued after an interruption; each run rewrites the "UBT rate sweep" section
of ``docs/results.md`` from everything in the JSON. Each worker uses one torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from results_doc import add_looks_flag, add_sweep_flags, look_of, world_label, write_section

from fastbd.world import LOOKS

ATTACKS = ("badnet", "blended", "sig", "wanet", "dualkey")
RATES = (0.005, 0.01, 0.02, 0.05)
UBT_VARIANTS = {"ubt": {}, "ubt-fixed": {"split": "fixed"}, "ubt-overfit": {"ranking": "overfit"}}
"""UBT as fastbd runs it, with the paper's fixed 1 % split, with the paper's overfit ranking."""
FULL_RATE = 0.01
"""The rate at which every variant and ABL run; at the others, UBT (fastbd's defaults) and
CleanCLIP only (the sweep's time on two cores)."""
CLEAN_PAIRS = 1000
DEFENSES = ("ubt", "ubt-fixed", "ubt-overfit", "cleanclip", "abl")


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def base_config(seed: int, rate: float | None, attack: str = "none", look: str = "default"):
    """The demo's threat config for ``seed`` on a world of ``look`` (``LOOKS``; the default look
    gives the same cache entries as the demo where ``rate`` is the world's own rate for
    ``attack``)."""
    from fastbd.world import CLIPThreatConfig, WorldConfig, with_look, world_rate

    return CLIPThreatConfig(world=with_look(WorldConfig(seed=seed), look), seed=seed,
                            rate=None if rate == world_rate(attack) else rate)


def reference_model(seed: int, cache: str, look: str = "default"):
    """The seed's independent reference on its look (trained once, then cached)."""
    from fastbd.world import build_clip_threat, independent_reference

    return build_clip_threat(independent_reference(base_config(seed, None, look=look)),
                             cache_dir=cache, verbose=False)


def cell(seed: int, attack: str, rate: float, cache: str, only: frozenset[str] = frozenset(),
         look: str = "default") -> dict:
    """One attack at one rate on one seed's world of ``look``: every defense (those in ``only``
    where given), CA/ASR after each."""
    from fastbd.baselines import abl, cleanclip
    from fastbd.models.clip import tokenize
    from fastbd.ubt import Config, defend
    from fastbd.world import build_clip_threat, evaluate_clip
    from fastbd.world.synthetic import make_world

    base = base_config(seed, rate, attack, look)
    threat = build_clip_threat(replace(base, attack=attack), cache_dir=cache, verbose=False)
    reference = reference_model(seed, cache, look).model
    tokens = tokenize(threat.tokenizer, threat.poisoned.captions, base.model.context_length)
    truth = threat.poisoned.poison_mask
    images = threat.poisoned.images
    clean_world = make_world(replace(base.world, seed=seed + 1000, n_train=CLEAN_PAIRS, n_eval=1))
    clean = (clean_world.train.images,
             tokenize(threat.tokenizer, clean_world.train.captions, base.model.context_length))
    before = threat.evaluation
    out = {"look": look, "seed": seed, "attack": attack, "rate": rate,
           "poisoned_pairs": int(truth.sum()),
           "ca_before": before.clean_accuracy, "asr_before": before.asr, "defenses": {}}
    variants = UBT_VARIANTS if rate == FULL_RATE else {"ubt": {}}
    runs = {name: (lambda o=overrides: defend(threat.model, images, tokens, reference=reference,
                                              config=Config(**o), verbose=False))
            for name, overrides in variants.items()}
    runs["cleanclip"] = lambda: cleanclip(threat.model, *clean, verbose=False)
    if rate == FULL_RATE:
        runs["abl"] = lambda: abl(threat.model, images, tokens, reference=reference,
                                  verbose=False)
    for name, run in runs.items():
        if only and name not in only:
            continue
        start = time.process_time()
        result = run()
        seconds = time.process_time() - start
        after = evaluate_clip(result.model, threat.tokenizer, threat.world, attack,
                              base.target, seed, "cpu", threat.config.attack_options)
        summary = result.summary(truth)
        out["defenses"][name] = {
            "ca_after": after.clean_accuracy, "asr_after": after.asr, "cpu_s": seconds,
            **{k: summary[k] for k in ("suspicious", "suspicious_poisoned", "poisoned",
                                       "check_statistic", "topk_poisoned") if k in summary},
            **({"topk": len(summary["topk"])} if "topk" in summary else {})}
    return out


def clean_model(seed: int, training_seed: int, cache: str, look: str = "default") -> dict:
    """UBT on a clean model of seed ``seed``'s world of ``look`` (trained with
    ``training_seed``), judged by the seed's independent reference: must decline and return it
    unchanged (``ca_after``: the zero-shot CA of what it returned — what a wrong verdict
    cost)."""
    import torch

    from fastbd.models.clip import tokenize
    from fastbd.ubt import defend
    from fastbd.world import build_clip_threat, evaluate_clip

    base = base_config(seed, None, look=look)
    threat = build_clip_threat(replace(base, attack="none", seed=training_seed,
                                       train=replace(base.train, seed=training_seed)),
                               cache_dir=cache, verbose=False)
    tokens = tokenize(threat.tokenizer, threat.poisoned.captions, base.model.context_length)
    result = defend(threat.model, threat.poisoned.images, tokens,
                    reference=reference_model(seed, cache, look).model, verbose=False)
    unchanged = all(torch.equal(a, b) for a, b in zip(
        threat.model.state_dict().values(), result.model.state_dict().values(), strict=True))
    ca_after = threat.evaluation.clean_accuracy if unchanged else evaluate_clip(
        result.model, threat.tokenizer, threat.world, "badnet", base.target, seed, "cpu",
        threat.config.attack_options).clean_accuracy
    return {"look": look, "seed": seed, "training_seed": training_seed,
            "ca": threat.evaluation.clean_accuracy, "ca_after": ca_after,
            "check_statistic": result.check_statistic, "declined": not result.poisoned,
            "unchanged": unchanged, "suspicious": int(result.suspicious.numel())}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def tables(results: dict) -> str:
    """The sweep's markdown: one row per cell and defense, the clean models, the check's
    distribution and the targets' verdicts (over every cell, then per look other than the
    default)."""
    lines = ["| world | attack | rate | CA / ASR before | defense | suspicious (poisoned) | "
             "top (poisoned) | check | CA after | ASR after |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    cells = sorted(results["cells"], key=lambda c: (list(LOOKS).index(look_of(c)), c["seed"],
                                                      ATTACKS.index(c["attack"]), c["rate"]))
    for c in cells:
        first = True
        for name, d in c["defenses"].items():
            head = (f"| {world_label(c)} | {c['attack']} | {100 * c['rate']:g} % | "
                    f"{_pct(c['ca_before'])} / {_pct(c['asr_before'])} |" if first
                    else "| | | | |")
            first = False
            susp = (f"{d['suspicious']} ({d['suspicious_poisoned']})"
                    if d.get("suspicious") else "–")
            top = f"{d['topk']} ({d['topk_poisoned']})" if "topk" in d else "–"
            check = (f"{d['check_statistic']:.2f}{'' if d['poisoned'] else ' declined'}"
                     if "check_statistic" in d else "–")
            lines.append(f"{head} {name} | {susp} | {top} | {check} | {_pct(d['ca_after'])} | "
                         f"{_pct(d['asr_after'])} |")
    clean = sorted(results["clean"], key=lambda m: (list(LOOKS).index(look_of(m)), m["seed"],
                                                     m["training_seed"]))
    lines += ["", "| clean model (world, training seed) | CA | suspicious | check | "
              "declined, unchanged | CA after |", "|---|---:|---:|---:|---|---:|"]
    for m in clean:
        after = m.get("ca_after", m["ca"] if m["unchanged"] else None)
        lines.append(f"| {world_label(m)}, {m['training_seed']} | {_pct(m['ca'])} | "
                     f"{m['suspicious']} | {m['check_statistic']:.2f} | "
                     f"{'yes' if m['declined'] and m['unchanged'] else 'NO'} | "
                     f"{'–' if after is None else _pct(after)} |")
    lines += ["", verdict(cells, clean)]
    for look in LOOKS:
        if look != "default" and any(look_of(c) == look for c in cells):
            lines += ["", f"On the {look} look alone: " + verdict(
                [c for c in cells if look_of(c) == look], [m for m in clean if look_of(m) == look])]
    return "\n".join(lines)


def verdict(cells: list[dict], clean: list[dict]) -> str:
    """The issue's targets over the cells whose ASR before is ≥ 20 %: UBT's ASR after ≤ 1 %,
    CA drop ≤ 1 point, ASR after ≤ CleanCLIP's; every clean model declined; the margin between
    the clean and the poisoned check statistics."""
    judged = [c for c in cells if c["asr_before"] >= 0.2]
    misses = []
    for c in judged:
        ubt = c["defenses"]["ubt"]
        name = f"{c['attack']} {100 * c['rate']:g} % world {world_label(c)}"
        if ubt["asr_after"] > 0.01:
            misses.append(f"{name}: ASR after {_pct(ubt['asr_after'])} %")
        if c["ca_before"] - ubt["ca_after"] > 0.01:
            misses.append(f"{name}: CA −{_pct(c['ca_before'] - ubt['ca_after'])}")
        if "cleanclip" in c["defenses"] and ubt["asr_after"] > c["defenses"]["cleanclip"][
                "asr_after"]:
            misses.append(f"{name}: ASR above CleanCLIP's")
    poisoned = [c["defenses"]["ubt"]["check_statistic"] for c in judged]
    clean_stats = [m["check_statistic"] for m in clean]
    lines = [f"Cells with ASR before ≥ 20 %: {len(judged)} of {len(cells)}; "
             f"targets missed: {len(misses)}" + ("" if not misses else
                                                 " — " + "; ".join(misses)) + "."]
    if poisoned and clean_stats:
        lines.append(f"Check statistic: poisoned models (ASR ≥ 20 %) {min(poisoned):.2f} to "
                     f"{max(poisoned):.2f}, clean models {min(clean_stats):.2f} to "
                     f"{max(clean_stats):.2f} (threshold 0.50); margin "
                     f"{min(poisoned) - max(clean_stats):.2f}; clean models declined: "
                     f"{sum(m['declined'] for m in clean)} of {len(clean)}.")
    return "\n\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="world seeds, comma-separated")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    add_looks_flag(parser)
    parser.add_argument("--defenses", default=",".join(DEFENSES),
                        help="defenses run in new cells (the others are left out of them)")
    add_sweep_flags(parser, "rate-sweep", "cells")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    looks = args.looks
    defenses = frozenset(args.defenses.split(","))
    unknown = sorted(defenses - set(DEFENSES))
    if unknown:
        parser.error(f"unknown defense(s) {', '.join(unknown)}; known: {', '.join(DEFENSES)}")
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {"cells": [], "clean": []}
    results.setdefault("cells", [])
    results.setdefault("clean", [])
    done = {(look_of(c), c["seed"], c["attack"], c["rate"]): c for c in results["cells"]}
    wanted = [(look, s, a, float(r)) for look in looks for s in seeds
              for a in args.attacks.split(",") for r in args.rates.split(",")]
    redo = frozenset(filter(None, args.redo.split(",")))
    todo = [job for job in wanted if job not in done]
    again = [job for job in wanted if job in done
             and redo & set(done[job]["defenses"])] if redo else []
    checked = {(look_of(m), m["seed"], m["training_seed"]) for m in results["clean"]}
    clean_todo = [(look, s, t) for look in looks for s in seeds for t in (s, s + 100)
                  if (look, s, t) not in checked]

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    with ProcessPoolExecutor(args.jobs, initializer=_threads) as pool:
        references = [(s, look) for look in looks for s in seeds]
        list(pool.map(reference_model, [s for s, _ in references], [args.cache] * len(references),
                      [look for _, look in references]))
        futures = [pool.submit(clean_model, s, t, args.cache, look) for look, s, t in clean_todo]
        futures += [pool.submit(cell, *job[1:], args.cache, defenses, job[0]) for job in todo]
        futures += [pool.submit(cell, *job[1:], args.cache, redo, job[0]) for job in again]
        for future in futures:
            row = future.result()
            key = (look_of(row), row.get("seed"), row.get("attack"), row.get("rate"))
            if key in done and "training_seed" not in row:
                done[key]["defenses"].update(row.pop("defenses"))
                done[key].update(row)
            else:
                results["clean" if "training_seed" in row else "cells"].append(row)
            save()
            print(json.dumps(row), flush=True)
    text = tables(results)
    if not args.no_docs:
        write_section("ubt-rate-sweep", "## UBT rate sweep (`bench/rate_sweep.py`)\n\n"
                      "Independent reference (a disjoint world of the same look), tiny CLIPs on "
                      "5,000 pairs, zero-shot CA / ASR (%) on 1,000 eval images, one thread per "
                      "cell, 2-core AMD EPYC. The world column is the world seed, prefixed by "
                      "its look where it is not the default one (`fastbd.world.LOOKS`: "
                      + "; ".join(f"{name}: {', '.join(f'{k} = {v}' for k, v in o.items())}"
                                  for name, o in LOOKS.items() if o)
                      + " — never used to choose UBT's constants).\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
