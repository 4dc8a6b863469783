import pytest
import torch

from fastbd.clipdefense import masked_tokens
from fastbd.clipdefense.relevance import (
    _finish,
    _pair_logits,
    explicit_text_attention,
    token_relevance,
)
from fastbd.models.clip import TinyCLIPConfig, caption_ends, clip_tokenizer, tiny_clip, tokenize

CAPTIONS = ["a photo of a red circle.", "the square here is green.", "cf a small blue bar."]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_clip(TinyCLIPConfig(text_layers=3)).eval()


def reference_relevance(model, images, tokens, start_layer):
    """One pair and one layer at a time: a backward per layer, nothing batched."""
    out = []
    for i in range(tokens.shape[0]):
        with explicit_text_attention(model) as store:
            logit = _pair_logits(model, images[i:i + 1], tokens[i:i + 1])[0]
            layers = list(range(len(store)))[start_layer:]
            grads = [torch.autograd.grad(logit, store[layer], retain_graph=True)[0]
                     for layer in layers]
            probs = [store[layer] for layer in layers]
        length = tokens.shape[1]
        r = torch.eye(length)
        for a, g in zip(probs, grads, strict=True):
            cam = (g[0] * a[0]).clamp(min=0).mean(0)
            r = r + cam @ r
        out.append(r[int(tokens[i].argmax())].detach())
    return _finish(torch.stack(out), tokens)


@pytest.mark.parametrize("start_layer", [-1, 0, 1])
def test_batched_relevance_matches_reference(model, gen, start_layer):
    tokens = tokenize(clip_tokenizer(), CAPTIONS, 32)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen)
    got = token_relevance(model, images, tokens, start_layer=start_layer)
    want = reference_relevance(model, images, tokens, start_layer)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    eot = tokens.argmax(1)
    assert bool((got[:, 0] == 0).all())
    assert all(float(got[i, eot[i]:].abs().sum()) == 0 for i in range(3))
    torch.testing.assert_close(got.sum(1), torch.ones(3))


def test_explicit_attention_leaves_model_unchanged(model):
    tokens = tokenize(clip_tokenizer(), CAPTIONS, 32)
    with torch.no_grad():
        before = model.encode_text(tokens)
        with explicit_text_attention(model) as store:
            during = model.encode_text(tokens)
        after = model.encode_text(tokens)
    assert len(store) == 3 and store[0].shape == (3, 2, 32, 32)
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, before)


def test_masked_tokens_edge_cases():
    tokenizer = clip_tokenizer()
    tokens = tokenize(tokenizer, ["a red circle", "one"], 8)
    relevance = torch.zeros(2, 8)
    relevance[0, 2] = 0.6   # "red"
    relevance[0, 3] = 0.05  # "circle": below threshold
    out, keep = masked_tokens(tokens, relevance, 0.1)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    assert out[0].tolist()[:4] == [sot, int(tokens[0, 2]), eot, 0]
    assert keep[0].tolist() == [False, False, True] + [False] * 5
    assert out[1].tolist()[:3] == [sot, eot, 0]  # empty keep set: start + end
    full = tokenize(tokenizer, ["a a a a a a"], 8)  # fills the context exactly
    assert int(full[0, -1]) == eot
    kept, _ = masked_tokens(full, torch.ones(1, 8), 0.1)
    assert torch.equal(kept, full)


def test_caption_tokens_follow_the_captions_not_one_vocabulary():
    # Another tokenizer's ids: start 7, end 3 (not the largest id), words 11–14, padding 0.
    tokens = torch.tensor([[7, 11, 12, 13, 3, 0], [7, 14, 3, 0, 0, 0], [7, 3, 0, 0, 0, 0]])
    assert caption_ends(tokens).tolist() == [4, 2, 1]
    relevance = torch.tensor([[0.0, 0.9, 0.0, 0.5, 0.9, 0.9]] + [[0.9] * 6] * 2)
    out, keep = masked_tokens(tokens, relevance, 0.4)
    assert out.tolist() == [[7, 11, 13, 3, 0, 0], [7, 14, 3, 0, 0, 0], [7, 3, 0, 0, 0, 0]]
    assert keep.sum(1).tolist() == [2, 1, 0]
