"""``--engine ray`` (bark.bulk.ray_engine) on a local Ray cluster (num_cpus=2, one per module) with 2 actors and the
tiny checkpoint: the same files and manifest as the local engine for the same table and seeds; a re-run resumes
(every complete row skipped, nothing enters the pipeline); a row whose generation fails is recorded and the rest goes
on. Skipped, with the reason, only where Ray Data is not installed (the test extra installs it)."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("transformers")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bark-kernels[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

from bark.bulk import synthesize_table  # noqa: E402
from test_bulk import (  # noqa: E402, F401 - the fixtures are used by name
    FAST,
    assert_same_audio,
    ckpt,
    comparable,
    journal,
    local_run,
    write_jsonl,
)


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (start-up takes seconds); its workers import this checkout."""
    if ray.is_initialized():
        ray.shutdown()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root, os.path.join(root, "tests")] + [p for p in sys.path if p])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET",
                                                                                             "1")}})
    yield
    ray.shutdown()


def test_ray_gives_the_same_files_and_manifest_as_local_and_resumes(cluster, ckpt, local_run, tmp_path):
    table, local_out, local = local_run
    out = str(tmp_path / "out")
    summary = synthesize_table(table, out, model=ckpt, seed=5, batch_size=4, engine="ray", workers=2, **FAST)
    assert (summary.rows, summary.ok, summary.failed, summary.skipped) == (9, 6, 3, 0)
    assert_same_audio(local_out, out, ["a", "b", "c", "d", "e", "7"])
    assert comparable(summary.entries) == comparable(local.entries)
    workers = {e["worker"] for e in summary.entries if e["status"] == "ok"}
    assert all(w.startswith("ray-") for w in workers) and 1 <= len(workers) <= 2
    pq = pytest.importorskip("pyarrow.parquet")
    assert comparable(pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()) == comparable(local.entries)

    before = journal(out)
    again = synthesize_table(table, out, model=ckpt, seed=5, batch_size=4, engine="ray", workers=2, **FAST)
    assert (again.skipped, again.ok, again.failed) == (6, 0, 3)
    assert [e for e in journal(out)[len(before):] if e["status"] == "ok"] == []
    assert comparable(again.entries) == comparable(local.entries)


def test_a_row_that_fails_in_an_actor_is_recorded_and_the_rest_goes_on(cluster, ckpt, tmp_path):
    """semantic_max_new_tokens past the model's block fails in generate (inside the actor), for that row only."""
    rows = [{"id": "good", "text": "hello world.", "greedy": True},
            {"id": "huge", "text": "hello.", "greedy": True, "semantic_max_new_tokens": 100_000}]
    table = write_jsonl(tmp_path / "t.jsonl", rows)
    summary = synthesize_table(table, str(tmp_path / "out"), model=ckpt, engine="ray", workers=1, **FAST)
    by_id = {e["id"]: e for e in summary.entries}
    assert by_id["good"]["status"] == "ok" and os.path.isfile(tmp_path / "out" / "good.wav")
    assert by_id["huge"]["status"] == "failed" and by_id["huge"]["error"].startswith("generation failed: ")
    assert "\n" not in by_id["huge"]["error"] and not os.path.exists(tmp_path / "out" / "huge.wav")


def test_an_actor_that_cannot_load_its_model_ends_the_run_in_one_line(cluster, tmp_path):
    """The driver checks the model first; an actor can still fail on its node (here: a model path only the driver
    has): the run ends with one line naming the cause, and what finished is kept."""
    from bark.bulk import BulkError
    from bark.bulk.ray_engine import run_ray

    row = {"row": 1, "id": "a", "text": "hello.", "seed": 0, "settings": {}, "key": "k"}
    options = {"model": str(tmp_path / "only-on-the-driver"), "device": "cpu", "threads": 1,
               "out_dir": str(tmp_path)}
    with pytest.raises(BulkError) as error:
        run_ray([row], options, lambda entry: pytest.fail("no row can finish"), workers=1)
    message = str(error.value)
    assert "\n" not in message and message.startswith("--engine ray: a worker failed: ")
    assert "only-on-the-driver" in message and "does not exist" in message
