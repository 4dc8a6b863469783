"""The poison classifier: learns "contains one of the found triggers" from pasted examples.

Training images come from the pool (all but the highest- and lowest-scored); with probability
``paste_p`` a random top-k trigger, resized to a random size, is pasted at a random position
(label 1), otherwise the image stays as it is (label 0). Geometry augmentation comes first so the
pasted trigger stays sharp, colour augmentation after. Validation: the top-k poisons (label 1)
against the bottom-k images (label 0); training stops when the validation F1 (integer %) has
been flat for ``patience`` checks, and the model at that point is kept (PatchSearch's rule; the
first best-F1 checkpoint on the tiny validation set is often undertrained). An ensemble averages
its members' logits.

Pool cleaning (fastbd's addition, ``ClassifierConfig.pool_cleaning_rounds``): the paper drops
the top-scored images from the pool, but the search scores only a few hundred images, so most
poisoned images stay in the pool labelled clean. A logistic regression on the threat encoder's
frozen features — the encoder the trigger was planted in, so a pasted trigger moves its features
the way a native one does — learns pasted vs plain pool images in about a second and drops the
pool images it rates most poisonous. ``otsu_threshold`` picks the decision threshold from the
gap in the ensemble's margins instead of the argmax (``ClassifierConfig.threshold``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastbd.data.augment import colour_jitter, random_resized_crop
from fastbd.detection.config import ClassifierConfig
from fastbd.devices import conv_memory_format
from fastbd.distributed import (
    average_gradients,
    gather_objects,
    shard,
    sharded_forward,
    world,
)
from fastbd.models.encoders import Encoder
from fastbd.models.linear import fit_linear
from fastbd.ops import paste
from fastbd.schedules import warmup_cosine
from fastbd.storage import NO_STAGES, StageFiles, TrainingState
from fastbd.training.global_bn import global_batch_norm

log = logging.getLogger(__name__)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PoisonNet(nn.Module):
    """ResNet with one BasicBlock per stage (``[1, 1, 1, 1]``), two-class head. The stem is a
    stride-2 7×7 conv + max-pool at ≥ 96 px, a 3×3 conv below (small images keep their detail);
    ``imagenet_stem`` keeps the 7×7 + max-pool at any size (torchvision's ResNet, as
    PatchSearch's official code trains it)."""

    def __init__(self, width: int = 64, image_size: int = 224, imagenet_stem: bool = False
                 ) -> None:
        super().__init__()
        if image_size >= 96 or imagenet_stem:
            stem = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True)]
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks, cin = [], width
        for i, cout in enumerate(widths):
            blocks.append(BasicBlock(cin, cout, 1 if i == 0 else 2))
            cin = cout
        self.body = nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


@dataclass
class ClassifierReport:
    """Per member: training ``iterations``, ``best_f1`` and ensemble ``weights``;
    ``resumed_seconds``: training time earlier (interrupted) runs spent on the members this run
    continued."""

    iterations: list[int]
    best_f1: list[float]
    resumed_seconds: float = 0.0
    weights: list[int] = field(default_factory=list)
    """Each member's weight in the ensemble average: 1 (fastbd), or the passes over the pool it
    started (published: the official loop appends a member to its list once per epoch)."""


def _f1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = logits.argmax(1)
    tp = int(((predicted == 1) & (labels == 1)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def published_f1_percent(f1: float) -> int:
    """The official code's integer F1 for its stopping rule: truncated, not rounded."""
    return int(f1 * 100)


def validates_after(step: int, config: ClassifierConfig) -> bool:
    """Whether training validates after update ``step`` (1-based): every ``val_every`` updates
    (fastbd), or after the first update and every ``val_every`` after it (the published
    recipe: the official loop validates at iteration 0)."""
    if config.recipe == "published":
        return (step - 1) % config.val_every == 0
    return step % config.val_every == 0


def stops_early(history: list[int], config: ClassifierConfig) -> bool:
    """The flat-F1 rule on the integer F1 ``history``: the last ``patience`` values are equal,
    over at least ``patience`` validations (fastbd) or more than ``patience`` (published)."""
    enough = (len(history) > config.patience if config.recipe == "published"
              else len(history) >= config.patience)
    return enough and len(set(history[-config.patience:])) == 1


class PoolSampler:
    """Training rows from the ``pool`` (int64): drawn with replacement (fastbd), or as shuffled
    passes over the pool (the published recipe, a ``DataLoader(shuffle=True)``); ``epochs``
    counts the passes started. Its random state is ``generator``'s plus the current pass."""

    def __init__(self, pool: torch.Tensor, config: ClassifierConfig,
                 generator: torch.Generator) -> None:
        self.pool, self.config, self.generator = pool, config, generator
        self.order = torch.empty(0, dtype=torch.long)
        self.epochs = 0

    def rows(self) -> torch.Tensor:
        b = self.config.batch_size
        if self.config.recipe != "published":
            return self.pool[torch.randint(self.pool.numel(), (b,), generator=self.generator)]
        taken = []
        while sum(t.numel() for t in taken) < b:
            if self.order.numel() == 0:
                self.order = torch.randperm(self.pool.numel(), generator=self.generator)
                self.epochs += 1
            need = b - sum(t.numel() for t in taken)
            taken.append(self.order[:need])
            self.order = self.order[need:]
        return self.pool[torch.cat(taken)]

    def state(self) -> dict:
        return {"order": self.order, "epochs": self.epochs}

    def load(self, state: dict) -> None:
        self.order, self.epochs = state["order"], int(state["epochs"])


def make_batch(images: torch.Tensor, rows: torch.Tensor, triggers: torch.Tensor,
               config: ClassifierConfig, mean: torch.Tensor, std: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch from bank ``rows`` (int64 ``B``): normalised float ``B×3×S×S`` and
    labels int64 ``B``."""
    device = images.device
    b = rows.numel()
    rows = rows.to(device)
    crops = random_resized_crop(images[rows].float(), config.crop_scale, (3 / 4, 4 / 3), 0.5,
                                generator_on(generator, device))
    canvas = crops.round().clamp(0, 255).to(torch.uint8)
    labels = (torch.rand(b, generator=generator) < config.paste_p).long()
    pasted = torch.nonzero(labels).flatten()
    if pasted.numel():
        canvas[pasted.to(device)] = paste_triggers(canvas, pasted, triggers, config, generator)
    x = colour_jitter(canvas.float() / 255, 0.4, 0.8, 0.2, generator_on(generator, device))
    return (x - mean) / std, labels.to(device)


def paste_triggers(images: torch.Tensor, rows: torch.Tensor, triggers: torch.Tensor,
                   config: ClassifierConfig, generator: torch.Generator) -> torch.Tensor:
    """uint8 ``J×3×S×S``: bank ``images[rows]`` (``rows`` int64 ``J``), each with a random one
    of ``triggers`` (uint8 ``k×3×w×w``) resized to a random side in ``config.paste_size`` and
    pasted at a random position at least ``config.paste_margin`` px from the border."""
    device, size, k = images.device, images.shape[-1], rows.numel()
    sides, ys, xs = paste_boxes(k, size, config, generator)
    which = torch.randint(triggers.shape[0], (k,), generator=generator)
    picked = images[rows.to(device)]  # gathered: the bank may be a HostRows view
    return paste(picked, triggers.to(device), torch.arange(k, device=device), which.to(device),
                 ys.to(device), xs.to(device), sizes=torch.stack([sides, sides], 1).to(device))


def paste_boxes(k: int, size: int, config: ClassifierConfig, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Side, top and left (int64 ``k`` each) of ``k`` pasted triggers in a ``size``-px image:
    the side uniform in ``config.paste_size``, the corner uniform with the trigger at least
    ``paste_margin`` px from the border — both ranges closed (fastbd) or half-open, their upper
    ends never drawn (the published recipe: numpy's ``randint``)."""
    margin = config.paste_margin
    open_end = 1 if config.recipe == "published" else 0
    lo, hi = config.paste_size
    hi = max(1, min(hi - open_end, size - 2 * margin - open_end))
    lo = min(lo, hi)
    sides = torch.randint(lo, hi + 1, (k,), generator=generator)
    limit = (size - sides - margin - open_end).clamp(min=margin)
    ys = margin + (torch.rand(k, generator=generator) * (limit - margin + 1)).long()
    xs = margin + (torch.rand(k, generator=generator) * (limit - margin + 1)).long()
    return sides, ys, xs


def fit_pool_model(encoder: Encoder, images: torch.Tensor, features: torch.Tensor,
                       pool: torch.Tensor, triggers: torch.Tensor, config: ClassifierConfig,
                       generator: torch.Generator, batch_size: int = 512) -> nn.Linear:
    """Pool cleaning's model: logistic regression ``D → 2`` on the encoder's L2-normalised
    features of ``feature_samples`` pool rows drawn with replacement, the first half with a
    pasted trigger (label 1, encoded here), the rest as they are (label 0, rows of
    ``features``, float ``N×D``)."""
    rows = pool[torch.randint(pool.numel(), (config.feature_samples,), generator=generator)]
    half = config.feature_samples // 2
    pasted = []
    with torch.no_grad():
        for start in range(0, half, batch_size):
            chunk = rows[start:min(half, start + batch_size)]
            x = encoder.normalise(paste_triggers(images, chunk, triggers, config, generator))
            pasted.append(F.normalize(encoder(x).float(), dim=1))
    x = torch.cat(pasted + [features[rows[half:].to(features.device)]])
    y = torch.cat([torch.ones(half), torch.zeros(rows.numel() - half)]).long().to(x.device)
    return fit_linear(x, y, 2, config.feature_steps, config.feature_weight_decay)


def clean_pool(encoder: Encoder, images: torch.Tensor, features: torch.Tensor,
               pool: torch.Tensor, triggers: torch.Tensor, config: ClassifierConfig,
               generator: torch.Generator) -> torch.Tensor:
    """``pool_cleaning_rounds`` times: fit the pool model on the pool and drop the
    ``pool_cleaning_fraction`` of the pool it rates most poisonous. Returns the cleaned pool
    (sorted int64 bank rows)."""
    for _ in range(config.pool_cleaning_rounds):
        n_drop = int(config.pool_cleaning_fraction * pool.numel())
        if n_drop == 0:
            break
        model = fit_pool_model(encoder, images, features, pool, triggers, config, generator)
        with torch.no_grad():
            logit = model(features[pool.to(features.device)])
            margin = (logit[:, 1] - logit[:, 0]).cpu()
        keep = torch.argsort(margin, stable=True)[:pool.numel() - n_drop]
        pool = pool[keep].sort().values
    return pool


def otsu_threshold(values: torch.Tensor) -> float:
    """Otsu's threshold of float ``N`` values (at least two distinct): the midpoint between
    the sorted neighbours whose split maximises the between-group variance
    ``w0·w1·(mean0 − mean1)²`` (counts and means below / above); ties go to the lowest split."""
    ordered = torch.sort(values.detach().double().flatten().cpu()).values
    if ordered.numel() < 2 or bool(ordered[0] == ordered[-1]):
        raise ValueError("Otsu's threshold needs at least two distinct values")
    n = ordered.numel()
    below = torch.arange(1, n, dtype=torch.float64)
    cumulative = ordered.cumsum(0)[:-1]
    spread = below * (n - below) * (cumulative / below
                                    - (ordered.sum() - cumulative) / (n - below)) ** 2
    spread[ordered[1:] == ordered[:-1]] = -1.0  # a split falls between distinct values
    i = int(torch.argmax(spread))
    return float((ordered[i] + ordered[i + 1]) / 2)


def generator_on(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator`` (CPU) — deterministic per call."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def train_poison_classifier(images: torch.Tensor, pool: torch.Tensor, triggers: torch.Tensor,
                            val_pos: torch.Tensor, val_neg: torch.Tensor,
                            config: ClassifierConfig, mean, std, *, seed: int = 0,
                            verbose: bool = True, stages: StageFiles = NO_STAGES,
                            resume: bool = False) -> tuple[list[nn.Module], ClassifierReport]:
    """Train the ensemble on uint8 bank ``images`` (indices ``pool``) with ``triggers`` (uint8
    ``k×3×w×w``); validate on bank rows ``val_pos`` (label 1) and ``val_neg`` (label 0).

    With ``stages`` each member's whole training state (weights, optimizer, schedule, batch
    stream, early-stopping history) is written atomically to ``stages.path("member<i>")`` every
    ``stages.save_every_s`` seconds and when it finishes; with ``resume`` a member continues
    from its state — a finished one is loaded, not retrained — and the ensemble ends with the
    very weights of an uninterrupted run. A state saved for other settings or data is ignored
    (that member starts afresh); without ``resume`` every member starts afresh. In a
    ``torch.distributed`` world the members are dealt over the ranks (each seeded by its index
    alone, so the ensemble does not depend on the world size) and gathered on every rank; with
    ``config.data_parallel`` and fewer members than ranks every rank trains every member on its
    shard of each batch (gradients averaged, BatchNorm over the whole batch: one process's
    ensemble up to reduction-order rounding)."""
    device = images.device
    size = images.shape[-1]
    mean_t = torch.as_tensor(mean, device=device, dtype=torch.float32)[:, None, None]
    std_t = torch.as_tensor(std, device=device, dtype=torch.float32)[:, None, None]
    val_rows = torch.cat([val_pos, val_neg]).to(device)
    val_x = (images[val_rows].float() / 255 - mean_t) / std_t
    val_y = torch.cat([torch.ones(val_pos.numel()), torch.zeros(val_neg.numel())]).long()
    # members dealt over the ranks; with data_parallel and fewer members than ranks, each
    # member's batches are shared by every rank instead (not bit-exact: docs/scaling.md)
    data_parallel = config.data_parallel and config.n_models < world().size
    trained = {}
    for member in range(config.n_models) if data_parallel else shard(config.n_models):
        torch.manual_seed(seed * 101 + member)
        g = torch.Generator().manual_seed(seed * 7919 + member)
        model = PoisonNet(config.width, size, imagenet_stem=config.recipe == "published").to(
            device, memory_format=conv_memory_format(device))
        sampler = PoolSampler(pool, config, g)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        schedule = warmup_cosine(optimizer, 0, config.iterations)
        run = {"classifier": asdict(config), "seed": seed, "member": member,
               "mean": list(mean), "std": list(std)}
        saved = TrainingState(stages.path(f"member{member}"), run,
                              (images, pool, triggers, val_pos, val_neg), {"model": model},
                              optimizer, schedule, {"batches": g}, device, stages.save_every_s,
                              writer=world().main if data_parallel else True)
        steps = saved.restore(refuse_other=False) if resume else 0
        history: list[int] = list(saved.extra.get("history", [])) if steps else []
        best = float(saved.extra.get("best", 0.0)) if steps else 0.0
        if steps and "sampler" in saved.extra:
            sampler.load(saved.extra["sampler"])
        if steps:
            log.info("poison classifier %d: resuming after %d iterations", member + 1, steps)
        bar = tqdm(total=config.iterations, initial=steps,
                   desc=f"classifier {member + 1}/{config.n_models}", disable=not verbose,
                   unit="it")
        done = bool(saved.extra.get("done")) if steps else False

        with global_batch_norm(*([model] if data_parallel else [])):
            for step in range(steps + 1, (steps if done else config.iterations) + 1):
                model.train()
                x, y = make_batch(images, sampler.rows(), triggers, config, mean_t, std_t, g)
                logits = sharded_forward(model, x) if data_parallel else model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if data_parallel:
                    average_gradients(model.parameters())
                optimizer.step()
                schedule.step()
                steps = step
                bar.update()
                if validates_after(step, config):
                    model.eval()
                    with torch.no_grad():
                        f1 = _f1(model(val_x).cpu(), val_y)
                    history.append(published_f1_percent(f1) if config.recipe == "published"
                                   else round(100 * f1))
                    best = max(best, f1)
                    bar.set_postfix(f1=f"{f1:.2f}")
                    if stops_early(history, config):
                        break
                saved.save(steps, extra={"history": history, "best": best,
                                         "sampler": sampler.state()})
        if not done:
            saved.save(steps, extra={"history": history, "best": best, "done": True,
                                     "sampler": sampler.state()}, final=True)
        bar.close()
        model.eval()
        trained[member] = (model, sampler.epochs if config.recipe == "published" else 1, steps,
                           max(best, 0.0), saved.seconds_before)
        log.info("poison classifier %d: stopped after %d iterations, best validation F1 %.3f",
                 member + 1, steps, best)
    if world().size > 1 and not data_parallel:  # every rank gets every member (on the CPU)
        shared = gather_objects({m: (net.cpu().state_dict(), *rest)
                                 for m, (net, *rest) in trained.items()})
        trained = {}
        for part in shared:
            for m, (weights, *rest) in part.items():
                net = PoisonNet(config.width, size, imagenet_stem=config.recipe == "published")
                net.load_state_dict(weights)
                trained[m] = (net.to(device, memory_format=conv_memory_format(device)).eval(),
                              *rest)
    report = ClassifierReport([], [])
    models = []
    for member in range(config.n_models):
        model, weight, steps, best, resumed = trained[member]
        models.append(model)
        report.weights.append(weight)
        report.iterations.append(steps)
        report.best_f1.append(best)
        report.resumed_seconds += resumed
    return models, report


@torch.no_grad()
def ensemble_logits(models: list[nn.Module], images: torch.Tensor, mean, std,
                    batch_size: int = 512, weights: list[int] | None = None) -> torch.Tensor:
    """Averaged logits float32 ``N×2`` of uint8 bank ``images`` (weighted by ``weights``, one
    per model; equal by default)."""
    device = images.device
    mean_t = torch.as_tensor(mean, device=device, dtype=torch.float32)[:, None, None]
    std_t = torch.as_tensor(std, device=device, dtype=torch.float32)[:, None, None]
    w = torch.tensor([1.0] * len(models) if weights is None else [float(v) for v in weights],
                     device=device)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = (images[start:start + batch_size].float() / 255 - mean_t) / std_t
        stacked = torch.stack([m(x).float() for m in models])
        out.append((stacked * w[:, None, None]).sum(0) / w.sum())
    return torch.cat(out) if out else torch.empty(0, 2, device=device)
