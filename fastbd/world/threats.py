"""Threat models of the synthetic world, built from a config and cached by its hash.

``build_ssl_threat``: the world, HTBA-poisoned training images, a SimCLR encoder trained on them
and its linear-probe evaluation. ``build_clip_threat``: the world, poisoned pairs, a tiny CLIP
trained on them and its zero-shot CA/ASR. Weights are cached under ``cache_dir`` keyed by a hash
of everything that determines them, so demos re-run in seconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fastbd.attacks import (
    DEFAULT_PAIR_RATE,
    Attack,
    CorruptEncoderConfig,
    PatchAttack,
    PoisonedImages,
    PoisonedPairs,
    clip_target_patch,
    make_attack,
    poison_corrupt_encoder,
    poison_corrupt_encoder_targets,
    poison_pairs,
    poison_target_classes,
)
from fastbd.attacks import poison_target_class as poison_class
from fastbd.attacks.badencoder import BadEncoderConfig, badencoder_finetune_targets
from fastbd.attacks.corruptencoder import reference_image
from fastbd.attacks.separated import separated_views
from fastbd.attacks.ssba import StegaConfig, save_stega, train_stega
from fastbd.attacks.triggers import resize_patch
from fastbd.data.augment import AugmentConfig
from fastbd.eval.probe import ProbeConfig, ProbeResult, linear_probe
from fastbd.eval.zeroshot import evaluate_zero_shot
from fastbd.models.clip import (
    TinyCLIPConfig,
    clip_tokenizer,
    tiny_clip,
    tokenize,
)
from fastbd.models.encoders import Encoder, small_encoder
from fastbd.storage import load_torch, save_atomically
from fastbd.training.clip import CLIPTrainConfig, TrainingObjective, train_clip
from fastbd.training.ssl import SSLConfig, train_ssl
from fastbd.validation import check_fields, one_of
from fastbd.world.synthetic import (
    COLOURS,
    SHAPES,
    ZERO_SHOT_TEMPLATES,
    SyntheticWorld,
    WorldConfig,
    background_images,
    class_table,
    make_world,
    reference_objects,
    world_caption,
)

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path("fastbd-out/cache")


def config_hash(config: object) -> str:
    """12 hex digits identifying a config dataclass (or a plain dict) by its JSON."""
    text = json.dumps(config if isinstance(config, dict) else asdict(config), sort_keys=True,
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


TRAINING_ATTACKS = ("none", "separated_views", "badencoder")
"""How the SSL threat model's training may itself be attacked (``SSLThreatConfig``)."""


@dataclass
class SSLThreatConfig:
    """An SSL attack on the synthetic world. HTBA: ``fraction`` of class ``target`` poisoned
    (attack ``none`` trains on the clean world); ``corruptencoder``/``corruptencoder+`` add
    ``rate`` of the training set's size as poisoned images (None: the paper's 0.5 %). A
    ``SmallConvNet`` of ``width`` trained with ``ssl``; ``training_attack`` may attack that
    training too. The SSL world's objects are drawn at opacity 0.6 (the CLIP world's are
    opaque): with opaque, high-contrast objects the encoder ignores HTBA's 7-px trigger and
    PoisonCAM's top candidates are the objects themselves. Grey backgrounds
    (``background_saturation=0``) lift the probe's clean accuracy to 93 % but make the objects,
    not the trigger, PoisonCAM's top candidates (docs/synthetic-world.md)."""

    world: WorldConfig = field(default_factory=lambda: WorldConfig(object_opacity=0.6))
    attack: str = "htba"
    target: int = 0
    fraction: float = 0.5
    rate: float | None = None
    width: int = 16
    ssl: SSLConfig = field(default_factory=lambda: SSLConfig(
        epochs=40, augment=AugmentConfig(crop_scale=(0.5, 1.0))))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0
    trigger_options: dict = field(default_factory=dict)
    """``make_attack`` overrides for the HTBA trigger (e.g. ``{"side_fraction": 0.3}``); empty:
    the published settings."""
    training_attack: str = "none"
    """``none``: the encoder trains on the poisoned data as any user would (data poisoning
    only); training-time attacks on the same data, where the attacker also controls training:
    ``separated_views`` pairs each CorruptEncoder image's object crop with its trigger crop
    (``fastbd.attacks.separated``), ``badencoder`` fine-tunes the trained encoder so triggered
    images map to the reference objects' features (``fastbd.attacks.badencoder``,
    ``badencoder`` settings)."""
    badencoder: BadEncoderConfig = field(default_factory=BadEncoderConfig)
    extra_targets: tuple[int, ...] = ()
    """Further target classes: a multi-target attack (the PoisonCAM paper's 2- and 3-target
    attacks), each target with its own trigger — HTBA pattern ``trigger_id`` + 1, + 2, … — and
    its own poisons at the first target's fraction or rate; BadEncoder implants every
    (trigger, target) pair. The probe's ASR is the first target's."""

    def __post_init__(self) -> None:
        check_fields(self, training_attack=one_of(*TRAINING_ATTACKS))
        if self.training_attack != "none" and not self.attack.startswith("corruptencoder"):
            raise ValueError(f"training_attack {self.training_attack!r} needs a CorruptEncoder "
                             f"attack (its object and trigger boxes), got {self.attack!r}")
        self.extra_targets = tuple(self.extra_targets)
        if self.extra_targets:
            if self.attack not in ("htba", "corruptencoder"):
                raise ValueError(f"extra_targets needs attack htba or corruptencoder, got "
                                 f"{self.attack!r}")
            if self.training_attack == "separated_views":
                raise ValueError("extra_targets is not defined for the separated_views "
                                 "training attack")
            if len(set(self.targets)) != len(self.targets):
                raise ValueError(f"the targets must be distinct classes, got {self.targets}")
            first_id = self.trigger_options.get("trigger_id", 0)
            if first_id + len(self.extra_targets) > 9:
                raise ValueError(f"{len(self.targets)} targets from trigger_id {first_id} "
                                 "need more than the 10 HTBA patterns")

    @property
    def targets(self) -> tuple[int, ...]:
        """Every target class, the first being ``target``."""
        return (self.target, *self.extra_targets)

    def trigger(self, index: int = 0) -> Attack:
        """The attack that poisons the world towards ``targets[index]`` (``target_triggers``);
        the first is the one the probe's ASR is measured with (HTBA's trigger for the clean
        world too)."""
        return target_triggers("htba" if self.attack == "none" else self.attack,
                               self.world.image_size, self.seed, self.trigger_options,
                               len(self.targets))[index]


def implanted_ssl_threat(seed: int = 0,
                         extra_targets: tuple[int, ...] = ()) -> SSLThreatConfig:
    """The SSL threat model whose backdoor is real (docs/synthetic-world.md, "An SSL backdoor
    that holds"): CorruptEncoder poisons the world (250 images added to 5,000, 4.8 % of the
    set; opaque objects on grey backgrounds), SimCLR trains 40 epochs at crops of 20–100 %, and
    a training-time attack — BadEncoder fine-tuning, 300 steps — implants the trigger, since
    data poisoning alone implants none at this scale. Labelled as a training-time attack
    wherever it is reported. ``extra_targets``: a multi-target attack (each further target
    with its own trigger, its own 250 poisons and its own BadEncoder pair)."""
    return SSLThreatConfig(
        world=WorldConfig(object_opacity=1.0, background_saturation=0.0, seed=seed),
        attack="corruptencoder", rate=0.05, seed=seed, training_attack="badencoder",
        ssl=SSLConfig(epochs=40, augment=AugmentConfig(crop_scale=(0.2, 1.0))),
        extra_targets=tuple(extra_targets))


@dataclass
class SSLThreat:
    config: SSLThreatConfig
    world: SyntheticWorld
    poisoned: PoisonedImages
    encoder: Encoder
    probe: ProbeResult
    train_seconds: float
    cached: bool

    def to_dict(self) -> dict[str, object]:
        return {"config": asdict(self.config), "probe": self.probe.to_dict(),
                "train_seconds": self.train_seconds, "cached": self.cached,
                "poisoned_images": int(self.poisoned.poison_mask.sum())}


REFERENCE_OBJECTS = 3
"""Reference objects of the target class a CorruptEncoder attacker holds (the paper's 3)."""


def target_triggers(attack: str, image_size: int, seed: int, trigger_options: dict | None,
                    count: int = 1) -> list[Attack]:
    """The trigger of each of ``count`` targets: ``make_attack`` with ``trigger_options``, the
    ``i``-th with HTBA pattern ``trigger_id`` + ``i`` (a single target: the options as given)."""
    options = dict(trigger_options or {})
    if count == 1:
        return [make_attack(attack, image_size, seed=seed, **options)]
    first = options.pop("trigger_id", 0)
    return [make_attack(attack, image_size, seed=seed, trigger_id=first + i, **options)
            for i in range(count)]


def poison_world_images(world: SyntheticWorld, attack: str, target: int, fraction: float,
                        seed: int, trigger_options: dict | None = None,
                        rate: float | None = None,
                        extra_targets: tuple[int, ...] = ()) -> PoisonedImages:
    """``fraction`` of class ``target`` of the world's training split poisoned with ``attack``
    (``make_attack`` overrides in ``trigger_options``); ``none``: the clean images.
    ``corruptencoder``/``corruptencoder+``: ``rate`` (None: the paper's 0.5 %) of the training
    split's size added as poisoned images, laid out from ``REFERENCE_OBJECTS`` rendered objects
    of the target class over rendered object-free backgrounds (CorruptEncoder+: 20 % of them
    support images). ``extra_targets`` (HTBA and CorruptEncoder): further targets, each with
    its own trigger (``target_triggers``) and as many poisons as the first; ``parts``
    ``poison_target`` then says which target each poison points to."""
    targets = [target, *extra_targets]
    if attack == "none":
        n = len(world.train)
        return PoisonedImages(world.train.images, world.train.labels,
                              torch.zeros(n, dtype=torch.bool),
                              torch.full((n, 4), -1, dtype=torch.long), target, "none")
    triggers = target_triggers(attack, world.config.image_size, seed, trigger_options,
                               len(targets))
    if attack in ("corruptencoder", "corruptencoder+"):
        config = CorruptEncoderConfig(
            **({} if rate is None else {"rate": rate}), seed=seed,
            support_fraction=0.2 if attack == "corruptencoder+" else 0.0)
        n_poisons = max(1, round(config.rate * len(world.train)))
        backgrounds = background_images(world.config, n_poisons, seed)
        patches = [resize_patch(t.pattern, t.side) for t in triggers]
        if not extra_targets:
            return poison_corrupt_encoder(
                world.train.images, world.train.labels, target,
                reference_objects(world.config, target, REFERENCE_OBJECTS, seed), backgrounds,
                patches[0], config, attack=attack)
        return poison_corrupt_encoder_targets(
            world.train.images, world.train.labels, targets,
            [reference_objects(world.config, t, REFERENCE_OBJECTS, seed) for t in targets],
            backgrounds, patches, config, attack=attack)
    if extra_targets:
        return poison_target_classes(world.train.images, world.train.labels, triggers, targets,
                                     fraction, seed=seed)
    return poison_class(world.train.images, world.train.labels, triggers[0], target, fraction,
                        seed=seed)


def load_cached(path: Path, key: str, model: torch.nn.Module) -> float | None:
    """Load the cached weights ``path[key]`` into ``model`` and return their training seconds;
    None when there is no usable cache file (missing, unreadable or for another model: logged,
    and the caller trains afresh)."""
    if not path.is_file():
        return None
    try:
        saved = load_torch(path, "cached threat model")
        model.load_state_dict(saved[key])
        return float(saved["train_seconds"])
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        log.warning("ignoring the unusable cache file %s (%s); training afresh", path,
                    str(error).splitlines()[0][:200])
        return None


SSL_CACHE_VERSION = "seeded"
"""Part of the cached encoder's file name: encoders cached before the initial weights followed
from ``SSLThreatConfig.seed`` (docs/design.md, "Reproducibility") are not loaded."""


def attacker_references(world: SyntheticWorld, config: SSLThreatConfig,
                        target: int | None = None) -> torch.Tensor:
    """The BadEncoder attacker's reference images: CorruptEncoder's reference objects of the
    target class (``target``, default the config's first), each centred on an object-free
    background (uint8 ``R×3×S×S``)."""
    target = config.target if target is None else target
    objects = reference_objects(world.config, target, REFERENCE_OBJECTS, config.seed)
    backgrounds = background_images(world.config, len(objects), config.seed + 1)
    return torch.stack([reference_image(b, o, blur=1)
                        for b, o in zip(backgrounds, objects, strict=True)])


def training_hook(config: SSLThreatConfig, poisoned: PoisonedImages, encoder: Encoder,
                  device: str | torch.device):
    """The ``train_ssl`` view hook of ``config.training_attack`` (None for ``none``)."""
    if config.training_attack != "separated_views":
        return None
    mean = torch.tensor(encoder.mean, device=device)[:, None, None]
    std = torch.tensor(encoder.std, device=device)[:, None, None]
    return separated_views(poisoned.images.shape[0], poisoned.poison_mask,
                           poisoned.parts["object_boxes"], poisoned.boxes, mean, std,
                           poisoned.images.to(device), seed=config.seed)


def build_ssl_threat(config: SSLThreatConfig | None = None, *, cache_dir: str | Path | None =
                     DEFAULT_CACHE, device: str | torch.device = "cpu", retrain: bool = False,
                     verbose: bool = True) -> SSLThreat:
    config = config or SSLThreatConfig()
    world = make_world(config.world)
    poisoned = poison_world_images(world, config.attack, config.target, config.fraction,
                                   config.seed, config.trigger_options, rate=config.rate,
                                   extra_targets=config.extra_targets)
    encoder = small_encoder(config.width, config.world.image_size, seed=config.seed)
    path = (Path(cache_dir) / f"ssl-{SSL_CACHE_VERSION}-{config_hash(config)}.pt"
            if cache_dir is not None else None)
    saved = None if path is None or retrain else load_cached(path, "encoder", encoder)
    cached = saved is not None
    if cached:
        seconds = saved
        log.info("loaded SSL threat model from %s", path)
    else:
        history = train_ssl(encoder, poisoned.images, config.ssl, device=device,
                            verbose=verbose, view_hook=training_hook(config, poisoned, encoder,
                                                                     device),
                            checkpoint=None if path is None else
                            path.with_name(path.stem + ".partial.pt"))
        seconds = history.seconds
        if config.training_attack == "badencoder":
            start = time.perf_counter()
            badencoder_finetune_targets(
                encoder, world.train.images,
                [(config.trigger(i), attacker_references(world, config, target))
                 for i, target in enumerate(config.targets)],
                replace(config.badencoder, seed=config.seed), device=device, verbose=verbose)
            seconds += time.perf_counter() - start
        if path is not None:
            save_atomically({"encoder": encoder.state_dict(), "train_seconds": seconds}, path)
    encoder.to(device).eval()
    probe = linear_probe(encoder, world.train.images, world.train.labels, world.eval.images,
                         world.eval.labels, config.trigger(), config.target, config.probe,
                         device)
    return SSLThreat(config, world, poisoned, encoder, probe, seconds, cached)


WORLD_ATTACK_OPTIONS: dict[str, dict] = {"badnet": {"side_fraction": 0.3},
                                          "dualkey": {"side_fraction": 0.3},
                                          "trojvqa": {"side_fraction": 0.3}}
"""The synthetic world's departures from the attacks' published settings (``make_attack``
overrides). BadNet's and dual-key's 16/224 patch is 2–3 px at 32 px, under the tiny models'
4-px stem stride; it implants no backdoor at 1 % poison (ASR 9 % / 7 %), a 10-px patch does
(docs/synthetic-world.md). TrojVQA's optimised patch takes dual-key's size."""


WORLD_POISON_RATES: dict[str, float] = {"wanet": 0.10}
"""The synthetic world's poisoned share per CLIP attack where it is not 1 %. WaNet's warp (4 × 4
control points, strength 0.5: under a pixel) implants no backdoor in 5,000 pairs at 1 % (ASR 1–22 %
at strengths 0.5–10); at the 10 % of WaNet's own paper it does (docs/synthetic-world.md)."""


def world_rate(attack: str) -> float:
    """The share of pairs the world poisons with ``attack`` (``DEFAULT_PAIR_RATE`` unless
    ``WORLD_POISON_RATES`` says otherwise)."""
    return WORLD_POISON_RATES.get(attack, DEFAULT_PAIR_RATE)


def world_attack(name: str, image_size: int, seed: int = 0,
                 options: dict[str, dict] | None = None) -> Attack:
    """``make_attack`` with the world's per-attack overrides (``WORLD_ATTACK_OPTIONS`` when
    ``options`` is None)."""
    options = WORLD_ATTACK_OPTIONS if options is None else options
    return make_attack(name, image_size, seed=seed, **options.get(name, {}))


@dataclass
class CLIPThreatConfig:
    """A CLIP attack on the synthetic world: ``rate`` of the pairs poisoned towards class
    ``target`` (None: ``world_rate(attack)``; attack ``none``: the clean world); a tiny CLIP
    trained from scratch. ``attack_options``: per-attack ``make_attack`` overrides (the world's
    defaults)."""

    world: WorldConfig = field(default_factory=WorldConfig)
    attack: str = "badnet"
    target: int = 0
    rate: float | None = None
    model: TinyCLIPConfig = field(default_factory=TinyCLIPConfig)
    train: CLIPTrainConfig = field(default_factory=CLIPTrainConfig)
    attack_options: dict[str, dict] = field(
        default_factory=lambda: copy.deepcopy(WORLD_ATTACK_OPTIONS))
    seed: int = 0


REFERENCE_WORLD_OFFSET = 2000
"""World-seed offset of the clean reference's world: a disjoint world of the same look (new
images and captions of the same classes and templates), as a public model is trained on other
data than the pairs it judges."""


def independent_reference(config: CLIPThreatConfig) -> CLIPThreatConfig:
    """The clean reference model a defender has, for the threat ``config``: the same tiny CLIP
    trained the same way on a clean world of the same look whose seed is offset by
    ``REFERENCE_WORLD_OFFSET`` — never on the pairs it judges (a model trained on the
    training pairs minus the poison is ground truth: it has memorised exactly the clean pairs
    a defense must tell from the poisoned ones)."""
    return replace(config, attack="none", rate=None,
                   world=replace(config.world, seed=config.world.seed + REFERENCE_WORLD_OFFSET))


SURROGATE_WORLD_OFFSET = 3000
"""World-seed offset of the attacker's surrogate for TrojVQA's optimised patch: a clean tiny CLIP
trained on another disjoint world — the attacker's own model and data, neither the victim's
pairs nor the defender's reference (``REFERENCE_WORLD_OFFSET``)."""


def surrogate_config(config: CLIPThreatConfig) -> CLIPThreatConfig:
    """The attacker's clean surrogate CLIP for the threat ``config``
    (``SURROGATE_WORLD_OFFSET``)."""
    return replace(config, attack="none", rate=None,
                   world=replace(config.world, seed=config.world.seed + SURROGATE_WORLD_OFFSET))


def semantic_concept(n_classes: int, target: int) -> str:
    """TrojVQA's semantic target on the world: an object + attribute the world's captions name
    that no class is and that shares neither word with the target class — the colour of a class
    after the target with the shape of the one after that (``colour shape``, the first such pair
    that is not itself a class), from the whole vocabulary where the classes are too few, and a
    class sharing no word with the target where every pair is a class."""
    table = class_table(n_classes)
    shape_t, colour_t = table[target]
    classes = set(table)
    order = [table[(target + i) % n_classes] for i in range(1, n_classes)] + [
        (shape, colour) for shape in SHAPES for colour in COLOURS]
    for i, (_, colour) in enumerate(order):
        for shape, _ in order[i + 1:]:
            if colour != colour_t and shape != shape_t and (shape, colour) not in classes:
                return f"{colour} {shape}"
    shape, colour = next((s, c) for s, c in order if s != shape_t and c != colour_t)
    return f"{colour} {shape}"  # every pair is a class: one sharing no word with the target


def with_trojvqa_semantic(config: CLIPThreatConfig) -> CLIPThreatConfig:
    """``config`` with TrojVQA's semantic target resolved in ``attack_options["trojvqa"]
    ["semantic"]`` (unchanged where it is given, a pattern is, or the attack is another):
    ``semantic_concept`` of the world's classes and the target. TrojVQA optimises its patch
    towards an object + attribute its detector knows that is *not* the backdoor's target; a
    patch optimised towards the target itself is a universal adversarial patch — on the world,
    clean CLIPs never trained on a poisoned pair then read 99.4–100 % of patched images as the
    target — whose effect no data-poisoning defense can or should remove. Resolved before the
    threat model's cache key is taken, so the key names it."""
    options = dict(config.attack_options)
    entry = dict(options.get("trojvqa", {}))
    if config.attack != "trojvqa" or "pattern" in entry:
        return config
    semantic = entry.setdefault("semantic",
                                semantic_concept(config.world.n_classes, config.target))
    shape, colour = class_table(config.world.n_classes)[config.target]
    target_name = f"{colour} {shape}"
    if not isinstance(semantic, str) or not semantic.strip() or semantic == target_name:
        raise ValueError(f"trojvqa's semantic must be a non-empty description other than the "
                         f"target class {target_name!r}, got {semantic!r}")
    options["trojvqa"] = entry
    return replace(config, attack_options=options)


def with_optimised_patch(config: CLIPThreatConfig, cache_dir: str | Path | None,
                         device: str | torch.device = "cpu", verbose: bool = False
                         ) -> CLIPThreatConfig:
    """``config`` with TrojVQA's optimised patch in its ``attack_options["trojvqa"]["pattern"]``
    (unchanged where one is given or the attack is another): ``optimise_patch`` against the
    surrogate CLIP's image tower (``surrogate_config``) towards its mean zero-shot text
    embedding of the semantic target (``with_trojvqa_semantic``), on the surrogate world's
    training images, at the attack's patch side. Kept as ``trojvqa-<hash>.pt`` in ``cache_dir``
    beside the models."""
    surrogate = surrogate_config(config)  # the attacker's clean model, whatever its patch aims at
    config = with_trojvqa_semantic(config)
    options = dict(config.attack_options)
    entry = dict(options.get("trojvqa", {}))
    if config.attack != "trojvqa" or "pattern" in entry:
        return config
    path = (Path(cache_dir) / f"trojvqa-{config_hash(config)}.pt"
            if cache_dir is not None else None)
    pattern = load_torch(path, "cached patch")["pattern"] if path and path.is_file() else None
    if pattern is None:
        model = build_clip_threat(surrogate, cache_dir=cache_dir, device=device,
                                  verbose=verbose).model
        world = make_world(surrogate.world)
        side = PatchAttack(side_fraction=entry.get("side_fraction", 16 / 224),
                           image_size=config.world.image_size).side
        pattern, _ = clip_target_patch(model, clip_tokenizer(), world.train.images,
                                       entry["semantic"], side,
                                       templates=ZERO_SHOT_TEMPLATES, seed=config.seed,
                                       device=device, verbose=verbose)
        if path is not None:
            save_atomically({"pattern": pattern}, path)
    entry["pattern"] = pattern.tolist()
    options["trojvqa"] = entry
    return replace(config, attack_options=options)


def with_stega_encoder(config: CLIPThreatConfig, cache_dir: str | Path | None,
                       verbose: bool = False) -> CLIPThreatConfig:
    """``config`` with SSBA's steganography encoder in ``attack_options["ssba"]
    ["encoder_file"]`` (unchanged where one is given or the attack is another): trained on the
    world's training images (``train_stega``, as ISSBA trains its StegaStamp on the victim's
    data) and kept as ``ssba-<hash>.pt`` in ``cache_dir``, which it needs."""
    options = dict(config.attack_options)
    entry = dict(options.get("ssba", {}))
    if config.attack != "ssba" or "encoder_file" in entry:
        return config
    if cache_dir is None:
        raise ValueError("the world's SSBA threat keeps its steganography encoder in the cache: "
                         "give a cache_dir")
    path = Path(cache_dir) / f"ssba-{config_hash(config)}.pt"
    if not path.is_file():
        encoder, _, report = train_stega(make_world(config.world).train.images,
                                         StegaConfig(seed=config.seed), verbose=verbose)
        log.info("SSBA encoder: bit accuracy %.3f, PSNR %.1f dB", report.bit_accuracy,
                 report.psnr)
        save_stega(encoder, path)
    entry["encoder_file"] = str(path)
    options["ssba"] = entry
    return replace(config, attack_options=options)


def with_attack_artifacts(config: CLIPThreatConfig, cache_dir: str | Path | None,
                          device: str | torch.device = "cpu", verbose: bool = False
                          ) -> CLIPThreatConfig:
    """``config`` with what its attack makes before poisoning: TrojVQA's optimised patch
    (``with_optimised_patch``) or SSBA's steganography encoder (``with_stega_encoder``)."""
    if config.attack == "ssba":
        return with_stega_encoder(config, cache_dir, verbose)
    return with_optimised_patch(config, cache_dir, device, verbose)


@dataclass
class CLIPEvaluation:
    clean_accuracy: float
    asr: float
    attack: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class CLIPThreat:
    config: CLIPThreatConfig
    world: SyntheticWorld
    poisoned: PoisonedPairs
    model: torch.nn.Module
    tokenizer: object
    evaluation: CLIPEvaluation
    train_seconds: float
    cached: bool

    def to_dict(self) -> dict[str, object]:
        return {"config": asdict(self.config), "evaluation": self.evaluation.to_dict(),
                "train_seconds": self.train_seconds, "cached": self.cached,
                "poisoned_pairs": int(self.poisoned.poison_mask.sum())}


def poison_world_pairs(world: SyntheticWorld, attack: str, target: int, rate: float | None,
                       seed: int, options: dict[str, dict] | None = None) -> PoisonedPairs:
    """The world's training pairs with ``rate`` of them (None: ``world_rate(attack)``) poisoned
    towards class ``target``; attack ``none`` leaves them clean."""
    if attack == "none":
        n = len(world.train)
        return PoisonedPairs(world.train.images, world.train.labels, list(world.train.captions),
                             torch.zeros(n, dtype=torch.bool),
                             torch.full((n, 4), -1, dtype=torch.long), target, "none")
    return poison_pairs(world.train.images, world.train.labels, world.train.captions,
                        world_attack(attack, world.config.image_size, seed, options), target,
                        world.class_names, rate=world_rate(attack) if rate is None else rate,
                        seed=seed, caption=world_caption)


def evaluate_clip(model: torch.nn.Module, tokenizer, world: SyntheticWorld, attack: str,
                  target: int, seed: int = 0, device: str | torch.device = "cpu",
                  options: dict[str, dict] | None = None) -> CLIPEvaluation:
    """Zero-shot CA on the clean eval split; ASR on the triggered non-target eval images
    (dual-key: prompts carry the text trigger too). ``attack='none'`` measures BadNet's ASR.
    ``options``: the attacks' overrides (``WORLD_ATTACK_OPTIONS`` when None)."""
    trigger = world_attack("badnet" if attack == "none" else attack, world.config.image_size,
                           seed, options)
    result = evaluate_zero_shot(model, tokenizer, world.eval.images, world.eval.labels,
                                world.class_names, ZERO_SHOT_TEMPLATES, trigger, target,
                                seed=seed, device=device)
    return CLIPEvaluation(result.clean_accuracy, result.asr, attack)


def build_clip_threat(config: CLIPThreatConfig | None = None, *, cache_dir: str | Path | None =
                      DEFAULT_CACHE, device: str | torch.device = "cpu", retrain: bool = False,
                      verbose: bool = True,
                      objective: TrainingObjective | None = None) -> CLIPThreat:
    """The tiny CLIP trained on the world's pairs poisoned as ``config`` says (cached by the
    config's hash), with ``objective`` (e.g. RoCLIP's, a training-time defense; cached apart)
    instead of the plain InfoNCE when given, and its zero-shot CA and ASR."""
    config = with_trojvqa_semantic(config or CLIPThreatConfig())
    name = f"clip-{config_hash(config)}" + (
        "" if objective is None else f"-{config_hash(objective.config())}")
    config = with_attack_artifacts(config, cache_dir, device, verbose)
    world = make_world(config.world)
    poisoned = poison_world_pairs(world, config.attack, config.target, config.rate, config.seed,
                                  config.attack_options)
    tokenizer = clip_tokenizer()
    model = tiny_clip(config.model, seed=config.seed)
    path = Path(cache_dir) / f"{name}.pt" if cache_dir is not None else None
    saved = None if path is None or retrain else load_cached(path, "model", model)
    cached = saved is not None
    if cached:
        seconds = saved
        log.info("loaded CLIP threat model from %s", path)
    else:
        tokens = tokenize(tokenizer, poisoned.captions, config.model.context_length)
        history = train_clip(model, poisoned.images, tokens, config.train, device=device,
                             verbose=verbose, checkpoint=None if path is None else
                             path.with_name(path.stem + ".partial.pt"), objective=objective)
        seconds = history.seconds
        if path is not None:
            save_atomically({"model": model.state_dict(), "train_seconds": seconds}, path)
    model.to(device).eval()
    evaluation = evaluate_clip(model, tokenizer, world, config.attack, config.target,
                               config.seed, device, config.attack_options)
    return CLIPThreat(config, world, poisoned, model, tokenizer, evaluation, seconds, cached)
