"""The report files promise what they show: the token heatmap's pair ids, poisoned flags,
decoded tokens and colour bar; the histograms' axes; report.md's decision, numbers and
pictures."""

from __future__ import annotations

import torch

from fastbd.models.clip import clip_tokenizer, tokenize
from fastbd.report.markdown import markdown_report
from fastbd.report.plots import attention_grid_figure, token_heatmap_figure


def test_token_heatmap_names_pairs_flags_tokens_and_has_a_colour_bar():
    tokenizer = clip_tokenizer()
    tokens = tokenize(tokenizer, ["a red circle", "cf a photo of a dog"], 12)
    relevance = torch.rand(2, 12)
    fig = token_heatmap_figure(relevance, tokens, tokenizer, pair_ids=[17, 4031],
                               poisoned=[False, True])
    heatmap, colour_bar = fig.axes
    labels = [t.get_text() for t in heatmap.get_yticklabels()]
    assert labels == ["pair 17 (clean)", "pair 4031 (poisoned)"]
    words = {t.get_text() for t in heatmap.texts}
    assert {"red", "circle", "cf", "dog"} <= words
    assert "relevance" in colour_bar.get_ylabel()
    unlabelled = token_heatmap_figure(relevance, tokens, tokenizer)
    assert [t.get_text() for t in unlabelled.axes[0].get_yticklabels()] == ["#0", "#1"]


def test_attention_grid_shows_each_image_its_map_and_its_window():
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    maps = torch.rand(5, 16, 16)
    windows = torch.tensor([[0, 0], [3, 5], [10, 10], [2, 9], [7, 1]])
    fig = attention_grid_figure(images, maps, windows, 6, image_ids=[8, 1, 40, 3, 77],
                                poisoned=[True, True, False, True, False])
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 15  # image, map, image with window — for each of the 5
    for i in range(5):
        image_ax, map_ax, window_ax = drawn[3 * i:3 * i + 3]
        assert (image_ax.images[0].get_array() == images[i].permute(1, 2, 0).numpy()).all()
        assert (map_ax.images[0].get_array() == maps[i].numpy()).all()
        (box,) = window_ax.patches
        y, x = windows[i].tolist()
        assert box.get_xy() == (x - 0.5, y - 0.5) and box.get_width() == 6
    assert [ax.get_title() for ax in drawn[::3]] == [
        "#8 poisoned", "#1 poisoned", "#40 clean", "#3 poisoned", "#77 clean"]


def test_markdown_report_holds_the_decision_tables_and_pictures():
    text = markdown_report("ubt report", "ubt: defended — 8 top pairs unlearned",
                           {"Result": {"method": "ubt", "timings_s": {"overfit": 1.23456},
                                       "topk": list(range(20)), "caption": "a | b"}},
                           [("Token relevance", "token_relevance.png")])
    lines = text.splitlines()
    assert lines[0] == "# ubt report" and lines[2] == "ubt: defended — 8 top pairs unlearned"
    assert "| timings_s.overfit | 1.235 |" in lines
    assert "| topk | [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, …] (20) |" in lines
    assert "| caption | a \\| b |" in lines
    assert "![Token relevance](token_relevance.png)" in lines


def test_clip_defense_reports_ubt_top_pairs_with_ids_and_truth(tmp_path):
    from fastbd.models.clip import TinyCLIPConfig, tiny_clip
    from fastbd.ubt.result import UBTResult

    tokenizer = clip_tokenizer()
    tokens = tokenize(tokenizer, [f"caption number {i}" for i in range(6)], 12)
    truth = torch.tensor([False, True, False, False, True, False])
    result = UBTResult(model=tiny_clip(TinyCLIPConfig()), poisoned=True, check_statistic=2.5,
                       topk=torch.tensor([4, 1]), suspicious=torch.tensor([4, 1, 0]),
                       reference_similarity=torch.rand(6), relevance=torch.rand(2, 12),
                       overfit_similarity=torch.tensor([0.9, 0.8, 0.1]))
    result.save(tmp_path, truth=truth, tokens=tokens, tokenizer=tokenizer, weights=False)
    report = (tmp_path / "report.md").read_text()
    # the overfit model's similarities of D_susp, split by the truth of the suspicious pairs
    assert "![Suspicious pairs under the overfit model](overfit_similarity.png)" in report
    assert (tmp_path / "overfit_similarity.png").stat().st_size > 0
    assert "ubt: defended — check statistic 2.50; 2 top pairs (2 poisoned)" in report
    assert "![Token relevance of the top pairs](token_relevance.png)" in report
    assert (tmp_path / "token_relevance.png").is_file() and (tmp_path / "similarity.png").is_file()
    declined = UBTResult(model=result.model, poisoned=False, check_statistic=-3.5)
    assert declined.decision().startswith("ubt: declined — check statistic -3.50")
