"""Image encoders: a module mapping normalised float images ``N×3×S×S`` to features ``N×D``,
with the ``mean``/``std`` (in [0, 1] units) and input size it expects.

Adapters: ``SmallConvNet`` (the synthetic world's encoder, trainable on two CPU cores), timm and
torchvision backbones, MoCo v3 checkpoints (``module.base_encoder.*`` keys), and the image tower
of an open_clip model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from fastbd.ops import all_finite
from fastbd.storage import load_state_dict_file, state_dict_mismatch

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


IMAGENET_CROP = 224 / 256

CPU_CHUNK_BYTES = 4 * 2**20
"""The largest activation one CPU forward of an encoder in eval mode may allocate (bytes). glibc
serves an allocation above its mmap threshold (adaptive, at most 32 MiB on 64-bit Linux) with
fresh pages it returns to the system on ``free``, and trims the heap's top past twice that
threshold: a forward of thousands of images then faults every activation's pages in anew,
batch after batch (measured: a third of the flip test's CPU time, 2–6 M page faults a run).
With activations at an eighth of that ceiling the heap's pages are reused instead (8 MiB still
faulted hundreds of thousands of times a run, 4 and 2 MiB a few thousand) —
``bench/bench_chunked_forward.py`` measures both ways."""


def largest_activation_bytes(module: nn.Module, example: torch.Tensor) -> int:
    """The bytes of the largest output any sub-module of ``module`` produces for ``example``
    (one forward, no gradients)."""
    sizes = [example.numel() * example.element_size()]

    def record(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in module.modules()]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return max(sizes)


def forward_flops(module: nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one forward of ``module`` on ``example`` (torch's ``FlopCounterMode``: matrix
    products and convolutions, 2 per multiply-add) divided by its rows: the per-image cost,
    the same on every machine."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(example)
    return counter.get_total_flops() / max(1, example.shape[0])


class Encoder(nn.Module):
    """A backbone plus its input convention. ``forward``: float ``N×3×S×S`` → ``N×D``.

    ``mean``/``std`` normalise [0, 1] pixels; files are read at ``image_size`` through the
    model's eval transform: the shorter side resized to ``image_size / crop_ratio``, then a
    centre crop (``crop_ratio`` 1: resize only, as CLIP and fastbd's own encoders read).

    In eval mode on the CPU, with no autograd graph being built, a large batch is run in chunks
    of rows whose largest activation stays under ``CPU_CHUNK_BYTES`` (found once per input
    shape and dtype by one probing forward): each image's features are computed alone either
    way, so only the allocator's work changes. Training mode runs the batch whole (batch
    statistics need it), and so does a forward under autograd (its activations are kept for
    the backward anyway, and a forward hook — Grad-CAM's — must see the whole batch)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, image_size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 name: str = "encoder", crop_ratio: float = IMAGENET_CROP) -> None:
        super().__init__()
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name
        self.crop_ratio = float(crop_ratio)
        self._chunk_rows: dict[tuple, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training or torch.is_grad_enabled() or x.device.type != "cpu"
                or x.shape[0] <= 1):
            return self.backbone(x)
        rows = self.cpu_chunk_rows(x)
        if x.shape[0] <= rows:
            return self.backbone(x)
        return torch.cat([self.backbone(x[start:start + rows])
                          for start in range(0, x.shape[0], rows)])

    def cpu_chunk_rows(self, x: torch.Tensor) -> int:
        """How many rows of inputs shaped like ``x`` one CPU forward takes in eval mode."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._chunk_rows:
            per_image = largest_activation_bytes(self.backbone, x[:1])
            self._chunk_rows[key] = max(1, CPU_CHUNK_BYTES // per_image)
        return self._chunk_rows[key]

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights: the input dtype the encoder takes."""
        for parameter in self.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    def normalise(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 ``N×3×S×S`` → normalised encoder input in ``dtype`` (default: the weights')."""
        mean = torch.tensor(self.mean, device=images.device)[:, None, None]
        std = torch.tensor(self.std, device=images.device)[:, None, None]
        return ((images.float() / 255 - mean) / std).to(dtype or self.dtype)


def working_copy(module: nn.Module, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """``module`` itself when it is already on ``device``, in eval mode and (when given) of
    floating ``dtype``; otherwise a copy made so — the caller's module is never moved, cast or
    switched to eval mode by the pipelines that use it."""
    device = torch.device(device)
    tensors = [*module.parameters(), *module.buffers()]
    on_device = all(t.device.type == device.type and (device.index is None or t.device.index
                                                      == device.index) for t in tensors)
    right_dtype = dtype is None or all(t.dtype == dtype for t in tensors if t.is_floating_point())
    if on_device and right_dtype and not any(m.training for m in module.modules()):
        return module
    copy_ = copy.deepcopy(module).to(device)
    return (copy_ if dtype is None else copy_.to(dtype)).eval()


@torch.no_grad()
def embed_images(encoder: Encoder, images: torch.Tensor, *, batch_size: int = 512,
                 device: torch.device | str | None = None, normalize: bool = True
                 ) -> torch.Tensor:
    """Features of uint8 images ``N×3×S×S`` (any device, e.g. a memory-mapped bank), float32
    ``N×D`` on ``device``, L2-normalised unless ``normalize=False``. Raises on NaN features."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        chunks.append(encoder(encoder.normalise(batch)).float())
    encoder.train(was_training)
    features = torch.cat(chunks) if chunks else torch.empty(0, encoder.feature_dim,
                                                            device=device)
    if not all_finite(features):
        raise ValueError(f"encoder {encoder.name} returned NaN/Inf features")
    return nn.functional.normalize(features, dim=1) if normalize else features


class SmallConvNet(nn.Module):
    """Four 3×3 conv stages (stride 1, 2, 2, 2) with BatchNorm + ReLU, global average pool.
    ``width`` channels in the first stage, doubling; output ``8·width`` features. About 4 MMAC
    per 32-px image at width 16."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        for stage in range(4):
            layers += [nn.Conv2d(channels[stage], channels[stage + 1], 3,
                                 stride=1 if stage == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(channels[stage + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@contextmanager
def seeded_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Inside, the global RNG (and a CUDA ``device``'s) starts from ``seed`` — modules built or
    trained there follow from it alone; afterwards the caller's RNG is as it was (torch seeds it
    differently in every process)."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def small_encoder(width: int = 16, image_size: int = 32, seed: int = 0) -> Encoder:
    """A ``SmallConvNet`` whose initial weights follow from ``seed`` alone. It sees whole
    images (``crop_ratio`` 1): it is trained on them so, and the synthetic world's triggers
    may lie near the border."""
    with seeded_rng(seed):
        net = SmallConvNet(width)
    return Encoder(net, net.out_dim, image_size, name=f"smallconv{width}", crop_ratio=1.0)


def timm_encoder(arch: str, checkpoint: str | Path | None = None,
                 image_size: int | None = None, seed: int = 0) -> Encoder:
    """A timm backbone without its classifier (``num_classes=0``); random weights from
    ``seed`` unless a checkpoint (a state dict, or MoCo v3 format) is given. Mean, std, crop
    and (unless ``image_size`` is given) input size from the model's ``pretrained_cfg``; a
    ViT built for another size gets its position embeddings for ``image_size``."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    default_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    size = image_size or default_size
    with seeded_rng(seed):
        model = _create_timm_model(arch, size if size != default_size else None)
    if checkpoint is not None:
        load_state(model, checkpoint)
    cfg = {**cfg, **(getattr(model, "pretrained_cfg", {}) or {})}
    return Encoder(model, model.num_features, size, cfg.get("mean") or IMAGENET_MEAN,
                   cfg.get("std") or IMAGENET_STD, name=arch,
                   crop_ratio=float(cfg.get("crop_pct") or IMAGENET_CROP))


def _create_timm_model(arch: str, image_size: int | None) -> nn.Module:
    """A classifier-less timm model; with ``image_size``, built for it where the architecture
    is sized by ``img_size`` (ViTs: position embeddings) — convnets take any size as they are
    and refuse the argument."""
    import timm

    if image_size is not None:
        try:
            return timm.create_model(arch, pretrained=False, num_classes=0, img_size=image_size)
        except TypeError:
            pass
    return timm.create_model(arch, pretrained=False, num_classes=0)


def torchvision_encoder(arch: str, checkpoint: str | Path | None = None, image_size: int = 224,
                        seed: int = 0) -> Encoder:
    """A torchvision classification model with its final ``fc`` replaced by identity; random
    weights from ``seed`` unless a checkpoint is given."""
    import torchvision

    with seeded_rng(seed):
        model = torchvision.models.get_model(arch, weights=None)
    if not hasattr(model, "fc"):
        raise ValueError(f"torchvision model {arch!r} has no .fc head; use timm_encoder")
    dim = model.fc.in_features
    model.fc = nn.Identity()
    if checkpoint is not None:
        load_state(model, checkpoint)
    return Encoder(model, dim, image_size, name=arch)


SMALL_ENCODER_PREFIX = "smallconv"
"""``encoder_by_name`` names for ``SmallConvNet``: ``smallconv`` (width 16) or ``smallconv<W>``
— what ``fastbd train-ssl`` trains (and its ``Encoder.name``)."""


def default_image_size(arch: str) -> int:
    """The input side ``encoder_by_name`` uses when none is given: the synthetic world's 32 px
    for ``SmallConvNet``, the ``pretrained_cfg``'s for timm backbones, 224 px for torchvision's."""
    if arch.startswith(SMALL_ENCODER_PREFIX):
        return 32
    if arch.startswith("torchvision:"):
        return 224
    import timm

    cfg = timm.get_pretrained_cfg(arch.removeprefix("timm:"))
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def encoder_by_name(arch: str, checkpoint: str | Path | None = None,
                    image_size: int | None = None, seed: int = 0) -> Encoder:
    """An ``Encoder`` named the way the CLI's ``--arch`` names it: ``smallconv[<width>]``
    (``fastbd train-ssl``'s encoder), ``torchvision:<name>``, or a timm architecture
    (``timm:<name>`` or the bare name). Weights from ``checkpoint`` (any format ``load_state``
    reads), else random from ``seed``; ``image_size`` defaults to ``default_image_size(arch)``.
    An unknown name raises ``ValueError`` listing close timm names."""
    size = image_size or default_image_size(arch)
    if arch.startswith(SMALL_ENCODER_PREFIX):
        width = arch[len(SMALL_ENCODER_PREFIX):] or "16"
        if not width.isdigit() or int(width) < 1:
            raise ValueError(f"{arch!r}: a SmallConvNet is named smallconv<width>, e.g. "
                             f"smallconv16")
        encoder = small_encoder(int(width), size, seed)
        if checkpoint is not None:
            load_state(encoder.backbone, checkpoint)
        return encoder
    if arch.startswith("torchvision:"):
        return torchvision_encoder(arch.split(":", 1)[1], checkpoint, size, seed)
    import timm

    name = arch.removeprefix("timm:")
    if not timm.is_model(name):
        from difflib import get_close_matches

        near = get_close_matches(name, timm.list_models(), n=6, cutoff=0.75)
        raise ValueError(f"timm has no architecture {name!r}"
                         + (f"; similar names: {', '.join(near)}" if near else "")
                         + f" (torchvision models: torchvision:<name>; fastbd's own: "
                         f"{SMALL_ENCODER_PREFIX}<width>)")
    return timm_encoder(name, checkpoint, image_size, seed)


def load_state(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint into a backbone: plain state dicts, ``{'state_dict': …}`` or
    ``{'model': …}`` wrappers, MoCo v3 ``module.base_encoder.*`` keys, an ``Encoder``'s own
    ``backbone.*`` keys; heads (``fc``/``head``) and MoCo's momentum encoder / predictor are
    dropped. Missing backbone keys are an error."""
    path = Path(checkpoint)
    state = load_state_dict_file(path)
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.base_encoder.", "base_encoder.", "module.encoder_q.", "module.",
                       "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            if key.startswith(("module.momentum_encoder.", "module.predictor.")):
                continue
        if key.startswith(("fc.", "head.")) or "momentum_encoder" in key or "predictor" in key:
            continue
        cleaned[key] = value
    try:
        result = model.load_state_dict(cleaned, strict=False)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: "
                         f"{state_dict_mismatch(model, cleaned) or error}") from error
    missing = [k for k in result.missing_keys if not k.startswith(("fc.", "head."))]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} backbone weights, e.g. "
                         f"{missing[:3]}")
    if result.unexpected_keys:
        log.warning("ignored %d unexpected checkpoint keys, e.g. %s", len(result.unexpected_keys),
                    result.unexpected_keys[:3])


def open_clip_image_encoder(model: nn.Module, image_size: int | None = None) -> Encoder:
    """The image tower of an open_clip ``CLIP`` as an ``Encoder`` (the model's own mean/std,
    CLIP's resize-and-centre-crop)."""
    from fastbd.models.clip import clip_preprocessing

    visual = model.visual
    size = image_size or visual.image_size
    if isinstance(size, tuple | list):
        size = size[0]
    mean, std = clip_preprocessing(model)
    return Encoder(visual, visual.output_dim, size, mean, std, name="open_clip.visual",
                   crop_ratio=1.0)
