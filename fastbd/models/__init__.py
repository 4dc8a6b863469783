"""Encoder adapters and the tiny CLIP of the synthetic world."""

from fastbd.models.encoders import (
    Encoder,
    SmallConvNet,
    default_image_size,
    embed_images,
    encoder_by_name,
    load_state,
    open_clip_image_encoder,
    small_encoder,
    timm_encoder,
    torchvision_encoder,
)

__all__ = ["Encoder", "SmallConvNet", "default_image_size", "embed_images", "encoder_by_name",
           "load_state", "open_clip_image_encoder", "small_encoder", "timm_encoder",
           "torchvision_encoder"]
