"""The embedded synthetic world: procedural images and captions from a seed
(``fastbd.world.synthetic``) and the threat models trained in it (``fastbd.world.threats``).

Nothing below this package depends on it: a user with real data and checkpoints can ignore it.
"""

from fastbd.world.synthetic import (
    LAYOUTS,
    LOOKS,
    ZERO_SHOT_TEMPLATES,
    SyntheticWorld,
    WorldConfig,
    WorldSplit,
    check_world_config,
    make_world,
    with_look,
    world_caption,
)
from fastbd.world.threats import (
    DEFAULT_CACHE,
    REFERENCE_WORLD_OFFSET,
    WORLD_ATTACK_OPTIONS,
    WORLD_POISON_RATES,
    CLIPEvaluation,
    CLIPThreat,
    CLIPThreatConfig,
    SSLThreat,
    SSLThreatConfig,
    build_clip_threat,
    build_ssl_threat,
    evaluate_clip,
    implanted_ssl_threat,
    independent_reference,
    poison_world_images,
    poison_world_pairs,
    surrogate_config,
    with_attack_artifacts,
    with_optimised_patch,
    with_stega_encoder,
    world_attack,
    world_rate,
)

__all__ = ["CLIPEvaluation", "CLIPThreat", "CLIPThreatConfig", "DEFAULT_CACHE", "LAYOUTS", "LOOKS",
           "REFERENCE_WORLD_OFFSET",
           "SSLThreat", "SSLThreatConfig", "SyntheticWorld", "WORLD_ATTACK_OPTIONS",
           "WORLD_POISON_RATES", "WorldConfig", "WorldSplit", "ZERO_SHOT_TEMPLATES",
           "build_clip_threat", "build_ssl_threat", "check_world_config", "evaluate_clip",
           "implanted_ssl_threat", "independent_reference", "make_world", "poison_world_images",
           "poison_world_pairs", "surrogate_config", "with_attack_artifacts",
           "with_look", "with_optimised_patch", "with_stega_encoder",
           "world_attack", "world_caption", "world_rate"]
