import pytest
import torch

from fastbd.baselines import (
    ABLConfig,
    ABLPaperConfig,
    CleanCLIPConfig,
    abl,
    augment_tokens,
    cleanclip,
)
from fastbd.clipdefense import suspicious_split
from fastbd.models.clip import TinyCLIPConfig, clip_tokenizer, tiny_clip, tokenize
from fastbd.training.clip import batch_clip_loss


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    names = ["red circle", "blue square", "green bar"]
    captions = [f"a photo of a {names[i % 3]} on grass." for i in range(96)]
    return images, tokenize(clip_tokenizer(), captions, 32)


@pytest.fixture(scope="module")
def models():
    small = TinyCLIPConfig(text_layers=1)
    return tiny_clip(small, seed=1).eval(), tiny_clip(small, seed=2).eval()


def _batchnorm_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_augment_tokens_is_well_formed(pairs, gen):
    _, tokens = pairs
    assert torch.equal(augment_tokens(tokens, 0.0, gen), tokens)
    dropped = augment_tokens(tokens, 0.5, gen)
    eot = dropped.argmax(dim=1)
    tokenizer = clip_tokenizer()
    assert (dropped[:, 0] == tokenizer.sot_token_id).all()
    assert (dropped.gather(1, eot[:, None]) == tokenizer.eot_token_id).all()
    for row in range(tokens.shape[0]):
        kept = dropped[row, 1:eot[row]].tolist()
        original = tokens[row, 1:tokens[row].argmax()].tolist()
        it = iter(original)
        assert all(token in it for token in kept)  # a subsequence, order preserved
        assert (dropped[row, eot[row] + 1:] == 0).all()
    assert (dropped != 0).sum() < (tokens != 0).sum()


def test_cleanclip_finetunes_a_copy(pairs, models):
    images, tokens = pairs
    model, _ = models
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = cleanclip(model, images, tokens, verbose=False,
                       config=CleanCLIPConfig(epochs=2, lr=1e-3, batch_size=32, warmup_steps=0))
    assert result.method == "cleanclip" and result.timings["finetune"] > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    changed = [k for k, v in result.model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed
    for key, value in _batchnorm_buffers(result.model).items():
        assert torch.equal(value, before[key]), key


def test_interrupted_cleanclip_resumes_to_the_uninterrupted_weights(pairs, models, tmp_path,
                                                                   monkeypatch):
    import importlib

    cleanclip_module = importlib.import_module("fastbd.baselines.cleanclip")
    images, tokens = pairs
    model, _ = models
    config = CleanCLIPConfig(epochs=3, lr=1e-3, batch_size=48, warmup_steps=0, seed=4)

    def weights(result):
        return torch.cat([v.flatten().float() for v in result.model.state_dict().values()])

    reference = cleanclip(model, images, tokens, config=config, verbose=False)
    checkpoint = tmp_path / "cleanclip-finetune.pt"
    calls, loss = [], cleanclip_module.clip_loss

    def interrupt_in_epoch_three(*args):
        calls.append(1)
        if len(calls) == 13:  # the first step of epoch 3 (two steps, three losses each)
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(cleanclip_module, "clip_loss", interrupt_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        cleanclip(model, images, tokens, config=config, verbose=False, checkpoint_dir=tmp_path,
                  save_every_s=0.0)
    monkeypatch.setattr(cleanclip_module, "clip_loss", loss)
    assert torch.load(checkpoint, weights_only=True)["units_done"] == 2
    resumed = cleanclip(model, images, tokens, config=config, verbose=False,
                        checkpoint_dir=tmp_path)
    assert torch.equal(weights(resumed), weights(reference))
    assert resumed.checkpoint_files == [checkpoint] and checkpoint.exists()  # until saved
    resumed.save(tmp_path / "result", weights=False)
    assert not checkpoint.exists()


def test_abl_ascends_the_loss_of_the_suspicious_pairs(pairs, models):
    images, tokens = pairs
    model, reference = models
    config = ABLConfig(susp_fraction=0.25, epochs=3, lr=1e-3, batch_size=24, min_steps=0)
    result = abl(model, images, tokens, reference=reference, config=config, verbose=False)
    _, suspicious, _ = suspicious_split(reference, images, tokens, 0.25, "cpu")
    assert torch.equal(result.suspicious, suspicious)
    with torch.no_grad():
        before = batch_clip_loss(model, images[suspicious], tokens[suspicious], "cpu")
        after = batch_clip_loss(result.model, images[suspicious], tokens[suspicious], "cpu")
    assert float(after) > float(before)


def test_abl_as_the_ubt_paper_runs_it(pairs, models):
    from fastbd import registry

    paper = ABLPaperConfig()
    assert (paper.split, paper.batch_size, paper.lr, paper.epochs) == ("fixed", 64, 1e-6, 10)
    assert (ABLConfig().lr, ABLConfig().epochs) == (1e-5, 5)  # UBT's schedule, fastbd's default
    entry = registry.clip_defense("abl-paper")
    assert entry.run is abl and entry.config is ABLPaperConfig and entry.needs_reference
    images, tokens = pairs
    model, reference = models
    result = abl(model, images, tokens, reference=reference,
                 config=ABLPaperConfig(susp_fraction=0.05, min_steps=0), verbose=False)
    _, fixed, _ = suspicious_split(reference, images, tokens, 0.05, "cpu")  # no adaptive rule
    assert torch.equal(result.suspicious, fixed) and result.config["lr"] == 1e-6


def test_abl_with_the_text_mask_ascends_the_masked_captions_too(pairs, models, monkeypatch):
    import importlib

    from fastbd.clipdefense import masked_tokens
    from fastbd.clipdefense.relevance import token_relevance

    abl_module = importlib.import_module("fastbd.baselines.abl")
    images, tokens = pairs
    model, reference = models
    config = ABLConfig(susp_fraction=0.25, epochs=1, lr=1e-3, batch_size=12, min_steps=0,
                       masked_captions=True, token_threshold=0.2)
    _, suspicious, _ = suspicious_split(reference, images, tokens, 0.25, "cpu")
    masked = masked_tokens(tokens[suspicious], token_relevance(
        model, images[suspicious], tokens[suspicious]), 0.2)[0]
    assert not torch.equal(masked, tokens[suspicious])  # the mask dropped some tokens
    assert torch.equal(abl_module.masked_captions(model, images[suspicious], tokens[suspicious],
                                                  config, torch.device("cpu")), masked)
    seen, loss = [], abl_module.batch_clip_loss

    def record(model, batch_images, batch_tokens, device):
        seen.append(batch_tokens.clone())
        return loss(model, batch_images, batch_tokens, device)

    monkeypatch.setattr(abl_module, "batch_clip_loss", record)
    result = abl(model, images, tokens, reference=reference, config=config, verbose=False)
    assert torch.equal(result.suspicious, suspicious)
    originals, masks = torch.cat(seen[0::2]), torch.cat(seen[1::2])  # original, masked per step
    order = torch.cat([tokens[suspicious]]).tolist()
    assert sorted(originals.tolist()) == sorted(order)
    assert sorted(masks.tolist()) == sorted(masked.tolist())
    plain = ABLConfig()
    assert plain.masked_captions is False  # ABL itself has no mask


def test_interrupted_abl_resumes_to_the_uninterrupted_weights(pairs, models, tmp_path,
                                                             monkeypatch):
    import importlib

    abl_module = importlib.import_module("fastbd.baselines.abl")
    images, tokens = pairs
    model, reference = models
    config = ABLConfig(susp_fraction=0.25, epochs=3, lr=1e-3, batch_size=12, min_steps=0)
    full = abl(model, images, tokens, reference=reference, config=config, verbose=False)
    calls, loss = [], abl_module.batch_clip_loss

    def interrupt_in_epoch_two(*args):
        calls.append(1)
        if len(calls) == len(full.suspicious) // 12 + 1:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(abl_module, "batch_clip_loss", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        abl(model, images, tokens, reference=reference, config=config, verbose=False,
            checkpoint_dir=tmp_path, save_every_s=0.0)
    monkeypatch.setattr(abl_module, "batch_clip_loss", loss)
    saved = torch.load(tmp_path / "abl-ascent.pt", weights_only=True)
    assert saved["units_done"] == 1 and saved["seconds"] > 0
    saved["seconds"] = 1000.0  # a marker the resumed run's stage time must include
    torch.save(saved, tmp_path / "abl-ascent.pt")
    resumed = abl(model, images, tokens, reference=reference, config=config, verbose=False,
                  checkpoint_dir=tmp_path)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abl-ascent.pt", "abl-split.pt"]
    resumed.save(tmp_path, weights=False)  # the saved result supersedes the training state
    assert not list(tmp_path.glob("abl-*.pt"))
    # The interrupted run's time counts (checked with a marker, not a wall-clock ratio to the
    # uninterrupted run, which a busy machine makes anything).
    assert 1000.0 <= resumed.timings["unlearn"] < 1000.0 + full.timings["unlearn"] + 60


def test_baseline_bad_inputs(pairs, models):
    images, tokens = pairs
    model, reference = models
    with pytest.raises(ValueError, match="at least 2"):
        cleanclip(model, images[:1], tokens[:1], verbose=False)
    with pytest.raises(ValueError, match="empty"):
        abl(model, images[:0], tokens[:0], reference=reference, verbose=False)
    with pytest.raises(ValueError, match="context"):
        abl(model, images, tokens[:, :8], reference=reference, verbose=False)
    with pytest.raises(ValueError, match="susp_fraction"):
        ABLConfig(susp_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        ABLConfig(batch_size=1)
    with pytest.raises(ValueError, match="min_steps"):
        ABLConfig(min_steps=-1)
    with pytest.raises(ValueError, match="token_drop"):
        CleanCLIPConfig(token_drop=1.0)
