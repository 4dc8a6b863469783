"""Run under ``torchrun`` (gloo): one training step's gradients and BatchNorm statistics, with
each rank encoding its shard of the batch (``pair_features``, ``global_batch_norm``,
``average_gradients``), against the same step on the whole batch in this process with plain
torch. Exits 1 naming the first tensor that differs."""

import copy
import sys

import torch

from fastbd import distributed
from fastbd.models.clip import clip_normalise, tiny_clip
from fastbd.training.clip import batch_clip_loss, clip_loss, finetune_mode
from fastbd.training.global_bn import global_batch_norm


def step_gradients(model, images, tokens, sharded: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if sharded:
        batch_clip_loss(model, images, tokens, "cpu").backward()
        distributed.average_gradients(model.parameters())
    else:  # the whole batch, plain torch
        clip_loss(model.encode_image(clip_normalise(images, model)), model.encode_text(tokens),
                  model.logit_scale).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def main() -> int:
    distributed.start("cpu", 60)
    torch.manual_seed(0)
    failures = []
    for batch, train_bn in ((8, False), (7, False), (9, True)):  # odd sizes: unequal shards
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
        tokens = torch.randint(1, 400, (batch, 32))
        base = tiny_clip()
        reference, sharded = copy.deepcopy(base), copy.deepcopy(base)
        for model in (reference, sharded):
            model.train() if train_bn else finetune_mode(model)
        expected = step_gradients(reference, images, tokens, sharded=False)
        with global_batch_norm(sharded):
            got = step_gradients(sharded, images, tokens, sharded=True)
        # rounding is relative to the largest gradient (some are 0 up to rounding: a key bias)
        scale = max(float(grad.abs().max()) for grad in expected.values())
        for name, grad in expected.items():
            if not torch.allclose(got[name], grad, rtol=1e-4, atol=1e-5 * scale):
                failures.append(f"batch {batch}, BatchNorm {'trained' if train_bn else 'frozen'}"
                                f": gradient of {name} off by "
                                f"{float((got[name] - grad).abs().max()) / scale:.1e} of the "
                                "largest gradient")
        for (name, want), have in zip(reference.named_buffers(), sharded.buffers(), strict=True):
            if want.dtype.is_floating_point and not torch.allclose(have, want, rtol=1e-4,
                                                                   atol=1e-6):
                failures.append(f"batch {batch}: buffer {name} differs")
    distributed.stop()
    if failures:
        print("\n".join(failures[:5]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
