"""The benchmark suite in its tiny ``--quick`` CPU mode: it runs, and what it writes is well formed and honest.

Checks the JSON schema (environment, records), that every figure has a value and a unit and every record a provider,
that records which were not measured carry a reason and no figures, that derived figures agree with the measured
ones, and that the markdown and PNG files are written. Runs in a few seconds.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a top-level package of the repository, not an installed one: import it from the checkout.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import benchmarks  # noqa: E402
from benchmarks import kernels, report, timing  # noqa: E402

pytest.importorskip("matplotlib")

SECTIONS = ("prefill", "prefill_noncausal", "decode", "varlen", "unpad", "pad")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    payload = benchmarks.run(out, mode="cpu", quick=True)
    return out, payload


def _figures_ok(figures: dict, where: str) -> None:
    assert isinstance(figures, dict), where
    for name, fig in figures.items():
        assert set(fig) >= {"value", "unit"}, f"{where}: figure {name} lacks value/unit: {fig}"
        assert isinstance(fig["unit"], str) and fig["unit"], f"{where}: figure {name} has no unit"
        value = fig["value"]
        assert isinstance(value, (bool, int, float)), f"{where}: figure {name} value {value!r}"
        if isinstance(value, float):
            assert math.isfinite(value), f"{where}: figure {name} is {value}"


def _record_ok(rec: dict, where: str) -> None:
    assert isinstance(rec.get("provider"), str) and rec["provider"], f"{where}: no provider: {rec}"
    assert rec["status"] in ("ok", "skipped", "failed"), where
    if rec["status"] == "ok":
        assert rec["figures"], f"{where}: ok without figures"
    else:
        assert rec.get("reason"), f"{where}: {rec['status']} without a reason"
        assert rec["figures"] == {}, f"{where}: a {rec['status']} record must not carry figures"
    _figures_ok(rec["figures"], where)


def test_quick_cpu_run_writes_json_md_png(quick_run):
    out, payload = quick_run
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == report.SCHEMA
    env = data["environment"]
    for key in ("device_name", "driver", "torch", "triton", "transformers", "git_commit", "torch_threads",
                "cpu_model", "date_utc", "loadavg_start", "loadavg_end"):
        assert key in env, key
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    assert data["config"]["mode"] == "cpu" and data["config"]["quick"] is True
    assert data["wall_seconds"] > 0
    md = (out / "results.md").read_text()
    assert env["device_name"] in md
    for title in ("Causal prefill", "Decode", "Varlen", "End to end"):
        assert title in md
    assert data["plots"], "no plots written"
    for name in data["plots"]:
        blob = (out / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 1000, name
        assert f"]({name})" in md
    assert {"prefill_tflops.png", "decode_bandwidth.png"} <= set(data["plots"])
    section = (out / "README-section.md").read_text()
    assert env["device_name"] in section and "python -m benchmarks" in section


def test_every_record_has_provider_status_and_units(quick_run):
    _, payload = quick_run
    copy = payload["copy_bandwidth"]
    _record_ok(copy, "copy")
    assert copy["status"] == "ok" and copy["figures"]["bandwidth"]["unit"] == "GB/s"
    records = payload["kernels"]
    assert records
    for i, rec in enumerate(records):
        _record_ok(rec, f"kernels[{i}] {rec.get('section')} {rec.get('case')} {rec.get('provider')}")
    for section in SECTIONS:
        ok = [r for r in records if r["section"] == section and r["status"] == "ok"]
        assert ok, f"no measured provider in section {section}"
    for goal in payload["targets"]:
        assert goal["goal"] and goal["status"] in ("met", "not met", "not measured in this run"), goal
        assert ("value" in goal) == (goal["status"] != "not measured in this run"), goal
        if "value" in goal:
            assert goal["unit"] and isinstance(goal["value"], float), goal
    e2e = payload["e2e"]
    assert e2e["status"] in ("ok", "skipped", "failed")
    if e2e["status"] != "ok":
        assert e2e.get("reason")
    for i, rec in enumerate(e2e["runs"]):
        _record_ok(rec, f"e2e[{i}] {rec.get('provider')}")


def test_triton_excluded_on_cpu_with_reason(quick_run):
    _, payload = quick_run
    triton = [r for r in payload["kernels"] if r["provider"] == "bk:triton"]
    assert triton and all(r["status"] == "skipped" and "TRITON_INTERPRET" in r["reason"] for r in triton)


def test_derived_figures_agree_with_measured_ones(quick_run):
    _, payload = quick_run
    copy_bw = payload["copy_bandwidth"]["figures"]["bandwidth"]["value"]
    for rec in payload["kernels"]:
        if rec["status"] != "ok":
            continue
        f = rec["figures"]
        med, p20, p80 = f["median"]["value"], f["p20"]["value"], f["p80"]["value"]
        assert 0 < p20 <= med <= p80, rec["case"]
        assert f["timed_calls"]["value"] >= 2
        seconds = med * 1e-3
        if "throughput" in f:
            assert f["throughput"]["unit"] == "TFLOP/s"
            assert f["throughput"]["value"] == pytest.approx(f["flops"]["value"] / seconds / 1e12, rel=1e-9)
        if "bandwidth" in f:
            assert f["bandwidth"]["value"] == pytest.approx(f["bytes"]["value"] / seconds / 1e9, rel=1e-9)
        if "fraction_of_copy_bandwidth" in f:
            assert f["fraction_of_copy_bandwidth"]["value"] == pytest.approx(f["bandwidth"]["value"] / copy_bw)
        if rec["section"] in ("prefill", "prefill_noncausal", "varlen", "decode"):
            assert "throughput" in f or "bandwidth" in f
        # the providers that run here (sdpa, eager, torch's own kernels) must be within the tolerance rule
        assert f["correct"]["value"] is True, (rec["case"], rec["provider"], f.get("max_abs_error_row0"))
        ref = rec["reference_provider"]
        if "speedup_vs_reference" in f and rec["provider"] == ref:
            assert f["speedup_vs_reference"]["value"] == pytest.approx(1.0)


def test_causal_flops_count_the_unmasked_half():
    gen = torch.Generator().manual_seed(0)
    plan = kernels.cpu_plan(quick=True)
    causal = kernels.prefill_case("bark-small", 2, 16, True, torch.float32, torch.device("cpu"), plan, gen)
    full = kernels.prefill_case("bark-small", 2, 16, False, torch.float32, torch.device("cpu"), plan, gen)
    assert full.flops == 4 * 2 * 12 * 64 * 16 * 16
    assert causal.flops == 4 * 2 * 12 * 64 * (16 * 17 // 2)


def test_cpu_timer_excludes_warmup_and_times_each_call():
    calls = []
    t = timing.CpuTimer(warmup_calls=3, rep_s=0.0, min_calls=4, max_calls=4, flush_mib=1)(lambda: calls.append(1))
    assert len(calls) == 3 + 4 and len(t.samples_ms) == 4 and t.warmup_calls == 3
    t = timing.Timing([4.0, 1.0, 3.0, 2.0, 5.0], 0, "x")
    assert t.median_ms == 3.0 and t.quantile_ms(0.2) == pytest.approx(1.8) and t.quantile_ms(0.8) == pytest.approx(4.2)


def test_command_line_kernels_only_with_threads(tmp_path, capsys):
    from benchmarks.__main__ import main

    before = torch.get_num_threads()
    try:
        assert main(["--out", str(tmp_path), "--mode", "cpu", "--quick", "--skip-e2e", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["torch_threads"] == 1
    assert data["e2e"]["status"] == "skipped" and "--skip-e2e" in data["e2e"]["reason"]
    assert (tmp_path / "results.md").exists()
    assert "kernel measurements" in capsys.readouterr().out


def test_e2e_eos_suppression_builds_no_tensor_per_semantic_step(monkeypatch):
    """Our semantic stage with EOS suppressed (semantic_min_new_tokens) must not create a tensor per token: on CUDA a
    ``torch.tensor(..., device="cuda")`` is a blocking host-to-device copy, i.e. a sync per token charged to ours.
    Counts ``torch.tensor`` calls between the semantic stage's start and end events: they must not grow with the
    number of tokens. The harness times and reads ours only through generate's stage events."""
    import bark
    from benchmarks import e2e

    device = torch.device("cpu")
    config = e2e._tiny_config()
    hf = e2e.hf_model_for(config, device)
    ours = e2e.ours_from_hf(config, hf, device)
    ids, mask = e2e._inputs(1, 8, device)
    calls = {"inside": False, "n": 0}
    real_tensor = torch.tensor

    def counting_tensor(*args, **kwargs):
        if calls["inside"]:
            calls["n"] += 1
        return real_tensor(*args, **kwargs)

    def flag(event):
        if event.stage == "semantic":
            calls["inside"] = event.kind != "end"

    real_generate = bark.BarkModel.generate

    def generate_with_flag(self, *args, callback=None, **kwargs):
        def both(event):
            flag(event)
            callback(event)

        return real_generate(self, *args, callback=both, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    monkeypatch.setattr(bark.BarkModel, "generate", generate_with_flag)
    counts = []
    for tokens in (3, 11):
        calls["n"] = 0
        clock = e2e.StageClock(device)
        e2e.generate_ours(ours, ids, mask, tokens, clock)
        assert clock.outputs["semantic"][0].shape[0] == tokens  # EOS was suppressed: exactly `tokens` tokens
        assert set(clock.seconds) == {"semantic", "coarse", "fine", "codec"}
        counts.append(calls["n"])
    assert counts[0] == counts[1], f"torch.tensor calls in the semantic stage grow with its length: {counts}"


def test_e2e_builds_no_model_once_the_budget_is_spent(monkeypatch):
    """With the run's budget spent, the end-to-end section records skipped runs (with the reason) and does not spend
    time and memory building models no run would use."""
    from benchmarks import e2e

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built after the budget was spent")

    monkeypatch.setattr(e2e, "hf_model_for", no_build)
    result = e2e.run_e2e(torch.device("cpu"), True, kernels.Budget(0.0))
    assert result["runs"] and all(r["status"] == "skipped" for r in result["runs"])
    assert all("time budget" in r["reason"] for r in result["runs"])
    assert result["status"] == "skipped"


def test_targets_come_from_the_table_and_are_judged_against_their_threshold():
    """report.targets evaluates benchmarks/targets.py's rows for the run's device: met at or above the threshold,
    not met below it, not measured without the figure; rows for another device are left out."""
    from benchmarks import report
    from benchmarks.targets import TARGETS

    def e2e(speedup):
        return {"status": "ok", "provider": "ours", "params": {"model": "bark-small", "dtype": "float32", "batch": 1},
                "figures": {"speedup_vs_transformers": {"value": speedup, "unit": "x"}}}

    payload = {"environment": {"device_type": "cpu"}, "kernels": [], "e2e": {"runs": [e2e(1.6)]}}
    cpu_goals = [t for t in TARGETS if t["device"] == "cpu"]
    rows = report.targets(payload)
    assert [r["goal"] for r in rows] == [t["goal"] for t in cpu_goals] and rows
    assert rows[0]["status"] == "met" and rows[0]["value"] == 1.6 and rows[0]["threshold"] == cpu_goals[0]["threshold"]
    payload["e2e"]["runs"] = [e2e(1.2)]
    assert report.targets(payload)[0]["status"] == "not met"
    payload["e2e"]["runs"] = []
    assert report.targets(payload)[0]["status"] == "not measured in this run"
    payload["environment"]["device_type"] = "cuda"
    assert {r["goal"] for r in report.targets(payload)} == {t["goal"] for t in TARGETS if t["device"] == "cuda"}
    assert all(r["status"] == "not measured in this run" for r in report.targets(payload))
    assert all(t["measure"] in report.MEASURES for t in TARGETS)
