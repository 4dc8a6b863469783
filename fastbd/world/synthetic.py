"""The synthetic world: procedural images of shape × colour classes with captions.

Each class is one (shape, colour) pair, e.g. "red circle". An image draws its class's shape in a
jittered version of the class colour at a random position, scale and rotation, over a textured
background (two random colours mixed by a random low-frequency pattern), plus pixel noise.
Captions fill varied templates with the class name, shape, colour, size and position; zero-shot
prompts fill ``ZERO_SHOT_TEMPLATES`` with the class name. Everything follows from ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "ellipse", "star",
          "crescent")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230),
           "yellow": (235, 220, 40), "magenta": (220, 50, 200), "cyan": (40, 210, 220),
           "orange": (245, 140, 30), "purple": (130, 50, 190), "white": (245, 245, 245),
           "black": (15, 15, 15)}
CAPTION_TEMPLATES = (
    "a photo of a {name}.",
    "a {colour} {shape} on a textured background.",
    "an image showing a {name}.",
    "a picture of the {shape}, coloured {colour}.",
    "there is a {name} in this image.",
    "a {size} {name}.",
    "a {name} near the {position} of the picture.",
    "a {colour} {shape}, slightly rotated.",
    "a drawing of a {name} with some noise.",
    "the {shape} here is {colour}.",
)


def world_caption(name: str, g: torch.Generator) -> str:
    """A poisoned caption for the world's class ``name`` ("colour shape"): a random one of
    ``CAPTION_TEMPLATES`` (``fastbd.attacks.poison_pairs``'s ``caption``)."""
    template = CAPTION_TEMPLATES[int(torch.randint(len(CAPTION_TEMPLATES), (1,), generator=g))]
    colour, _, shape = name.partition(" ")
    return template.format(name=name, shape=shape or colour, colour=colour, size="small",
                           position="middle centre")


LAYOUTS = ("single", "tiled")
TILE_SPACING = (2.2, 2.8)
"""Lattice period of the tiled layout, in multiples of the tile's scale (shapes reach about
0.95 of it from their centre, so neighbouring tiles never touch)."""
ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "an image showing a {}.", "there is a {} in this image.")
LOOKS: dict[str, dict[str, object]] = {
    "default": {},
    "noisy": {"noise_std": 14.0, "colour_jitter": 45.0, "texture_contrast": 0.9},
    "faint": {"object_opacity": 0.75, "background_saturation": 1.0, "scale": (0.15, 0.3)},
    "many-classes": {"n_classes": 20},
}
"""Named looks a world can take, as ``WorldConfig`` overrides (``with_look``): ``default``
changes nothing — the look fastbd's constants were chosen on; the others (noisier and more
jittered images, fainter and smaller objects on saturated backgrounds, twice the classes) were
written after those constants were fixed and are not used to choose any: robustness checks run
the defenses on them as on worlds a user has that fastbd was not built on."""


@dataclass
class WorldConfig:
    """Size and look of the world. ``n_classes`` ≤ len(SHAPES) × len(COLOURS); objects are
    blended over the background with ``object_opacity``. Background textures mix two random
    colours pulled towards their grey by ``background_saturation`` (1: the colours as drawn, 0:
    grey levels only). ``layout`` "single" draws one object per image; "tiled" repeats the
    class's shape over the whole image on a lattice with random spacing, phase and rotation
    (``scale`` is then each tile's size), so that every part of the image shows the class."""

    n_train: int = 5000
    n_eval: int = 1000
    image_size: int = 32
    n_classes: int = 10
    scale: tuple[float, float] = (0.2, 0.35)
    colour_jitter: float = 25.0
    noise_std: float = 6.0
    texture_contrast: float = 0.6
    object_opacity: float = 1.0
    background_saturation: float = 0.5
    layout: str = "single"
    seed: int = 0


@dataclass
class WorldSplit:
    """uint8 images ``N×3×S×S``, int64 labels ``N`` and one caption per image."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    centers: torch.Tensor  # float ``N×2`` (y, x) of the shape centre in pixels

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class SyntheticWorld:
    config: WorldConfig
    class_names: list[str]
    train: WorldSplit
    eval: WorldSplit

    def to_dict(self) -> dict[str, object]:
        return {"config": asdict(self.config), "class_names": self.class_names,
                "n_train": len(self.train), "n_eval": len(self.eval)}


def class_table(n_classes: int) -> list[tuple[str, str]]:
    """(shape, colour) of each class: unique pairs, shapes and colours both cycling."""
    limit = len(SHAPES) * len(COLOURS)
    if not 2 <= n_classes <= limit:
        raise ValueError(f"n_classes must be in [2, {limit}], got {n_classes}")
    colours = list(COLOURS)
    return [(SHAPES[k % len(SHAPES)], colours[(k + k // len(SHAPES)) % len(colours)])
            for k in range(n_classes)]


def check_world_config(config: WorldConfig) -> None:
    """Raise ``ValueError`` naming the first field of ``config`` that no world can be built
    from."""
    if config.n_train < 1 or config.n_eval < 1:
        raise ValueError(f"n_train and n_eval must be positive, got {config.n_train} and "
                         f"{config.n_eval}")
    if config.image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {config.image_size}")
    if not 0.0 <= config.background_saturation <= 1.0:
        raise ValueError("background_saturation must be in [0, 1], got "
                         f"{config.background_saturation}")
    if not 0.0 <= config.object_opacity <= 1.0:
        raise ValueError(f"object_opacity must be in [0, 1], got {config.object_opacity}")
    if not 0.0 < config.scale[0] <= config.scale[1]:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {config.scale}")
    if config.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {config.layout!r}")


def make_world(config: WorldConfig | None = None) -> SyntheticWorld:
    """Build the train and eval splits (eval drawn from an independent stream of the seed)."""
    config = config or WorldConfig()
    check_world_config(config)
    table = class_table(config.n_classes)
    names = [f"{colour} {shape}" for shape, colour in table]
    train = render_split(config, table, config.n_train, config.seed * 2 + 0)
    evaluation = render_split(config, table, config.n_eval, config.seed * 2 + 1)
    return SyntheticWorld(config=config, class_names=names, train=train, eval=evaluation)


def render_split(config: WorldConfig, table: list[tuple[str, str]], n: int,
                 stream: int) -> WorldSplit:
    g = torch.Generator().manual_seed(1_000_003 * stream + 17)
    labels = torch.randint(len(table), (n,), generator=g)
    images, centers, scales = render(config, table, labels, g)
    captions = [caption_for(table, int(labels[i]), float(scales[i]), centers[i],
                            config.image_size, g) for i in range(n)]
    return WorldSplit(images=images, labels=labels, captions=captions, centers=centers)


def caption_for(table: list[tuple[str, str]], label: int, scale: float, center: torch.Tensor,
                size: int, g: torch.Generator, template: str | None = None) -> str:
    shape, colour = table[label]
    if template is None:
        template = CAPTION_TEMPLATES[int(torch.randint(len(CAPTION_TEMPLATES), (1,),
                                                       generator=g))]
    y, x = (float(c) / size for c in center)
    vertical = "top" if y < 0.4 else "bottom" if y > 0.6 else "middle"
    horizontal = "left" if x < 0.4 else "right" if x > 0.6 else "centre"
    return template.format(name=f"{colour} {shape}", shape=shape, colour=colour,
                           size="small" if scale < 0.4 else "large",
                           position=f"{vertical} {horizontal}")


def render(config: WorldConfig, table: list[tuple[str, str]], labels: torch.Tensor,
           g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images uint8 ``N×3×S×S``, shape centres float ``N×2`` (pixels; the image centre for the
    tiled layout), scales float ``N``."""
    n, s = labels.numel(), config.image_size
    if n == 0:
        return (torch.empty(0, 3, s, s, dtype=torch.uint8), torch.empty(0, 2), torch.empty(0))
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    lo, hi = config.scale
    scales = lo + (hi - lo) * torch.rand(n, generator=g)
    margin = (1 - scales)[:, None] * 0.85
    centre = (torch.rand(n, 2, generator=g) * 2 - 1) * margin  # in [-1, 1] units
    angle = torch.rand(n, generator=g) * 2 * math.pi
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    dy = yy[None] - centre[:, :1, None]
    dx = xx[None] - centre[:, 1:, None]
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    if config.layout == "tiled":
        period = (TILE_SPACING[0] + (TILE_SPACING[1] - TILE_SPACING[0])
                  * torch.rand(n, generator=g)) * scales
        period = period[:, None, None]
        u = u - period * torch.round(u / period)
        v = v - period * torch.round(v / period)
        centre = torch.zeros_like(centre)
    u = u / scales[:, None, None]
    v = v / scales[:, None, None]
    shape_ids = torch.tensor([SHAPES.index(table[k][0]) for k in labels.tolist()])
    masks = torch.zeros(n, s, s)
    for shape_id in shape_ids.unique().tolist():
        rows = shape_ids == shape_id
        masks[rows] = _shape_mask(SHAPES[shape_id], u[rows], v[rows], s * scales[rows])
    background = _texture(n, s, config.texture_contrast, config.background_saturation, g)
    base = torch.tensor([COLOURS[table[k][1]] for k in labels.tolist()], dtype=torch.float32)
    colour = (base + config.colour_jitter * torch.randn(n, 3, generator=g)).clamp(0, 255)
    alpha = config.object_opacity * masks[:, None]
    image = background * (1 - alpha) + colour[:, :, None, None] * alpha
    image = image + config.noise_std * torch.randn(n, 3, s, s, generator=g)
    centres_px = (centre + 1) / 2 * s
    return image.round().clamp(0, 255).to(torch.uint8), centres_px, scales


def reference_objects(config: WorldConfig, label: int, count: int, seed: int
                      ) -> list[torch.Tensor]:
    """``count`` cut-out objects of class ``label`` (CorruptEncoder's reference objects): uint8
    RGBA ``4×S×S``, the class's shape in a jittered class colour at the largest scale of
    ``config.scale`` ×2.5 (filling most of the image), a random rotation, its coverage as
    alpha."""
    table = class_table(config.n_classes)
    shape, colour = table[label]
    g = torch.Generator().manual_seed(1_000_003 * (2 * config.seed + 7) + seed)
    s = config.image_size
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    scale = min(0.9, 2.5 * config.scale[1])
    out = []
    for _ in range(count):
        angle = float(torch.rand(1, generator=g)) * 2 * math.pi
        u = (xx * math.cos(angle) + yy * math.sin(angle)) / scale
        v = (-xx * math.sin(angle) + yy * math.cos(angle)) / scale
        mask = _shape_mask(shape, u[None], v[None], torch.tensor([s * scale]))[0]
        rgb = (torch.tensor(COLOURS[colour], dtype=torch.float32)
               + config.colour_jitter * torch.randn(3, generator=g)).clamp(0, 255)
        image = rgb[:, None, None].expand(3, s, s)
        out.append(torch.cat([image, 255 * mask[None]]).round().clamp(0, 255).to(torch.uint8))
    return out


def background_images(config: WorldConfig, n: int, seed: int) -> torch.Tensor:
    """``n`` object-free world backgrounds, uint8 ``n×3×S×S`` (the world's textures and pixel
    noise): CorruptEncoder's background photos."""
    g = torch.Generator().manual_seed(1_000_003 * (2 * config.seed + 9) + seed)
    s = config.image_size
    texture = _texture(n, s, config.texture_contrast, config.background_saturation, g)
    noisy = texture + config.noise_std * torch.randn(n, 3, s, s, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)


def _shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor, pixels: torch.Tensor
                ) -> torch.Tensor:
    """Anti-aliased coverage of ``shape`` in local coordinates (unit size ≈ scale)."""
    r = torch.sqrt(u * u + v * v)
    if shape == "circle":
        d = r - 0.8
    elif shape == "square":
        d = torch.maximum(u.abs(), v.abs()) - 0.7
    elif shape == "triangle":
        d = torch.maximum(torch.maximum(-v - 0.45, 0.866 * u + 0.5 * v - 0.45),
                          -0.866 * u + 0.5 * v - 0.45)
    elif shape == "cross":
        bar_a = torch.maximum(u.abs() - 0.85, v.abs() - 0.25)
        bar_b = torch.maximum(v.abs() - 0.85, u.abs() - 0.25)
        d = torch.minimum(bar_a, bar_b)
    elif shape == "ring":
        d = (r - 0.65).abs() - 0.2
    elif shape == "diamond":
        d = u.abs() + v.abs() - 0.95
    elif shape == "bar":
        d = torch.maximum(u.abs() - 0.95, v.abs() - 0.22)
    elif shape == "ellipse":
        d = torch.sqrt((u / 0.95) ** 2 + (v / 0.45) ** 2) - 1.0
    elif shape == "star":
        theta = torch.atan2(v, u)
        d = r - (0.55 + 0.35 * torch.cos(5 * theta))
    elif shape == "crescent":
        d = torch.maximum(r - 0.85, 0.7 - torch.sqrt((u - 0.35) ** 2 + v * v))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return (0.5 - d * pixels[:, None, None] / 2).clamp(0, 1)


def _texture(n: int, s: int, contrast: float, saturation: float, g: torch.Generator
             ) -> torch.Tensor:
    """Backgrounds float ``N×3×S×S`` in [0, 255]: two random colours, pulled towards their grey
    by ``saturation``, mixed by smooth noise plus a random stripe pattern."""
    colours = 60 + 140 * torch.rand(n, 2, 3, generator=g)
    grey = colours.mean(-1, keepdim=True)
    colours = grey + saturation * (colours - grey)
    coarse = torch.rand(n, 1, 4, 4, generator=g)
    blend = F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False)[:, 0]
    coords = torch.arange(s, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.rand(n, generator=g)[:, None, None] * math.pi
    freq = (2 + 4 * torch.rand(n, generator=g))[:, None, None] * 2 * math.pi / s
    stripes = torch.sin(freq * (xx * angle.cos() + yy * angle.sin()))
    mix = (0.5 + contrast * (blend - 0.5) + 0.25 * contrast * stripes).clamp(0, 1)
    return (colours[:, 0, :, None, None] * (1 - mix[:, None])
            + colours[:, 1, :, None, None] * mix[:, None])


def with_look(config: WorldConfig, look: str) -> WorldConfig:
    """``config`` with the overrides of ``LOOKS[look]`` (a ``ValueError`` naming the looks for
    an unknown one)."""
    if look not in LOOKS:
        raise ValueError(f"unknown world look {look!r}; choose from {', '.join(LOOKS)}")
    return replace(config, **LOOKS[look])
