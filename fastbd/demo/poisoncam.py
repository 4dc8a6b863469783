"""``fastbd demo poisoncam``: build the poisoned world, train (or load) the SSL threat model,
run PoisonCAM and PatchSearch side by side, then PoisonCAM on the same world with no attack at
all (clean images, plain SSL: its backdoor check must find none and remove nothing), and write
the report directory. The threat model is
``implanted`` (CorruptEncoder's poisoned set, the encoder backdoored by a training-time
BadEncoder fine-tune: a real backdoor) or ``htba`` (the papers' attack, which implants none at
this scale). With ``retrain``, an encoder is trained again with plain SimCLR on the set
PoisonCAM cleaned — and, for a training-time attack, on the unfiltered set too, so what the
filter changes is visible — and probed for CA/ASR."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fastbd import registry
from fastbd.detection import Config, DetectionResult, preset
from fastbd.eval.probe import linear_probe
from fastbd.models.encoders import small_encoder
from fastbd.storage import check_writable_dir, output_dir, save_atomically, write_text_atomically
from fastbd.training.ssl import train_ssl
from fastbd.world import SSLThreatConfig, build_ssl_threat, implanted_ssl_threat
from fastbd.world.threats import SSL_CACHE_VERSION, config_hash, load_cached

log = logging.getLogger(__name__)


def demo_config(seed: int = 0) -> Config:
    """PoisonCAM's config for the 5,000-image, 32-px demo world: 50 clusters (~100 images
    each, like ImageNet-100's ~127), 64 masks, 150 test images, and a poison classifier of one
    width-16 ResNet (at most 300 steps of 64) on a cleaned pool, with triggers pasted at 40–80
    px of 224 (6–11 px: the paper's 20-px minimum is 3 px here, a few pixels of colour that clean
    textures match) and Otsu's threshold (docs/methods.md, "The poison classifier")."""
    return replace(preset("fast"), n_clusters=50, batch_size=1024, seed=seed)


THREATS = {"implanted": implanted_ssl_threat, "htba": lambda seed: SSLThreatConfig(seed=seed)}
"""The demo's SSL threat models by name (a seed → ``SSLThreatConfig``)."""


def threat_label(config: SSLThreatConfig) -> str:
    """What made the threat model, for every output: the data attack and any training-time
    attack."""
    data = {"htba": "HTBA", "corruptencoder": "CorruptEncoder",
            "corruptencoder+": "CorruptEncoder+"}.get(config.attack, config.attack)
    if config.training_attack == "none":
        return f"{data} data poisoning"
    return f"{data} data poisoning + {config.training_attack} training-time attack"


DEMO_DETECTORS = ("poisoncam", "patchsearch", "patchsearch-published")
"""The detectors the demo compares: PoisonCAM, fastbd's PatchSearch and PatchSearch as its
authors' code runs it (``fastbd.patchsearch.published``)."""


@dataclass
class DemoReport:
    rows: list[dict] = field(default_factory=list)
    retrain: dict | None = None
    threat: dict | None = None

    def table(self) -> str:
        head = (f"{'method':<21} {'data':<6} {'check':>12} {'precision':>9} {'recall':>7} "
                f"{'F1':>6} {'AUROC':>6} {'removed':>8} {'top-20 acc':>10} {'trigger hit':>11} "
                f"{'time s':>7}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            check = ("off" if r["check"] is None else
                     f"{r['check']:.2f}{'' if r['backdoor'] else ' none'}")
            lines.append(f"{r['method']:<21} {r['data']:<6} {check:>12} "
                         f"{100 * r['precision']:>8.1f}% "
                         f"{100 * r['recall']:>6.1f}% {100 * r['f1']:>5.1f}% "
                         f"{r['auroc']:>6.3f} {r['removed']:>8d} {100 * r['topk_accuracy']:>9.1f}% "
                         f"{100 * r['trigger_overlap']:>10.1f}% {r['seconds']:>7.1f}")
        return "\n".join(lines)


def _row(name: str, result: DetectionResult, seconds: float, data: str = "attack") -> dict:
    m = result.metrics
    return {"method": name, "data": data, "backdoor": result.backdoor,
            "check": result.check.get("statistic"),
            "precision": m.precision, "recall": m.recall, "f1": m.f1,
            "auroc": m.auroc or 0.0, "removed": int(result.removed.sum()),
            "topk_accuracy": result.topk_accuracy or 0.0,
            "trigger_overlap": result.trigger_scores.get("topk_trigger_overlap", 0.0),
            "seconds": seconds}


def retrained_encoder(config: SSLThreatConfig, images: torch.Tensor, kept: torch.Tensor,
                      cache_dir: str | Path | None, device: str | torch.device, verbose: bool,
                      checkpoint: Path):
    """An encoder trained with the threat model's plain SSL recipe (``config.ssl``, no
    training-time attack) on ``images[kept]`` (``kept`` bool ``N``), cached under
    ``cache_dir`` by the config's hash and the whole mask's."""
    encoder = small_encoder(config.width, config.world.image_size, seed=config.seed)
    key = hashlib.sha1(config_hash(config).encode() + kept.cpu().numpy().tobytes()).hexdigest()
    path = (Path(cache_dir) / f"ssl-retrain-{SSL_CACHE_VERSION}-{key[:12]}.pt"
            if cache_dir is not None else None)
    if path is not None and load_cached(path, "encoder", encoder) is not None:
        return encoder.to(device).eval()
    history = train_ssl(encoder, images[kept], config.ssl, device=device, verbose=verbose,
                        checkpoint=checkpoint)
    if path is not None:
        save_atomically({"encoder": encoder.state_dict(), "train_seconds": history.seconds},
                        path)
    return encoder.to(device).eval()


def run(out: str | Path = "fastbd-out/demo/poisoncam", *, device: str | torch.device = "cpu",
        seed: int = 0, retrain: bool = False, cache_dir: str | Path = "fastbd-out/cache",
        verbose: bool = True, config: Config | None = None,
        threat: str = "implanted") -> DemoReport:
    out = check_writable_dir(out)
    if threat not in THREATS:
        raise ValueError(f"unknown threat model {threat!r}; choose from {', '.join(THREATS)}")
    threat_config = THREATS[threat](seed)
    threat = build_ssl_threat(threat_config, cache_dir=cache_dir, device=device, verbose=verbose)
    log.info("threat model: CA %.3f ASR %.3f (%s)", threat.probe.clean_accuracy,
             threat.probe.asr, "cached" if threat.cached else f"{threat.train_seconds:.0f}s")
    report = DemoReport(threat={**threat.to_dict(), "label": threat_label(threat_config)})
    config = config or demo_config(seed)
    images = threat.poisoned.images
    truth, boxes = threat.poisoned.poison_mask, threat.poisoned.boxes
    results = {}
    for method in DEMO_DETECTORS:
        start = time.perf_counter()
        detector = registry.detector(method, config).fit(threat.encoder, images, device=device,
                                                ground_truth=truth, true_boxes=boxes,
                                                verbose=verbose)
        seconds = time.perf_counter() - start
        results[method] = detector.result_
        detector.result_.save(output_dir(out, method), truth=truth)
        report.rows.append(_row(method, detector.result_, seconds))
    clean_config = replace(threat_config, attack="none", training_attack="none")
    clean = build_ssl_threat(clean_config, cache_dir=cache_dir, device=device, verbose=verbose)
    start = time.perf_counter()
    found = registry.detector("poisoncam", config).fit(
        clean.encoder, clean.poisoned.images, device=device,
        ground_truth=clean.poisoned.poison_mask, verbose=verbose).result_
    found.save(output_dir(out, "poisoncam-clean"), truth=clean.poisoned.poison_mask)
    report.rows.append(_row("poisoncam", found, time.perf_counter() - start, data="clean"))
    if retrain:
        sets = {"poisoncam-filtered": ~results["poisoncam"].removed}
        if threat_config.training_attack != "none":
            sets["unfiltered"] = torch.ones_like(truth)
        world = threat.world
        report.retrain = {"before": threat.probe.to_dict(),
                          "kept_images": int(sets["poisoncam-filtered"].sum())}
        for name, kept in sets.items():
            encoder = retrained_encoder(threat_config, images, kept, cache_dir, device, verbose,
                                        out / f"retrain-{name}.partial.pt")
            probe = linear_probe(encoder, world.train.images, world.train.labels,
                                 world.eval.images, world.eval.labels, threat_config.trigger(),
                                 threat_config.target, threat_config.probe, device)
            report.retrain["after" if name == "poisoncam-filtered" else name] = probe.to_dict()
    write_text_atomically(json.dumps(
        {"rows": report.rows, "retrain": report.retrain, "threat": report.threat}, indent=2,
        default=str), out / "summary.json")
    return report
