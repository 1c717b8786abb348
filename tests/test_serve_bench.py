"""benchmarks/serve.py in its ``--quick`` mode (the tiny model, 1 and 4 clients): it runs against a real server, every
request is answered, and what it writes is well formed. No speed is asserted here (CI's machine is shared); the
numbers are read from a run on a quiet machine (docs/serve.md)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the server's extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server's extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the server's extra is not installed: pip install -e '.[serve]'")


def test_quick_serve_benchmark_writes_both_modes_at_each_level(tmp_path, capsys):
    from benchmarks.serve import main

    assert main(["--out", str(tmp_path), "--quick"]) == 0
    result = json.loads((tmp_path / "serve.json").read_text())
    assert (tmp_path / "serve.md").read_text().startswith("# serve benchmark")
    assert result["config"]["clients"] == [1, 4] and result["environment"]["uvicorn"]
    runs = {(r["clients"], r["max_batch"]): r for r in result["runs"]}
    assert set(runs) == {(1, 8), (1, 1), (4, 8), (4, 1)}
    for (clients, max_batch), run in runs.items():
        assert run["errors"] == [] and run["requests"] == clients  # one request per client, all answered
        assert run["rows"] == 2 * clients  # two sentences each
        assert 0 < run["ttfa_p50_s"] <= run["ttla_p50_s"] <= run["wall_s"] + 1e-6
        assert run["requests_per_s"] == pytest.approx(run["requests"] / run["wall_s"], rel=1e-5)
        if max_batch == 1:
            assert run["batches"] == run["rows"]
    assert runs[(4, 8)]["batches"] < runs[(4, 1)]["batches"]  # batching on: sentences shared batches
    assert set(result["speedup"]) == {"1", "4"} and result["target"]["clients"] == 8
