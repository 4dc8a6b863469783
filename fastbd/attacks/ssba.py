"""SSBA — sample-specific invisible triggers (Li et al., ICCV 2021, ISSBA): a steganography
encoder hides one fixed secret bit string in each poisoned image as a residual of its own; the
backdoor is learnt from those invisible, per-image residuals.

No public encoder weights fit the world, so — as BackdoorBox's ISSBA trains its own StegaStamp —
``train_stega`` trains a small encoder/decoder pair on the images: random secrets, the decoder
recovering them from the encoded images (bit cross-entropy), an L2 penalty on the residual after
``secret_only_fraction`` of the steps (ISSBA: secret loss alone first, then 2 × L2 + 1.5 × secret
loss + perceptual and critic terms). fastbd's version drops the LPIPS and critic terms (LPIPS
needs AlexNet weights from the network; ISSBA's critic is off by default) and uses a smaller
network and a larger learning rate (1e-3 against 1e-4) so that it trains in about a minute on a
CPU. ``SSBAAttack`` applies the trained encoder with one secret drawn once from the seed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastbd.attacks.triggers import Attack
from fastbd.storage import load_torch, save_atomically
from fastbd.validation import above, at_least, check_fields, fraction

SECRET_GRID = 16
"""Side of the map a secret is spread over before it is resized to the image."""


class StegaEncoder(nn.Module):
    """Image (float ``B×3×S×S`` in [0, 1]) and secret bits (float ``B×bits``) → residual
    ``B×3×S×S``: a dense map of the secret resized to the image, joined with it, through a
    two-scale convolutional network whose last layer sees the input again (U-Net style)."""

    def __init__(self, secret_bits: int, width: int = 32):
        super().__init__()
        self.secret_bits = secret_bits
        self.secret_map = nn.Linear(secret_bits, 3 * SECRET_GRID * SECRET_GRID)
        self.head = nn.Sequential(nn.Conv2d(6, width, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.merge = nn.Sequential(nn.Conv2d(3 * width + 6, width, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, 3, 1))

    def forward(self, images: torch.Tensor, secrets: torch.Tensor) -> torch.Tensor:
        size = images.shape[-1]
        spread = F.relu(self.secret_map(secrets - 0.5)).view(-1, 3, SECRET_GRID, SECRET_GRID)
        spread = F.interpolate(spread, size=(size, size), mode="bilinear", align_corners=False)
        inputs = torch.cat([images - 0.5, spread], 1)
        head = self.head(inputs)
        low = F.interpolate(self.down(head), size=(size, size), mode="nearest")
        return self.merge(torch.cat([head, low, inputs], 1))


class StegaDecoder(nn.Module):
    """Encoded image (float ``B×3×S×S`` in [0, 1]) → secret logits ``B×bits``."""

    def __init__(self, secret_bits: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.readout = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 256), nn.ReLU(),
                                     nn.Linear(256, secret_bits))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(images - 0.5))


@dataclass
class StegaConfig:
    """The steganography pair's training: ``secret_bits`` (ISSBA's 20 on CIFAR), ``steps`` Adam
    steps at ``lr`` on batches of ``batch_size`` images, the secret loss alone for the first
    ``secret_only_fraction`` of them, then ``l2_weight`` × mean squared residual + ``secret_weight``
    × bit cross-entropy (ISSBA's 2 and 1.5)."""

    secret_bits: int = 20
    width: int = 32
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    secret_only_fraction: float = 0.3
    l2_weight: float = 2.0
    secret_weight: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, secret_bits=at_least(1), width=at_least(1), steps=at_least(1),
                     batch_size=at_least(1), lr=above(0), secret_only_fraction=fraction(),
                     l2_weight=at_least(0), secret_weight=above(0))


@dataclass
class StegaReport:
    """How the trained pair does on the training images with fresh random secrets:
    ``bit_accuracy`` of the decoder and ``psnr`` (dB) of the encoded images against the
    originals."""

    bit_accuracy: float
    psnr: float


def encode(encoder: StegaEncoder, images: torch.Tensor, secret: torch.Tensor,
           batch_size: int = 256) -> torch.Tensor:
    """uint8 ``N×3×S×S`` images with ``secret`` (float bits, ``bits`` or ``N×bits``) hidden by
    ``encoder``: ``clamp(x + residual)``, rounded to uint8."""
    out = torch.empty_like(images)
    device = next(encoder.parameters()).device
    encoder.eval()
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            x = images[rows].to(device).float() / 255
            bits = (secret if secret.ndim == 2 else secret[None]).to(device).float()
            bits = bits[rows] if secret.ndim == 2 else bits.expand(x.shape[0], -1)
            encoded = (x + encoder(x, bits)).clamp(0, 1)
            out[rows] = (encoded * 255).round().to(torch.uint8).to(images.device)
    return out


def train_stega(images: torch.Tensor, config: StegaConfig | None = None, *,
                verbose: bool = False) -> tuple[StegaEncoder, StegaDecoder, StegaReport]:
    """Train the encoder/decoder pair on ``images`` (uint8 ``N×3×S×S``) with random secrets
    (``config``; a progress bar with ``verbose``); returns both and their ``StegaReport``."""
    config = config or StegaConfig()
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"need a non-empty N×3×S×S image batch, got shape {tuple(images.shape)}")
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    encoder = StegaEncoder(config.secret_bits, config.width)
    decoder = StegaDecoder(config.secret_bits, config.width)
    optimiser = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=config.lr)
    warm = math.floor(config.secret_only_fraction * config.steps)
    for step in tqdm(range(config.steps), desc="SSBA encoder", disable=not verbose):
        rows = torch.randint(images.shape[0], (config.batch_size,), generator=g)
        x = images[rows].float() / 255
        bits = torch.randint(0, 2, (config.batch_size, config.secret_bits), generator=g).float()
        residual = encoder(x, bits)
        logits = decoder((x + residual).clamp(0, 1))
        loss = config.secret_weight * F.binary_cross_entropy_with_logits(logits, bits)
        if step >= warm:
            loss = loss + config.l2_weight * residual.pow(2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return encoder.eval(), decoder.eval(), stega_report(encoder, decoder, images, config, g)


def stega_report(encoder: StegaEncoder, decoder: StegaDecoder, images: torch.Tensor,
                 config: StegaConfig, generator: torch.Generator, sample: int = 512
                 ) -> StegaReport:
    """``StegaReport`` on up to ``sample`` of ``images`` with fresh random secrets."""
    rows = torch.randperm(images.shape[0], generator=generator)[:sample]
    bits = torch.randint(0, 2, (rows.numel(), config.secret_bits), generator=generator).float()
    encoded = encode(encoder, images[rows], bits)
    with torch.no_grad():
        decoded = decoder(encoded.float() / 255) > 0
    mse = (encoded.float() - images[rows].float()).pow(2).mean()
    psnr = float(10 * torch.log10(255 ** 2 / mse.clamp_min(1e-12)))
    return StegaReport(float((decoded == bits.bool()).float().mean()), psnr)


def save_stega(encoder: StegaEncoder, path: str | Path) -> None:
    """The encoder's weights and shape, for ``SSBAAttack(encoder_file=…)``."""
    width = encoder.head[0].out_channels
    save_atomically({"secret_bits": encoder.secret_bits, "width": width,
                     "encoder": encoder.state_dict()}, path)


def load_stega(path: str | Path) -> StegaEncoder:
    """The encoder ``save_stega`` wrote (errors name the file)."""
    saved = load_torch(path, "SSBA steganography encoder")
    try:
        encoder = StegaEncoder(int(saved["secret_bits"]), int(saved["width"]))
        encoder.load_state_dict(saved["encoder"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path} is not an SSBA encoder of fastbd attack "
                         f"({str(error).splitlines()[0][:200]})") from error
    return encoder.eval()


@dataclass
class SSBAAttack(Attack):
    """SSBA: every image carries ``secret`` (float bits; default drawn from ``seed``) hidden by
    the steganography encoder of ``encoder_file`` (``save_stega``) — a residual of its own per
    image, no box."""

    encoder_file: str = ""
    seed: int = 0
    secret: list[int] | None = None
    encoder: StegaEncoder = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.encoder_file:
            raise ValueError("ssba needs its steganography encoder: encoder_file=… (fastbd "
                             "attack --attack ssba trains one; fastbd.attacks.ssba.train_stega)")
        self.encoder = load_stega(self.encoder_file)
        if self.secret is None:
            g = torch.Generator().manual_seed(self.seed + 11)
            self.secret = torch.randint(0, 2, (self.encoder.secret_bits,), generator=g).tolist()
        if len(self.secret) != self.encoder.secret_bits:
            raise ValueError(f"secret has {len(self.secret)} bits, the encoder hides "
                             f"{self.encoder.secret_bits}")

    def apply(self, images, g, train=True):
        return encode(self.encoder, images, torch.tensor(self.secret, dtype=torch.float32)), None
