"""``fastbd demo ubt``: tiny CLIPs trained on the synthetic world (clean, and poisoned by each
CLIP attack), defended by UBT, CleanCLIP and ABL; a CA/ASR table before and after with each
defense's time, and the report directory."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fastbd.baselines import ABLConfig, CleanCLIPConfig, abl, cleanclip
from fastbd.models.clip import tokenize
from fastbd.storage import check_writable_dir, output_dir, write_text_atomically
from fastbd.ubt import Config, defend
from fastbd.world import (
    CLIPThreat,
    CLIPThreatConfig,
    build_clip_threat,
    evaluate_clip,
    independent_reference,
)
from fastbd.world.synthetic import make_world

log = logging.getLogger(__name__)
METHODS = ("ubt", "cleanclip", "abl")


@dataclass
class UBTDemoConfig:
    """What the demo runs. ``clean_pairs``: size of CleanCLIP's clean fine-tuning set, drawn
    from a fresh world of the same look (the paper's 100K clean pairs are 20 % of its 500K)."""

    attacks: tuple[str, ...] = ("badnet", "blended", "sig", "wanet", "dualkey")
    methods: tuple[str, ...] = METHODS
    threat: CLIPThreatConfig = field(default_factory=CLIPThreatConfig)
    ubt: Config = field(default_factory=Config)
    cleanclip: CleanCLIPConfig = field(default_factory=CleanCLIPConfig)
    abl: ABLConfig = field(default_factory=ABLConfig)
    clean_pairs: int = 1000

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown defenses {sorted(unknown)}; choose from {METHODS}")


@dataclass
class UBTDemoReport:
    rows: list[dict] = field(default_factory=list)
    threats: dict[str, dict] = field(default_factory=dict)

    def table(self) -> str:
        head = (f"{'model':<9} {'defense':<10} {'CA before':>9} {'ASR before':>10} "
                f"{'CA after':>8} {'ASR after':>9} {'top poisoned':>12} {'check':>7} "
                f"{'time s':>7}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            top = (f"{r['topk_poisoned']}/{r['topk']}" if r.get("topk") else "-")
            check = f"{r['check_statistic']:.2f}" if "check_statistic" in r else "-"
            lines.append(f"{r['attack']:<9} {r['method']:<10} {100 * r['ca_before']:>8.1f}% "
                         f"{100 * r['asr_before']:>9.1f}% {100 * r['ca_after']:>7.1f}% "
                         f"{100 * r['asr_after']:>8.1f}% {top:>12} {check:>7} "
                         f"{r['seconds']:>7.1f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "threats": self.threats}


def _defend(method: str, threat: CLIPThreat, reference: torch.nn.Module, tokens: torch.Tensor,
            clean: tuple[torch.Tensor, torch.Tensor], config: UBTDemoConfig,
            device: str | torch.device, verbose: bool):
    images = threat.poisoned.images
    if method == "ubt":
        return defend(threat.model, images, tokens, reference=reference, config=config.ubt,
                      device=device, verbose=verbose)
    if method == "cleanclip":
        return cleanclip(threat.model, *clean, config=config.cleanclip, device=device,
                         verbose=verbose)
    return abl(threat.model, images, tokens, reference=reference, config=config.abl,
               device=device, verbose=verbose)


def run(out: str | Path = "fastbd-out/demo/ubt", *, device: str | torch.device = "cpu",
        seed: int = 0, cache_dir: str | Path = "fastbd-out/cache", verbose: bool = True,
        config: UBTDemoConfig | None = None) -> UBTDemoReport:
    """Train (or load) the clean reference — on a disjoint world of the same look
    (``independent_reference``), as a defender's public model is trained on other data — a
    clean model and one poisoned CLIP per attack on the world, defend each with every method,
    evaluate zero-shot CA/ASR, write ``out/<attack>/<method>/`` and ``out/summary.json``. The
    clean model goes through UBT too: its check must decline."""
    config = config or UBTDemoConfig()
    out = check_writable_dir(out)
    base = replace(config.threat, seed=seed)
    reference = build_clip_threat(independent_reference(base), cache_dir=cache_dir,
                                  device=device, verbose=verbose)
    world_config = replace(base.world, seed=base.world.seed + 1000, n_train=config.clean_pairs,
                           n_eval=1)
    clean_world = make_world(world_config)
    clean = (clean_world.train.images,
             tokenize(reference.tokenizer, clean_world.train.captions,
                      base.model.context_length))
    report = UBTDemoReport()
    report.threats["reference"] = reference.to_dict()
    for attack in ("none", *config.attacks):
        threat = build_clip_threat(replace(base, attack=attack), cache_dir=cache_dir,
                                   device=device, verbose=verbose)
        report.threats[attack] = threat.to_dict()
        log.info("%s model: CA %.3f ASR %.3f", attack, threat.evaluation.clean_accuracy,
                 threat.evaluation.asr)
        tokens = tokenize(threat.tokenizer, threat.poisoned.captions, base.model.context_length)
        truth = threat.poisoned.poison_mask
        methods = ("ubt",) if attack == "none" else config.methods
        for method in methods:
            start = time.perf_counter()
            result = _defend(method, threat, reference.model, tokens, clean, config, device,
                             verbose)
            seconds = time.perf_counter() - start
            after = evaluate_clip(result.model, threat.tokenizer, threat.world,
                                  attack, base.target, seed, device, threat.config.attack_options)
            result.save(output_dir(out, attack, method), truth=truth, weights=method == "ubt",
                        tokens=tokens, tokenizer=threat.tokenizer)
            row = {"attack": attack, "method": method,
                   "ca_before": threat.evaluation.clean_accuracy,
                   "asr_before": threat.evaluation.asr, "ca_after": after.clean_accuracy,
                   "asr_after": after.asr, "seconds": seconds,
                   **{k: v for k, v in result.summary(truth).items()
                      if k in ("poisoned", "check_statistic", "topk_poisoned",
                               "suspicious_poisoned")}}
            if method == "ubt":
                row["topk"] = int(result.topk.numel())
            report.rows.append(row)
    write_text_atomically(json.dumps({**report.to_dict(), "config": asdict(config)}, indent=2,
                                     default=str), out / "summary.json")
    return report
