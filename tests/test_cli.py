import json

import pytest

from fastbd.cli import main
from fastbd.smoke import SmokeConfig, run_smoke


def test_env_json(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"]
    assert report["backends"]["cpu"]["mask_fill"][0] == "torch"
    assert "triton" in report["backends"]["cpu"]["mask_fill"]  # tests run the interpreter


def test_demo_ops_writes_report(tmp_path, capsys):
    assert main(["--quiet", "demo", "ops", "--device", "cpu", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["ok"] and {c["op"] for c in saved["checks"]} >= {"mask_fill", "kmeans"}
    assert "ops smoke run" in capsys.readouterr().out


def test_smoke_checks_triton_under_interpreter():
    config = SmokeConfig(image_size=12, n_images=2, n_masks=2, window=4, n_features=40, dim=16,
                         n_clusters=3)
    result = run_smoke("cpu", config, skip_interpreted=False)
    triton_checks = [c for c in result.checks if c.backend == "triton"]
    assert {c.op for c in triton_checks} == {"mask_fill", "paste", "kmeans_assign", "kmeans",
                                             "pair_cosine", "cosine_topk"}
    assert result.ok, [c for c in result.checks if not c.ok]


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


@pytest.fixture(scope="module")
def clip_pairs_csv(tmp_path_factory):
    import torch

    from fastbd.data.readers import export_images
    from fastbd.models.clip import tiny_clip
    from fastbd.world.synthetic import WorldConfig, make_world

    root = tmp_path_factory.mktemp("pairs")
    world = make_world(WorldConfig(n_train=48, n_eval=4, seed=3))
    truth = torch.zeros(48, dtype=torch.bool)
    truth[:4] = True
    files = export_images(root, world.train.images, world.train.labels, truth,
                          world.train.captions)
    torch.save(tiny_clip(seed=1).state_dict(), root / "poisoned.pt")
    torch.save({"state_dict": tiny_clip(seed=2).state_dict()}, root / "clean.pt")
    (root / "cleanclip.json").write_text(json.dumps({"epochs": 1, "batch_size": 16}))
    (root / "abl.json").write_text(json.dumps({"susp_fraction": 0.25, "epochs": 1,
                                               "min_steps": 0, "batch_size": 16}))
    (root / "ubt.json").write_text(json.dumps(
        {"susp_fraction": 0.25, "overfit_epochs": 1, "unlearn_epochs": 1, "overfit_min_steps": 0,
         "unlearn_min_steps": 0,
         "batch_size": 16, "skip_check": True}))
    return root, files["csv"]


@pytest.mark.parametrize("defense", ["ubt", "abl", "cleanclip"])
def test_clip_defense_commands(clip_pairs_csv, tmp_path, capsys, defense):
    import torch

    from fastbd.models.clip import tiny_clip

    root, csv_path = clip_pairs_csv
    args = ["--quiet", defense, "--csv", str(csv_path), "--checkpoint",
            str(root / "poisoned.pt"), "--out", str(tmp_path), "--device", "cpu"]
    if defense != "cleanclip":
        args += ["--reference-checkpoint", str(root / "clean.pt")]
    args += ["--config", str(root / f"{defense}.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"{defense}: ")  # --quiet: the decision
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["method"] == defense
    report = (tmp_path / "report.md").read_text()
    assert report.startswith(f"# {defense} report") and printed[0] in report
    assert f"| method | {defense} |" in report
    if defense != "cleanclip":
        assert "![Pair similarity under the reference model](similarity.png)" in report
        assert "12 suspicious pairs" in printed[0] or "declined" in printed[0] or \
            "top pairs" in printed[0]
    if defense != "cleanclip":
        assert saved["suspicious"] == 12 and "suspicious_poisoned" in saved
    if defense == "ubt":
        assert "topk_poisoned" in saved and (tmp_path / "token_relevance.png").is_file()
    tiny_clip().load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))


def test_clip_defense_command_errors(clip_pairs_csv, tmp_path, capsys):
    root, csv_path = clip_pairs_csv
    assert main(["--quiet", "ubt", "--csv", str(csv_path), "--checkpoint",
                 str(root / "poisoned.pt"), "--out", str(tmp_path)]) == 2
    assert "fastbd ubt: error: ubt needs one of --reference-checkpoint and --reference-pretrained" \
        in capsys.readouterr().err
    assert main(["--quiet", "abl", "--csv", str(csv_path), "--checkpoint",
                 str(root / "missing.pt"), "--reference-checkpoint", str(root / "clean.pt"),
                 "--out", str(tmp_path)]) == 2
    assert "fastbd abl: error: " in capsys.readouterr().err
    assert main(["--quiet", "abl", "--csv", str(csv_path), "--checkpoint",
                 str(root / "poisoned.pt"), "--reference-checkpoint", str(root / "clean.pt"),
                 "--config", str(root / "ubt.json"), "--out", str(tmp_path)]) == 2
    assert "unknown config keys" in capsys.readouterr().err
    assert main(["--quiet", "ubt", "--csv", str(csv_path), "--arch", "RN50", "--checkpoint",
                 str(root / "poisoned.pt"), "--reference-checkpoint", str(root / "clean.pt"),
                 "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {root / 'poisoned.pt'} does not fit the 'RN50' CLIP" in error
    assert error.count("\n") == 1 and len(error) < 800  # counts and examples, not every key
    assert "missing keys, e.g." in error and "keys of another shape" in error


@pytest.fixture(scope="module")
def small_file_list(tmp_path_factory):
    root = tmp_path_factory.mktemp("list")
    assert main(["--quiet", "attack", "--attack", "htba", "--n-train", "20", "--n-eval", "2",
                 "--out", str(root)]) == 0
    return root / "train.txt"


def test_unusable_input_gives_one_line_and_exit_code_2(small_file_list, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.delenv("FASTBD_DEBUG", raising=False)
    detect = ["--quiet", "poisoncam", "--image-size", "32", "--out", str(tmp_path)]
    assert main([*detect, "--file-list", str(tmp_path / "nope.txt"), "--arch", "resnet18"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastbd poisoncam: error: file list not found") and "nope.txt" in error
    assert "Traceback" not in error and error.count("\n") == 1
    assert main([*detect, "--file-list", str(small_file_list), "--arch", "resnet1800"]) == 2
    error = capsys.readouterr().err
    assert "timm has no architecture 'resnet1800'; similar names: " in error
    assert "resnet18" in error.split("similar names: ")[1]
    monkeypatch.setenv("FASTBD_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        main([*detect, "--file-list", str(tmp_path / "nope.txt"), "--arch", "resnet18"])


def test_interrupted_detection_says_how_to_resume(small_file_list, tmp_path, capsys,
                                                  monkeypatch):
    from fastbd.detection import Detector

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "fit", interrupted)
    assert main(["--quiet", "patchsearch", "--file-list", str(small_file_list), "--arch",
                 "torchvision:resnet18", "--image-size", "32", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == (
        f"fastbd patchsearch: interrupted; rerun with --resume to continue from the last "
        f"completed search round and the poison classifier's last saved state in {tmp_path}\n")


def test_interrupted_training_says_a_rerun_continues(tmp_path, capsys, monkeypatch):
    import fastbd.world.threats

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastbd.world.threats, "train_ssl", interrupted)
    assert main(["--quiet", "train-ssl", "--n-train", "40", "--n-eval", "10", "--cache",
                 str(tmp_path / "cache"), "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ("fastbd train-ssl: interrupted; rerun the same command "
                                       "to continue training from its last completed epoch\n")


def _commands():
    import argparse

    from fastbd.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_flag_has_help_and_every_command_examples_that_parse():
    import argparse
    import shlex

    parser, commands = _commands()
    assert all(a.help for a in parser._actions if not isinstance(a, argparse._SubParsersAction))
    for name, command in commands.items():
        unexplained = [a.option_strings or a.dest for a in command._actions
                       if not a.help and not isinstance(a, argparse._HelpAction)]
        assert unexplained == [], name
        examples = command.get_default("examples")
        assert examples, name
        for example in examples:
            argv = shlex.split(example.split(" > ")[0])
            assert argv[:2] == ["fastbd", name]
            assert parser.parse_args(argv[1:]).command == name  # exits 2 when it does not parse
        text = command.format_help()
        assert "examples:" in text and examples[0] in text


def test_help_shows_defaults_once(capsys):
    with pytest.raises(SystemExit):
        main(["poisoncam", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "output folder (default: fastbd-out/poisoncam)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default: auto)") == 1


def test_threads_flag_sets_torch_threads(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "env", "--json"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["--threads", "0", "env"])
    assert "expected a positive integer" in capsys.readouterr().err
