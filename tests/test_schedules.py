import math

import torch

from fastbd.schedules import adamw, warmup_cosine


def test_adamw_is_fused_on_cpu_and_matches_the_multi_tensor_update(gen):
    """The fused update gives the same parameters as torch's default AdamW after a few steps."""
    start = [torch.randn(37, 5, generator=gen), torch.randn(11, generator=gen)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    results = []
    for make in (lambda ps: adamw(ps, lr=1e-2, weight_decay=0.1),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append((optimizer, [p.detach() for p in params]))
    assert results[0][0].defaults["fused"] is True
    for fused, plain in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0][1][0], start[0])


def test_warmup_cosine_factors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lrs[9], 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
