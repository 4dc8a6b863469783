"""Issue 6's scale benchmarks in one run: build, check and time, then write one JSON.

    python bench/scale.py --size gpu --out bench/results/scale-<gpu>.json      # on an H100/H200
    python bench/scale.py --size cpu --out bench/results/scale-cpu-<machine>.json  # 224 px, CPU
    python bench/scale.py --size tiny                                          # harness check
    python bench/scale.py --page bench/results/scale-*.json \
        --ranks bench/results/ranks-scaling-*.json > docs/performance.md

Measured, each beside its reference in the same run:

* ``peak``: a square matmul in the run's dtype (the denominator of "fraction of peak");
* ``encoders``: encoder-only throughput on a pre-built batch (img/s, FLOP per image counted by
  ``torch.utils.flop_counter``, achieved TFLOP/s, fraction of peak), and the masking and flip
  stages (``candidate_windows`` / ``flip_counts``: input written by ``mask_fill`` / ``paste``
  into a reused buffer, encode, assign) in encoded images per second and as a ratio to it;
* ``kmeans``: ``KMeans`` (k-means++ then up to 20 Lloyd iterations) on random unit features;
* ``flip_reference``: the flip test structured as PatchSearch's code runs it — one candidate at a
  time, fp32, test images cloned, pasted and normalised on the host and copied over, features
  assigned on the host — against ``flip_counts`` on the same candidates (ratio);
* ``poisoncam``: ``Detector.fit`` on random images, its search stopped after ``rounds`` rounds
  (the reduced run), and the full search projected: the images a full search scores (the
  search's own pruning run on the reduced run's clusters with random scores) times the
  per-image cost implied by the masking and flip throughputs, plus the measured features,
  clustering and classifier times. The projection's own check is the reduced run: the same
  formula applied to the images it scored, against its measured candidate + flip time;
* ``ubt``: ``fastbd.ubt.defend`` on random pairs (500,000 for ViT-B-32 at the GPU size), each
  stage timed.

Banks larger than device memory (``Config.bank_placement="host"``) are not timed here yet.
Correctness is the test suite's: every fast path used here is compared with its torch reference
there (``bench/bench_scale.py`` runs this script at the tiny size in CI).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fastbd.detection import ClassifierConfig, Config
from fastbd.detection.config import PRECISIONS
from fastbd.detection.flip import flip_counts
from fastbd.detection.search import SearchState, run_search
from fastbd.models import encoder_by_name
from fastbd.ops import KMeans
from fastbd.poisoncam import PoisonCAM
from fastbd.poisoncam.masking import candidate_windows

import roofline
import scaling_model
from benchutil import stage_setup

log = logging.getLogger("fastbd.bench.scale")


@dataclass
class ScaleSize:
    """One set of sizes. ``encoders``: ``encoder_by_name`` names; ``batch``: images per
    encoder call; ``masking_images`` × ``n_masks`` and ``flip_candidates`` × ``test_images``
    views per stage measurement; ``kmeans``: (N, D, K); ``detector_images`` random images for
    the reduced PoisonCAM run, ``n_clusters`` clusters, ``rounds`` search rounds; UBT on
    ``ubt_pairs`` random pairs for an open_clip ``ubt_arch`` (``tiny``: fastbd's tiny CLIP),
    its overfit and unlearning stages cut to ``ubt_epochs`` epochs when set (UBT's schedule
    otherwise)."""

    device: str
    dtype: str
    image_size: int
    encoders: tuple[str, ...]
    batch: int
    n_masks: int
    masking_images: int
    window: int
    test_images: int
    flip_candidates: int
    reference_candidates: int
    kmeans: tuple[int, int, int]
    peak_n: int
    detector_images: int
    n_clusters: int
    rounds: int
    repeats: int
    ubt_arch: str
    ubt_image_size: int
    ubt_pairs: int
    ubt_epochs: int | None = None

    @property
    def bank_images(self) -> int:
        """Random images the stage measurements draw from."""
        return max(self.masking_images, self.test_images) + 8


SIZES = {
    "tiny": ScaleSize(device="cpu", dtype="fp32", image_size=32,
                      encoders=("smallconv16", "resnet18"), batch=64, n_masks=16,
                      masking_images=4, window=9, test_images=32, flip_candidates=2,
                      reference_candidates=2, kmeans=(2000, 64, 20), peak_n=1024,
                      detector_images=300, n_clusters=15, rounds=1, repeats=2,
                      ubt_arch="tiny", ubt_image_size=32, ubt_pairs=400, ubt_epochs=1),
    "cpu": ScaleSize(device="cpu", dtype="fp32", image_size=224,
                     encoders=("resnet18", "vit_base_patch16_224"), batch=16, n_masks=16,
                     masking_images=2, window=60, test_images=16, flip_candidates=2,
                     reference_candidates=1, kmeans=(20_000, 768, 100), peak_n=1024,
                     detector_images=120, n_clusters=12, rounds=1, repeats=1,
                     ubt_arch="tiny", ubt_image_size=32, ubt_pairs=20_000),
    "gpu": ScaleSize(device="cuda", dtype="bf16", image_size=224,
                     encoders=("resnet18", "resnet50", "vit_base_patch16_224"), batch=1024,
                     n_masks=256, masking_images=8, window=60, test_images=1000,
                     flip_candidates=2, reference_candidates=4, kmeans=(127_000, 768, 1000),
                     peak_n=8192, detector_images=20_000, n_clusters=1000, rounds=1,
                     repeats=5, ubt_arch="ViT-B-32", ubt_image_size=224, ubt_pairs=500_000),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up, synchronised."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    import importlib.metadata as md

    info: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                               "processor": _cpu_name(), "cpu_threads": torch.get_num_threads()}
    for name in ("triton", "timm"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Achieved FLOP/s of an ``n×n @ n×n`` matmul in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats)


def flops_per_image(encoder, size: int, dtype: torch.dtype, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size, dtype=dtype, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(x)
    return float(counter.get_total_flops())


def encoder_stages(arch: str, s: ScaleSize, device: torch.device, dtype: torch.dtype,
                   peak: float) -> dict[str, float]:
    """Encoder-only, masking-stage and flip-stage throughput of one architecture."""
    encoder, bank, _, encode_assign = stage_setup(arch, s.image_size, s.bank_images, dtype,
                                                  device)
    ready = encoder.normalise(bank[:1].expand(s.batch, -1, -1, -1)).contiguous()

    def encoder_only():
        with torch.no_grad():
            encoder(ready)

    g = torch.Generator().manual_seed(1)
    rows = torch.arange(s.masking_images, device=device)
    window = min(s.window, s.image_size)

    def masking():
        candidate_windows(encode_assign, bank, rows, encoder.mean, encoder.std,
                          n_masks=s.n_masks, window=window, strategy="full", block=1, fill=0.0,
                          batch_size=s.batch, generator=g, dtype=dtype)

    triggers = bank[:s.flip_candidates, :, :window, :window].contiguous()
    tests = torch.arange(s.test_images, device=device)
    labels, _ = encode_assign(encoder.normalise(bank[:s.test_images]))
    per_batch = max(1, s.batch // s.test_images)

    def flip():
        flip_counts(encode_assign, bank, tests, labels, triggers, encoder.mean, encoder.std,
                    candidates_per_batch=per_batch, generator=g, dtype=dtype)

    flops = flops_per_image(encoder, s.image_size, dtype, device)
    encoder_rate = s.batch / timed(encoder_only, device, s.repeats)
    masking_rate = s.masking_images * s.n_masks / timed(masking, device, s.repeats)
    flip_rate = s.flip_candidates * s.test_images / timed(flip, device, s.repeats)
    return {"encoder_img_per_s": encoder_rate, "gflop_per_image": flops / 1e9,
            "encoder_tflop_per_s": encoder_rate * flops / 1e12,
            "fraction_of_peak": encoder_rate * flops / peak,
            "masking_img_per_s": masking_rate, "flip_img_per_s": flip_rate,
            "masking_over_encoder": masking_rate / encoder_rate,
            "flip_over_encoder": flip_rate / encoder_rate}


def reference_flip(encoder, bank_host: torch.Tensor, tests: torch.Tensor,
                   test_labels: torch.Tensor, triggers: torch.Tensor, clustering,
                   corners: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    """PatchSearch's structure: per candidate, clone the test images on the host, paste, normalise
    in fp32 there, copy each batch to the device, encode in fp32, assign on the host. Returns
    the flip counts (int64 ``c``); ``corners``: int ``c×T×2`` paste positions."""
    mean = torch.tensor(encoder.mean)[:, None, None]
    std = torch.tensor(encoder.std)[:, None, None]
    centroids = clustering.centroids.cpu()
    window = triggers.shape[-1]
    counts = []
    for c in range(triggers.shape[0]):
        pasted = bank_host[tests].clone()
        for t in range(tests.numel()):
            y, x = corners[c, t].tolist()
            pasted[t, :, y:y + window, x:x + window] = triggers[c]
        flips = 0
        for start in range(0, tests.numel(), batch):
            x = ((pasted[start:start + batch].float() / 255 - mean) / std).to(device)
            with torch.no_grad():
                feats = F.normalize(encoder(x).float().cpu(), dim=1)
            after = (feats @ centroids.T).argmax(1)
            flips += int((after != test_labels[start:start + batch]).sum())
        counts.append(flips)
    return torch.tensor(counts)


def flip_reference(arch: str, s: ScaleSize, device: torch.device, dtype: torch.dtype
                   ) -> dict[str, float]:
    """``flip_counts`` (run dtype, candidates batched) against the PatchSearch-structured
    reference (fp32, one candidate at a time, host-side work) on the same candidates."""
    fast_encoder, bank, clustering, encode_assign = stage_setup(arch, s.image_size,
                                                                s.bank_images, dtype, device)
    reference_encoder = encoder_by_name(arch, image_size=s.image_size).to(device).eval()
    window = min(s.window, s.image_size)
    n_cand = s.reference_candidates
    triggers = bank[:n_cand, :, :window, :window].contiguous()
    tests = torch.arange(s.test_images)
    bank_host = bank.cpu()
    with torch.no_grad():
        feats = F.normalize(reference_encoder(reference_encoder.normalise(
            bank[:s.test_images])).float(), dim=1).cpu()
    test_labels = (feats @ clustering.centroids.cpu().T).argmax(1)
    g = torch.Generator().manual_seed(2)
    corners = torch.randint(0, s.image_size - window + 1, (n_cand, s.test_images, 2), generator=g)
    reference_s = timed(lambda: reference_flip(reference_encoder, bank_host, tests, test_labels,
                                               triggers.cpu(), clustering, corners, device,
                                               s.batch), device, 1)
    fast_labels, _ = encode_assign(fast_encoder.normalise(bank[:s.test_images]))
    per_batch = max(1, s.batch // s.test_images)
    fast_s = timed(lambda: flip_counts(encode_assign, bank, tests.to(device), fast_labels,
                                       triggers, fast_encoder.mean, fast_encoder.std,
                                       candidates_per_batch=per_batch, generator=g, dtype=dtype),
                   device, s.repeats)
    return {"arch": arch, "candidates": n_cand, "test_images": s.test_images,
            "reference_s_per_candidate": reference_s / n_cand,
            "fastbd_s_per_candidate": fast_s / n_cand, "speedup": reference_s / fast_s}


def kmeans_bench(s: ScaleSize, device: torch.device) -> dict[str, float]:
    """``KMeans`` as PoisonCAM fits it: cosine, k-means++, then up to 20 Lloyd iterations
    (random unit features rarely settle sooner; ``n_iter`` says how many ran)."""
    n, d, k = s.kmeans
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    model = KMeans(k, 20, metric="cosine", seed=0)
    seconds = timed(lambda: model.fit(x), device, max(1, s.repeats // 2))
    return {"n": n, "d": d, "k": k, "fit_s": seconds, "n_iter": model.n_iter_,
            "lloyd_tflop_per_s": model.n_iter_ * 2 * n * d * k / seconds / 1e12,
            "backend": model.backend_}


def scored_by_full_search(labels: torch.Tensor, n_clusters: int, config: Config) -> int:
    """Images a complete search scores on these clusters (random scores decide the pruning)."""
    scores = torch.Generator().manual_seed(4)

    def score_batch(rows, gen):
        return torch.rand(rows.numel(), generator=scores), torch.zeros(rows.numel(), 2)

    state = run_search(SearchState.start(labels, n_clusters, 0), score_batch,
                       samples_per_cluster=config.samples_per_cluster,
                       prune_fraction=config.prune_fraction, aggregate="sum", seed=0,
                       verbose=False)
    return int(state.scored.sum())


def poisoncam_projection(arch: str, s: ScaleSize, device: torch.device, dtype: torch.dtype,
                         stages: dict[str, float]) -> dict[str, float]:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (s.detector_images, 3, s.image_size, s.image_size),
                           dtype=torch.uint8, generator=g)
    encoder = encoder_by_name(arch, image_size=s.image_size)
    config = Config(n_clusters=s.n_clusters, n_masks=s.n_masks, test_set_size=s.test_images,
                    batch_size=s.batch, precision=s.dtype, reference_size=s.image_size,
                    window=min(s.window, s.image_size), max_cluster_fraction=1.0,
                    classifier=ClassifierConfig(n_models=1, iterations=20, width=16,
                                                batch_size=64, feature_samples=512,
                                                paste_size=(max(1, s.window // 6), s.window)))
    detector = PoisonCAM(config).fit(encoder, images, device=device, max_rounds=s.rounds,
                                    verbose=False)
    result = detector.result_
    scored = sum(r["scored"] for r in result.rounds)
    per_image = (s.n_masks / stages["masking_img_per_s"]
                 + min(s.test_images, s.detector_images) / stages["flip_img_per_s"])
    measured = result.timings["candidates"] + result.timings["flip_test"]
    full_scored = scored_by_full_search(result.cluster_labels, config.n_clusters, config)
    fixed = sum(result.timings.get(k, 0.0) for k in ("features", "clustering", "classifier"))
    return {"arch": arch, "images": s.detector_images, "rounds": s.rounds,
            "scored": scored, "measured_search_s": measured,
            "predicted_search_s": scored * per_image,
            "prediction_error": scored * per_image / measured - 1,
            "full_search_scored": full_scored,
            "projected_search_s": full_scored * per_image,
            "measured_other_s": fixed,
            "projected_total_s": full_scored * per_image + fixed,
            "timings_s": result.timings}


def ubt_stages(s: ScaleSize, device: torch.device) -> dict[str, object]:
    """``fastbd.ubt.defend`` end to end on random pairs with random-weight models, every stage
    timed (the check is skipped so that attribution and unlearning always run). Images are
    generated in chunks into one host tensor (500,000 at 224 px: 75 GB) and the split streams
    them to the device."""
    from fastbd.models.clip import TinyCLIPConfig, context_length_of, tiny_clip
    from fastbd.ubt import Config as UBTConfig
    from fastbd.ubt import defend

    def model():
        if s.ubt_arch == "tiny":
            return tiny_clip(TinyCLIPConfig())
        import open_clip

        return open_clip.create_model(s.ubt_arch, pretrained=None)

    poisoned, reference = model().to(device).eval(), model().to(device).eval()
    g = torch.Generator().manual_seed(6)
    n, size = s.ubt_pairs, s.ubt_image_size
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for start in range(0, n, 8192):
        stop = min(n, start + 8192)
        images[start:stop] = torch.randint(0, 256, (stop - start, 3, size, size),
                                           dtype=torch.uint8, generator=g)
    tokens = torch.zeros(n, context_length_of(poisoned), dtype=torch.long)
    tokens[:, 0] = 49406  # start of text, 8 random words, end of text
    tokens[:, 1:9] = torch.randint(300, 40000, (n, 8), generator=g)
    tokens[:, 9] = 49407
    config = UBTConfig(skip_check=True)
    if s.ubt_epochs is not None:
        config = replace(config, overfit_epochs=s.ubt_epochs, unlearn_epochs=s.ubt_epochs,
                         overfit_min_steps=0, unlearn_min_steps=0)
    start = time.perf_counter()
    result = defend(poisoned, images, tokens, reference=reference, config=config, device=device,
                    verbose=False)
    _sync(device)
    total = time.perf_counter() - start
    return {"arch": s.ubt_arch, "pairs": n, "image_size": size, "total_s": total,
            "overfit_epochs": config.overfit_epochs, "unlearn_epochs": config.unlearn_epochs,
            "timings_s": result.timings,
            "split_pairs_per_s": n / result.timings["suspicious_split"]}


def run(size: str, out: str | Path | None = None, quiet: bool = False) -> dict[str, object]:
    """Every measurement at ``size``. With ``out``, the JSON is rewritten (atomically) after
    each one, so a run cut short — a GPU lease ending, a memory error in the last step — keeps
    what it measured; a log line per step unless ``quiet``."""
    s = SIZES[size]
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--size gpu needs a CUDA device")
    dtype = PRECISIONS[s.dtype]
    last = s.encoders[-1]
    result: dict[str, object] = {"size": size, "sizes": asdict(s), "machine": machine(),
                                 "encoders": {}}
    steps = [("peak_tflop_per_s", lambda: matmul_peak(s.peak_n, dtype, device, s.repeats) / 1e12)]
    steps += [(f"encoders.{arch}", lambda arch=arch: encoder_stages(
        arch, s, device, dtype, result["peak_tflop_per_s"] * 1e12)) for arch in s.encoders]
    steps += [("kmeans", lambda: kmeans_bench(s, device)),
              ("flip_reference", lambda: flip_reference(last, s, device, dtype)),
              ("poisoncam", lambda: poisoncam_projection(last, s, device, dtype,
                                                         result["encoders"][last])),
              ("ubt", lambda: ubt_stages(s, device))]
    for number, (name, measure) in enumerate(steps, 1):
        if not quiet:
            log.info("[%d/%d] %s", number, len(steps), name)
        start = time.perf_counter()
        value = measure()
        if name.startswith("encoders."):
            result["encoders"][name.split(".", 1)[1]] = value
        else:
            result[name] = value
        if not quiet:
            log.info("[%d/%d] %s done in %.1f s", number, len(steps), name,
                     time.perf_counter() - start)
        if out is not None:
            partial = Path(out).with_suffix(".partial")
            partial.write_text(json.dumps(result, indent=2))
            partial.replace(out)
    return result


def page(results: list[dict], benchmarks: dict | None = None,
         ranks: list[dict] | None = None) -> str:
    """A Markdown performance page from ``run`` results, then the performance model (its
    measured column from ``benchmarks``, a GPU run's pytest-benchmark JSON) and the scale-out
    section (``ranks``: ``bench/ranks_scaling.py`` results)."""
    lines = ["# fastbd performance", "",
             "Generated by `python bench/scale.py --page <results> --ranks <results>` from "
             + ", ".join(f"`{r['_file']}`" for r in results)
             + "".join(f", `{r['_file']}`" for r in ranks or []) + ".", ""]
    for r in results:
        m = r["machine"]
        where = m.get("gpu") or f"{m['processor']}, {m['cpu_threads']} threads"
        lines += [f"## {where} — size `{r['size']}` ({r['sizes']['dtype']}, "
                  f"{r['sizes']['image_size']} px, batch {r['sizes']['batch']})", "",
                  f"torch {m['torch']}, triton {m.get('triton', '—')}"
                  + (f", CUDA {m['cuda']}, driver {m.get('driver', '?')}" if "gpu" in m else "")
                  + f"; matmul peak measured {r['peak_tflop_per_s']:.1f} TFLOP/s.", "",
                  "| encoder | img/s | GFLOP/img | TFLOP/s | of peak | masking ÷ encoder | "
                  "flip ÷ encoder |", "|---|---:|---:|---:|---:|---:|---:|"]
        for arch, e in r["encoders"].items():
            lines.append(f"| {arch} | {e['encoder_img_per_s']:,.0f} | "
                         f"{e['gflop_per_image']:.2f} | {e['encoder_tflop_per_s']:.2f} | "
                         f"{100 * e['fraction_of_peak']:.1f} % | "
                         f"{e['masking_over_encoder']:.2f} | {e['flip_over_encoder']:.2f} |")
        k, f, p, u = r["kmeans"], r["flip_reference"], r["poisoncam"], r["ubt"]
        lines += ["", f"* k-means {k['n']:,} × {k['d']} → {k['k']:,} ({k['backend']}): "
                  f"k-means++ + {k['n_iter']} Lloyd iterations {k['fit_s']:.3f} s "
                  f"({k['lloyd_tflop_per_s']:.2f} TFLOP/s counting the iterations' matmuls).",
                  f"* Flip test, {f['arch']}, {f['test_images']:,} test images: "
                  f"{f['fastbd_s_per_candidate'] * 1e3:.1f} ms per candidate against "
                  f"{f['reference_s_per_candidate'] * 1e3:.1f} ms PatchSearch-structured "
                  f"(fp32, host-side paste and assignment): **{f['speedup']:.1f}×**.",
                  f"* PoisonCAM, {p['arch']}, {p['images']:,} random images, {p['rounds']} "
                  f"round(s) scoring {p['scored']:,}: search {p['measured_search_s']:.1f} s "
                  f"measured, {p['predicted_search_s']:.1f} s predicted from the stage "
                  f"throughputs ({100 * p['prediction_error']:+.0f} %); a full search scores "
                  f"{p['full_search_scored']:,} images: projected "
                  f"{p['projected_search_s'] / 60:.1f} min search, "
                  f"{p['projected_total_s'] / 60:.1f} min in all.",
                  f"* UBT, {u['arch']} at {u['image_size']} px, {u['pairs']:,} random pairs: "
                  f"{u['total_s']:.1f} s end to end (" + ", ".join(
                      f"{stage} {sec:.1f} s" for stage, sec in u["timings_s"].items())
                  + f"; the split at {u['split_pairs_per_s']:,.0f} pairs/s).", ""]
    gpu = next((r["machine"]["gpu"] for r in results if "gpu" in r["machine"]), "")
    lines += roofline.section(benchmarks, gpu)
    lines += scaling_model.section(ranks or [])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", help="write the JSON here, after every measurement (default: "
                                      "stdout, at the end)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--page", nargs="+", metavar="RESULT",
                        help="print the Markdown page for these result files instead")
    parser.add_argument("--benchmarks", help="with --page: a GPU run's pytest-benchmark JSON, "
                                             "for the model's measured column")
    parser.add_argument("--ranks", nargs="*", default=[], metavar="RESULT",
                        help="with --page: bench/ranks_scaling.py results for the scale-out "
                             "section")
    args = parser.parse_args(argv)
    if args.page:
        results = []
        for path in args.page:
            result = json.loads(Path(path).read_text())
            result["_file"] = path
            results.append(result)
        benchmarks = json.loads(Path(args.benchmarks).read_text()) if args.benchmarks else None
        ranks = [{**json.loads(Path(path).read_text()), "_file": path} for path in args.ranks]
        sys.stdout.write(page(results, benchmarks, ranks))
        return 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = run(args.size, args.out, args.quiet)
    if not args.out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
