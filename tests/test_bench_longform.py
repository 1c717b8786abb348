"""benchmarks/longform.py in its --quick mode: every mode runs, the pieces end where the emulated speech lengths say,
every mode gives the same tokens, and the JSON and table are written (a few seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import longform  # noqa: E402


def test_quick_run_writes_honest_results(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert longform.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "longform.json").read_text())
    assert [r["mode"] for r in result["runs"]] == list(longform.MODES)
    assert {p["mode"] for p in result["pairs"]} == {"batched", "batched-text-order"}
    assert all(p["same_tokens"] for p in result["pairs"])
    for run in result["runs"]:
        f = run["figures"]
        assert f["wall_s"] > 0 and f["rtf"] > 0 and f["process_cpu_s"] >= 0 and "load_before" in f
        assert set(f["stage_s"]) == {"semantic", "coarse", "fine", "codec"}
    seq = result["runs"][0]["figures"]
    assert seq["generate_calls"] == result["pieces"] and seq["semantic_tokens_stepped"] == \
        sum(result["semantic_tokens_per_piece"])
    assert "median speed-up" in (tmp_path / "longform.md").read_text()


def test_speech_lengths_end_each_row_at_its_target():
    import bark

    model = longform.build_model("tiny", torch.device("cpu"), torch.float32)
    ids = torch.randint(1000, 1200, (3, 256))
    mask = torch.ones(3, 256, dtype=torch.long)
    with longform.speech_lengths() as targets:
        longform._set_targets(targets, [3, 9, 5], torch.device("cpu"))
        out = bark.generation.generate_tokens(model, ids, mask, semantic_max_new_tokens=20)
    assert [t.shape[0] for t in out["semantic"]] == [3, 9, 5]
    out = bark.generation.generate_tokens(model, ids, mask, semantic_max_new_tokens=20, semantic_min_new_tokens=20)
    assert [t.shape[0] for t in out["semantic"]] == [20, 20, 20]  # patch gone
