"""Scale-out over ``torch.distributed``: the shards and collectives of a one-rank world, and the
commands under ``torchrun`` with 1 and 2 gloo ranks on the CPU giving the single-process
results — including a rank that dies mid-search and a resume with another number of ranks.

Each ``torchrun`` job runs in a subprocess with a hard timeout and ``--dist-timeout``, so a hung
collective fails the test instead of the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastbd import distributed
from fastbd.cli import main

ENTRY = Path(__file__).with_name("distributed_entry.py")
JOB_TIMEOUT_S = 420


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 100])
@pytest.mark.parametrize("block", [1, 4, 16])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shards_tile_the_rows_in_whole_blocks(n, block, size):
    shards = [distributed.shard(n, block, rank=r, size=size) for r in range(size)]
    rows = [i for part in shards for i in part]
    assert rows == list(range(n))  # contiguous, in rank order, each row once
    for part in shards:
        assert part.start % block == 0  # a shard starts on a block boundary
        assert part.stop == n or part.stop % block == 0
    counts = [-(-len(part) // block) for part in shards]
    assert max(counts) - min(counts) <= 1  # blocks dealt evenly


def test_one_rank_collectives_are_the_identity(gen):
    x = torch.randn(7, 3, generator=gen)
    assert distributed.world() == distributed.World(0, 1, 0)
    assert distributed.gather_rows(x) is x
    assert distributed.gather_with_grad(x, 7) is x
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(5) == 5
    assert distributed.map_shards(7, 2, lambda rows: x[rows.start:rows.stop]).equal(x)


def test_a_command_that_runs_in_one_process_is_refused_under_a_larger_world(monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert main(["attack", "--attack", "htba", "--out", "unused"]) == 2
    assert "runs in one process" in capsys.readouterr().err


@pytest.fixture(scope="module")
def world_files(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-world")
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "160", "--n-eval", "40",
                 "--out", str(out)]) == 0
    # small enough for seconds per job; two classifier members so that they are dealt out
    config = {"n_masks": 16, "test_set_size": 40, "search_budget_tflop": None,
              "exported_patches": 10, "classifier": {
                  "n_models": 2, "iterations": 40, "width": 8, "batch_size": 32,
                  "feature_samples": 64, "feature_steps": 20}}
    (out / "config.json").write_text(json.dumps(config))
    # fewer members than ranks, trained data-parallel; a few steps, before this SGD training
    # turns rounding into visible differences (as another thread count does)
    config["classifier"].update(n_models=1, data_parallel=True, iterations=6)
    (out / "one-member.json").write_text(json.dumps(config))
    return out


def _job(ranks: int | None, args: list[str], env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    """``fastbd --threads 1 <args>`` alone (``ranks=None``) or under ``torchrun`` with
    ``ranks`` gloo ranks of one thread each — launched as the docs say (``-m fastbd``), or
    through ``distributed_entry.py`` when ``env`` injects a fault."""
    faulty = any(name.startswith("FASTBD_TEST_") for name in env or {})
    command = [str(ENTRY)] if faulty else ["-m", "fastbd"]
    launch = [sys.executable, *command] if ranks is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}", *command]
    variables = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*launch, "--threads", "1", "--dist-timeout", "120", *args],
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=variables)


def _detect(detector: str, files: Path, out: Path, ranks: int | None, *extra: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return _job(ranks, [detector, "--file-list", str(files / "train.txt"), "--arch",
                        "smallconv4", "--config", str(files / "config.json"), "--device",
                        "cpu", "--out", str(out), *extra], env)


RESULT_ARRAYS = ("scores.npy", "removed.npy", "margins.npy", "cluster_labels.npy",
                 "test_images.npy")


def _same_result(a: Path, b: Path, exact_classifier: bool = True) -> None:
    """The same result files — byte for byte, or (``exact_classifier=False``: a classifier
    trained data-parallel) with margins equal up to rounding and the same removed set."""
    for name in RESULT_ARRAYS:
        if name == "margins.npy" and not exact_classifier:
            np.testing.assert_allclose(np.load(b / name), np.load(a / name), rtol=1e-4,
                                       atol=1e-4, err_msg=name)
            continue
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name), err_msg=name)
    summary_a, summary_b = (json.loads((d / "result.json").read_text()) for d in (a, b))
    for key in ("topk", "windows", "rounds", "removed"):
        assert summary_a.get(key) == summary_b.get(key), key
    if exact_classifier:
        assert summary_a["classifier"] == summary_b["classifier"]
    patches = sorted(p.name for p in (a / "all_top_poison_patches").iterdir())
    assert patches == sorted(p.name for p in (b / "all_top_poison_patches").iterdir())
    for name in patches:  # the exported candidate windows, byte for byte
        assert (a / "all_top_poison_patches" / name).read_bytes() == (
            b / "all_top_poison_patches" / name).read_bytes()
    for name in ("top_triggers.png", "attention_maps.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _ok(job: subprocess.CompletedProcess) -> None:
    assert job.returncode == 0, job.stderr[-3000:]


@pytest.mark.parametrize("detector", ["poisoncam", "patchsearch"])
def test_a_detector_gives_the_single_process_result_on_one_and_two_ranks(world_files, tmp_path,
                                                                         detector):
    extra = []
    if detector == "patchsearch":  # the sequential flip test, with PatchSearch's ±1 outcomes
        config = json.loads((world_files / "config.json").read_text())
        (tmp_path / "sequential.json").write_text(json.dumps({**config,
                                                              "flip_test": "sequential"}))
        extra = ["--config", str(tmp_path / "sequential.json")]
    _ok(_detect(detector, world_files, tmp_path / "alone", None, *extra))
    assert json.loads((tmp_path / "alone" / "result.json").read_text())["config"][
        "flip_test"] == ("sequential" if extra else "exhaustive")
    for ranks in (1, 2):
        _ok(_detect(detector, world_files, tmp_path / f"ranks{ranks}", ranks, *extra))
        _same_result(tmp_path / "alone", tmp_path / f"ranks{ranks}")
    assert not (tmp_path / "ranks2" / "bank.npy").exists()  # the shared cache was removed


def test_fewer_classifier_members_than_ranks_are_trained_data_parallel(world_files, tmp_path):
    config = ["--config", str(world_files / "one-member.json")]
    _ok(_detect("poisoncam", world_files, tmp_path / "alone", None, *config))
    _ok(_detect("poisoncam", world_files, tmp_path / "ranks2", 2, *config))
    _same_result(tmp_path / "alone", tmp_path / "ranks2", exact_classifier=False)


def test_a_dead_rank_ends_the_job_resumably_and_another_world_size_finishes_it(world_files,
                                                                               tmp_path):
    _ok(_detect("poisoncam", world_files, tmp_path / "alone", None))
    out = tmp_path / "faulty"
    # rank 0 dies as round 3 starts, after it saved round 2 (another rank's death could come
    # while rank 0 is still writing, which leaves round 1's state: resumable too, but the test
    # wants a known round); rank 1 says what happened and how to continue
    died = _detect("poisoncam", world_files, out, 2,
                   env={"FASTBD_TEST_DIE_RANK": "0", "FASTBD_TEST_DIE_AFTER": "2"})
    assert died.returncode == 1  # torchrun's own exit code after a child failed (README)
    assert "(rank 1 of 2)" in died.stderr and "--resume" in died.stderr, died.stderr[-3000:]
    saved = torch.load(out / "search_state.pt", weights_only=False)
    assert saved["round"] == 2  # the two completed rounds, written by rank 0
    _ok(_detect("poisoncam", world_files, out, None, "--resume"))  # one rank finishes it
    _same_result(tmp_path / "alone", out)

    out = tmp_path / "interrupted"  # and the other way: one process stops, two ranks resume
    died = _detect("poisoncam", world_files, out, None,
                   env={"FASTBD_TEST_DIE_RANK": "0", "FASTBD_TEST_DIE_AFTER": "3"})
    assert died.returncode == 17
    _ok(_detect("poisoncam", world_files, out, 2, "--resume"))
    _same_result(tmp_path / "alone", out)


def test_a_sharded_training_step_has_the_whole_batch_gradients():
    """One CLIP step on 2 ranks — BatchNorm frozen and trained over the global batch, shards of
    unequal size — against plain torch on the whole batch (``distributed_gradients.py``)."""
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(ENTRY.with_name("distributed_gradients.py"))],
                         capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert job.returncode == 0, job.stderr[-3000:]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> Path:
    """A BadNet pair set and a tiny CLIP trained on it (one process): the model the defenses
    start from."""
    out = tmp_path_factory.mktemp("dist-clip")
    assert main(["--quiet", "attack", "--attack", "badnet", "--n-train", "160", "--n-eval",
                 "40", "--rate", "0.05", "--out", str(out)]) == 0
    assert main(["--quiet", "--threads", "1", "train-clip", "--csv", str(out / "train.csv"),
                 "--epochs", "2", "--batch-size", "32", "--out", str(out / "clip")]) == 0
    configs = {"ubt": {"overfit_min_steps": 6, "unlearn_min_steps": 6, "batch_size": 16,
                       "check_sample": 64, "skip_check": True},
               "cleanclip": {"epochs": 1, "batch_size": 32, "warmup_steps": 2},
               "abl": {"min_steps": 4, "batch_size": 8, "susp_fraction": 0.1}}
    for name, config in configs.items():
        (out / f"{name}.json").write_text(json.dumps(config))
    return out


def _same_weights(a: Path, b: Path) -> None:
    """Equal up to the rounding of another reduction order (sharded encoding, all-reduced
    gradients and BatchNorm statistics), which AdamW turns into steps of up to its lr where a
    gradient is 0 up to rounding (an attention key's bias): at most 0.1 % of the weights off by
    more than 1e-4 relative + 1e-5, none by more than 1e-3. A wrong split moves most weights
    (one step's gradients are checked tightly by ``distributed_gradients.py``)."""
    first, second = (torch.load(p, weights_only=True) for p in (a, b))
    assert first.keys() == second.keys()
    total = off = 0
    for key in first:
        x, y = first[key].float(), second[key].float()
        assert x.numel() == 0 or float((x - y).abs().max()) <= 1e-3, key
        total += x.numel()
        off += int((~torch.isclose(y, x, rtol=1e-4, atol=1e-5)).sum())
    assert off <= 1e-3 * total, f"{off} of {total} weights differ"


TRAINING_JOBS = {
    "train-clip": (["train-clip", "--csv", "{clip}/train.csv", "--epochs", "1",
                    "--batch-size", "32"], "clip.pt"),
    "train-ssl": (["train-ssl", "--file-list", "{ssl}/train.txt", "--arch", "smallconv4",
                   "--epochs", "1", "--batch-size", "40", "--method", "byol"], "encoder.pt"),
    "ubt": (["ubt", "--csv", "{clip}/train.csv", "--checkpoint", "{clip}/clip/clip.pt",
             "--reference-checkpoint", "{clip}/clip/clip.pt", "--config", "{clip}/ubt.json"],
            "model.pt"),
    "cleanclip": (["cleanclip", "--csv", "{clip}/val.csv", "--checkpoint",
                   "{clip}/clip/clip.pt", "--config", "{clip}/cleanclip.json"], "model.pt"),
    "abl": (["abl", "--csv", "{clip}/train.csv", "--checkpoint", "{clip}/clip/clip.pt",
             "--reference-checkpoint", "{clip}/clip/clip.pt", "--config", "{clip}/abl.json"],
            "model.pt"),
}


@pytest.mark.parametrize("command", list(TRAINING_JOBS))
def test_training_and_clip_defenses_give_the_single_process_model_on_one_and_two_ranks(
        command, world_files, clip_files, tmp_path):
    flags, weights = TRAINING_JOBS[command]
    flags = [f.format(clip=clip_files, ssl=world_files) for f in flags] + ["--device", "cpu"]
    _ok(_job(None, [*flags, "--out", str(tmp_path / "alone")]))
    for ranks in (1, 2):
        _ok(_job(ranks, [*flags, "--out", str(tmp_path / f"ranks{ranks}")]))
        _same_weights(tmp_path / "alone" / weights, tmp_path / f"ranks{ranks}" / weights)
    if weights == "model.pt":  # the defenses' selections are exactly the single process's
        alone, two = (json.loads((tmp_path / d / "result.json").read_text())
                      for d in ("alone", "ranks2"))
        for key in ("suspicious", "suspicious_poisoned", "topk"):
            assert alone.get(key) == two.get(key), key


def test_roclip_training_on_ranks_follows_one_process(clip_files, tmp_path):
    """One rank: bit-identical to one process (the pool, its generator and the augmentation
    follow the same path). Two ranks: every rank picks the same nearest pooled captions (the
    gathered features are the same bytes everywhere), but each rank's shard is encoded in a
    smaller batch, and a rounding difference can flip a near-tied nearest caption against one
    process's choice — so the weights agree to 1e-3, not to the plain trainer's rounding."""
    flags = ["train-clip", "--csv", str(clip_files / "train.csv"), "--epochs", "2",
             "--batch-size", "32", "--defense", "roclip", "--pool-size", "64", "--device", "cpu"]
    _ok(_job(None, [*flags, "--out", str(tmp_path / "alone")]))
    alone = torch.load(tmp_path / "alone" / "clip.pt", weights_only=True)
    for ranks in (1, 2):
        _ok(_job(ranks, [*flags, "--out", str(tmp_path / f"ranks{ranks}")]))
        weights = torch.load(tmp_path / f"ranks{ranks}" / "clip.pt", weights_only=True)
        assert weights.keys() == alone.keys()
        gap = max(float((weights[k].float() - alone[k].float()).abs().max()) for k in alone)
        assert gap == 0.0 if ranks == 1 else gap <= 1e-3, (ranks, gap)


def test_training_stopped_on_two_ranks_is_finished_by_one_process(clip_files, tmp_path):
    flags = ["train-clip", "--csv", str(clip_files / "train.csv"), "--epochs", "2",
             "--batch-size", "32", "--device", "cpu"]
    _ok(_job(None, [*flags, "--out", str(tmp_path / "alone")]))
    out = tmp_path / "stopped"
    died = _job(2, [*flags, "--out", str(out)], env={"FASTBD_TEST_DIE_AFTER_SAVE": "1"})
    assert died.returncode != 0 and (out / "train_state.pt").is_file()
    _ok(_job(None, [*flags, "--out", str(out)]))  # the rerun continues after epoch 1
    assert not (out / "train_state.pt").exists()
    _same_weights(tmp_path / "alone" / "clip.pt", out / "clip.pt")


def test_a_bad_image_in_one_ranks_shard_is_skipped_or_named_as_by_one_process(world_files,
                                                                                tmp_path):
    lines = [f"{world_files / path} {label}" for path, label in
             (line.split() for line in (world_files / "train.txt").read_text().splitlines())]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    lines.insert(120, f"{broken} 0")  # in the second rank's half of the list
    listing = tmp_path / "files"
    listing.mkdir()
    (listing / "train.txt").write_text("".join(f"{line}\n" for line in lines))
    (listing / "config.json").write_text((world_files / "config.json").read_text())
    refused = _detect("poisoncam", listing, tmp_path / "refused", 2, "--ground-truth", "none")
    assert refused.returncode != 0 and "broken.png" in refused.stderr
    _ok(_detect("poisoncam", listing, tmp_path / "alone", None, "--skip-bad",
                "--ground-truth", "none"))
    _ok(_detect("poisoncam", listing, tmp_path / "ranks2", 2, "--skip-bad",
                "--ground-truth", "none"))
    _same_result(tmp_path / "alone", tmp_path / "ranks2")
    kept = (tmp_path / "ranks2" / "filtered.txt").read_text()
    assert "broken.png" not in kept
