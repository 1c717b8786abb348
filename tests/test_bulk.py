"""Bulk synthesis (bark.bulk, ``bark-kernels batch``) on a tiny random checkpoint: reading and checking tables; bad
rows recorded as failed while the rest goes on; a bad input in one line before any model loads; every row's audio
equal to that row spoken alone; resume (skip complete rows, redo edited ones); 2 local workers (the driver and a
spawned process, or two spawned processes) give the same files as one, and a worker that cannot start leaves its rows
to the others; a run SIGKILLed mid-way resumes with no duplicate and no missing id and leaves no half-written file."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

import bark
from bark.bulk import BulkError, read_table, synthesize_table
from bark.bulk import synthesize as bulk_synthesize
from bark.cli.batch import EXIT_ROWS_FAILED, batch_main
from bark.wav import to_pcm16

pytest.importorskip("transformers")
import bark_tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 8  # semantic tokens per piece: short runs
FAST = dict(semantic_max_new_tokens=TOKENS, progress=False, device="cpu", threads=1)
CLI_FAST = ["--semantic-max-new-tokens", str(TOKENS), "--quiet", "--device", "cpu", "--threads", "1"]
PCM_LSB = 1  # a row batched with others vs alone: the same codes, audio within MODEL_RTOL; PCM rounding may flip 1 LSB


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint with a tokenizer and one named voice preset (v2/en_speaker_0)."""
    return str(bark_tiny.save_tiny_speak_checkpoint(tmp_path_factory.mktemp("bulk_ckpt")))


def table_rows():
    """Greedy rows that batch together, seeded sampled rows, a two-sentence row (the long-form path), a voice."""
    return [
        {"id": "a", "text": "hello world.", "greedy": True},
        {"id": "b", "text": "the bark is here. hello again, world!", "greedy": True},
        {"id": "c", "text": "bark bark.", "seed": 11},
        {"id": "d", "text": "hello.", "seed": 12, "voice": "v2/en_speaker_0"},
        {"id": "e", "text": "the world sings.", "greedy": True, "voice": "v2/en_speaker_0"},
        {"id": 7, "text": "what is this?", "seed": 3, "temperature": 0.8},
    ]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def read_wav(path):
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24_000)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def journal(out):
    with open(os.path.join(out, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_same_audio(dir_a, dir_b, ids):
    for i in ids:
        a, b = read_wav(os.path.join(dir_a, f"{i}.wav")), read_wav(os.path.join(dir_b, f"{i}.wav"))
        assert a.shape == b.shape and a.size > 0, i
        assert np.abs(a.astype(np.int32) - b.astype(np.int32)).max() <= PCM_LSB, i


def comparable(entries):
    """Manifest entries without what depends on the machine's timing or the worker's name."""
    return [{k: v for k, v in e.items() if k not in ("wall_seconds", "worker")} for e in entries]


# ----------------------------------------------------------------------------------------------------------------------
# tables


def test_tables_of_every_format_read_the_same(tmp_path):
    rows = [{"id": "x1", "text": "hello.", "seed": 4, "greedy": False, "temperature": 0.5},
            {"id": "x2", "text": "world.", "voice": "v.npz", "semantic_max_new_tokens": 9, "continuity": "previous"}]
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "voice", "seed", "greedy", "temperature",
                                               "semantic_max_new_tokens", "continuity", "speaker_name"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "speaker_name": "ann"})
    expected = [(r.number, r.id, r.text, r.voice, r.seed, r.settings, r.problem) for r in read_table(jsonl)[0]]
    assert expected == [(1, "x1", "hello.", None, 4, {"greedy": False, "temperature": 0.5}, None),
                        (2, "x2", "world.", "v.npz", None, {"semantic_max_new_tokens": 9, "continuity": "previous"},
                         None)]
    csv_rows, warnings = read_table(str(tmp_path / "t.csv"))
    assert [(r.number, r.id, r.text, r.voice, r.seed, r.settings, r.problem) for r in csv_rows] == expected
    assert warnings == ["INPUT: columns 'speaker_name' are not read (known: id, text, voice, seed, greedy, "
                        "temperature, semantic_max_new_tokens, continuity, max_tokens)"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for row in rows for k in row))
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows]), tmp_path / "t.parquet")
    assert [(r.number, r.id, r.text, r.voice, r.seed, r.settings, r.problem)
            for r in read_table(str(tmp_path / "t.parquet"))[0]] == expected
    (tmp_path / "t.txt").write_text("first line\n\n  third line  \n", encoding="utf-8")
    assert [(r.number, r.id, r.text) for r in read_table(str(tmp_path / "t.txt"))[0]] == \
        [(1, "000001", "first line"), (3, "000003", "third line")]


def test_bad_rows_get_one_line_reasons(tmp_path):
    rows = [{"id": "ok", "text": "fine."}, {"id": "e", "text": "   "}, {"id": "n", "text": 42},
            {"id": "ok", "text": "again."}, {"id": "../up", "text": "x"}, {"id": "s", "text": "x", "seed": -1},
            {"id": "g", "text": "x", "greedy": True, "temperature": 0.7}, {"text": "no id"},
            {"id": 1.5, "text": "x"}, {"id": "c", "text": "x", "continuity": "sideways"}]
    got = {r.number: r.problem for r in read_table(write_jsonl(tmp_path / "t.jsonl", rows))[0]}
    assert got[1] is None
    assert got[2] == "text: empty; give some words to speak"
    assert got[3] == "text: expected a string, got int"
    assert got[4] == "id 'ok': repeats row 1 (ids must be unique: one file per id)"
    assert got[5].startswith("id '../up': expected letters, digits")
    assert got[6] == "seed: expected an integer from 0 to 9223372036854775807, got -1"
    assert got[7].startswith("greedy and temperature:")
    assert got[8] == "id: missing"
    assert got[9] == "id: expected a string or an integer, got float"
    assert got[10] == "continuity: expected 'preset' or 'previous', got 'sideways'"
    assert all("\n" not in p for p in got.values() if p)


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.jsonl"), "INPUT: '{d}/missing.jsonl' does not exist"),
    (lambda d: write_jsonl(d / "t.jsonl", [{"id": "a", "words": "x"}]),
     "INPUT: '{d}/t.jsonl' has no 'text' column (columns: 'id', 'words'); expected 'id' and 'text'"),
    (lambda d: (d / "t.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": \n') and str(d / "t.jsonl"),
     "INPUT: '{d}/t.jsonl' line 2: not valid JSON"),
    (lambda d: (d / "t.csv").write_bytes(b"id,text\na,\xff\xfe\n") and str(d / "t.csv"),
     "INPUT: cannot read '{d}/t.csv' as UTF-8 text"),
    (lambda d: (d / "t.parquet").write_text("not parquet") and str(d / "t.parquet"),
     "INPUT: cannot read '{d}/t.parquet' as Parquet"),
    (lambda d: (d / "t.jsonl").write_text("\n") and str(d / "t.jsonl"), "INPUT: '{d}/t.jsonl' has no rows"),
])
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, make, message):
    if "parquet" in message:
        pytest.importorskip("pyarrow")
    monkeypatch.setattr(bulk_synthesize, "plan", lambda *a, **k: pytest.fail("the model was planned"))
    path = make(tmp_path)
    assert batch_main([path, "-o", str(tmp_path / "out"), *CLI_FAST]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bark-kernels batch: error: " + message.format(d=tmp_path)), err


def test_unusable_output_dir_and_contradicting_flags_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bulk_synthesize, "plan", lambda *a, **k: pytest.fail("the model was planned"))
    table = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": "x"}])
    (tmp_path / "file").write_text("x")
    cases = [
        ([table, "-o", str(tmp_path / "file")], f"--output-dir: '{tmp_path}/file' exists and is not a directory"),
        ([table, "-o", str(tmp_path / "file" / "sub")], f"--output-dir: cannot create '{tmp_path}/file/sub'"),
        ([table, "-o", str(tmp_path / "o"), "--greedy", "--temperature", "0.5"], "--temperature 0.5: greedy"),
        ([table, "-o", str(tmp_path / "o"), "--engine", "ray", "--devices", "cpu"], "--devices: the Ray engine"),
        ([table, "-o", str(tmp_path / "o"), "--devices", "cpu", "--device", "cpu"], "--devices and --device"),
        ([table, "-o", str(tmp_path / "o"), "--devices", "gpu:0"], "--devices: expected cpu, cuda or cuda:N"),
        ([table, "-o", str(tmp_path / "o"), "--devices", "cpu,cpu", "--workers", "3"], "--workers 3 and --devices"),
    ]
    for argv, start in cases:
        assert batch_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"bark-kernels batch: error: {start}"), (argv, err)
    for argv in ([table], [table, "-o", "x", "--workers", "0"], [table, "-o", "x", "--format", "mp3"],
                 [table, "-o", "x", "--engine", "spark"], [table, "-o", "x", "--devices", "cpu,"]):
        assert batch_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bark-kernels batch: error: "), (argv, err)
    assert batch_main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: bark-kernels batch ")


# ----------------------------------------------------------------------------------------------------------------------
# runs


def alone(ckpt, row, seed):
    """The row spoken by itself: a fresh engine, one request (the reference of 'equals that row alone')."""
    model = bark.BarkModel.from_pretrained(ckpt)
    processor = bark.BarkProcessor.from_pretrained(ckpt)
    kwargs = {"do_sample": not row.get("greedy", False), "semantic_max_new_tokens": TOKENS}
    if "temperature" in row:
        kwargs.update(do_sample=True, semantic_temperature=row["temperature"], coarse_temperature=row["temperature"])
    with bark.Engine(model, processor, max_batch=1) as engine:
        handle = engine.submit(bark.SpeechRequest(row["text"], voice=row.get("voice"), seed=row.get("seed", seed),
                                                  generate_kwargs=kwargs))
        return to_pcm16(handle.audio())


@pytest.fixture(scope="module")
def local_run(ckpt, tmp_path_factory):
    """The table with bad rows mixed in, run once on the local engine (one worker): (table path, out dir, summary)."""
    d = tmp_path_factory.mktemp("bulk_local")
    rows = table_rows()
    rows[2:2] = [{"id": "empty", "text": ""}, {"id": "a", "text": "a repeated id."},
                 {"id": "ghost", "text": "who?", "voice": "v2/no_such_voice"}]
    table = write_jsonl(d / "table.jsonl", rows)
    summary = synthesize_table(table, str(d / "out"), model=ckpt, seed=5, batch_size=4, **FAST)
    return table, str(d / "out"), summary


def test_local_run_writes_each_row_as_spoken_alone_and_records_bad_rows(ckpt, local_run):
    table, out, summary = local_run
    assert (summary.rows, summary.ok, summary.failed, summary.skipped) == (9, 6, 3, 0)
    ids = ["a", "b", "c", "d", "e", "7"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".wav")) == sorted(f"{i}.wav" for i in ids)
    by_id = {str(r["id"]): r for r in table_rows()}
    for i in ids:
        got = read_wav(os.path.join(out, f"{i}.wav"))
        ref = alone(ckpt, by_id[i], seed=5)
        assert got.shape == ref.shape, i
        assert np.abs(got.astype(np.int32) - ref.astype(np.int32)).max() <= PCM_LSB, i
    entries = {e["row"]: e for e in summary.entries}
    assert [entries[n]["status"] for n in range(1, 10)] == ["ok", "ok", "failed", "failed", "failed"] + ["ok"] * 4
    assert entries[3]["error"] == "text: empty; give some words to speak"
    assert entries[4]["error"] == "id 'a': repeats row 1 (ids must be unique: one file per id)"
    assert entries[5]["error"].startswith("voice 'v2/no_such_voice': ")
    ok = [e for e in summary.entries if e["status"] == "ok"]
    assert all(e["path"] == f"{e['id']}.wav" and e["audio_seconds"] > 0 and e["model"] == ckpt and e["backend"]
               for e in ok)
    assert {str(e["id"]): e["seed"] for e in ok} == {"a": 5, "b": 5, "c": 11, "d": 12, "e": 5, "7": 3}
    assert {str(e["id"]): e["voice"] for e in ok}["d"] == "v2/en_speaker_0"
    for e in ok:  # audio_seconds is the file's length
        assert e["audio_seconds"] == pytest.approx(read_wav(os.path.join(out, e["path"])).size / 24_000, abs=1e-6)
    pq = pytest.importorskip("pyarrow.parquet")
    manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    assert [m["row"] for m in manifest] == list(range(1, 10))
    assert comparable(manifest) == comparable(summary.entries)


def test_rerun_skips_complete_rows_and_redoes_edited_ones(ckpt, local_run, tmp_path):
    table, out, _ = local_run
    scratch = str(tmp_path / "out")
    import shutil

    shutil.copytree(out, scratch)
    before = journal(scratch)
    summary = synthesize_table(table, scratch, model=ckpt, seed=5, batch_size=4, **FAST)
    assert (summary.skipped, summary.ok, summary.failed) == (6, 0, 3)  # the bad rows are recorded again
    after = journal(scratch)
    assert after[: len(before)] == before and all(e["status"] == "failed" for e in after[len(before):])
    rows = [json.loads(line) for line in open(table, encoding="utf-8")]
    rows[0]["text"] = "an edited text."
    write_jsonl(table + ".edited.jsonl", rows)
    os.remove(os.path.join(scratch, "b.wav"))  # a lost file is redone too
    summary = synthesize_table(table + ".edited.jsonl", scratch, model=ckpt, seed=5, batch_size=4, **FAST)
    assert (summary.skipped, summary.ok) == (4, 2)
    redone = [e["id"] for e in journal(scratch)[len(after):] if e["status"] == "ok"]
    assert sorted(redone) == ["a", "b"]


def test_two_local_workers_give_the_same_files_and_manifest(ckpt, local_run, tmp_path, capsys):
    table, out, first = local_run
    code = batch_main([table, "-o", str(tmp_path / "out"), "--model", ckpt, "--seed", "5", "--batch-size", "4",
                       "--workers", "2", *CLI_FAST])
    assert code == EXIT_ROWS_FAILED
    printed = capsys.readouterr().out
    assert "summary: 9 rows: 6 ok, 3 failed, 0 complete from an earlier run" in printed
    assert "  failed: row 3 id 'empty': text: empty; give some words to speak" in printed
    assert_same_audio(out, tmp_path / "out", ["a", "b", "c", "d", "e", "7"])
    pq = pytest.importorskip("pyarrow.parquet")
    manifest = pq.read_table(os.path.join(tmp_path / "out", "manifest.parquet")).to_pylist()
    assert comparable(manifest) == comparable(first.entries)
    # the driver is worker 0 and starts at once; the spawned worker takes rows from the shared queue once loaded
    # (on this 6-row table it may find none left: the spawned path alone is tested below)
    assert {m["worker"] for m in manifest if m["status"] == "ok"} <= {"local-0", "local-1"}


def with_run_local(monkeypatch, **forced):
    """synthesize_table's run_local, called with ``forced`` keyword arguments on top of its own."""
    real = bulk_synthesize.run_local
    monkeypatch.setattr(bulk_synthesize, "run_local", lambda *a, **k: real(*a, **{**k, **forced}))


def test_spawned_workers_alone_give_the_same_files_and_manifest(ckpt, local_run, tmp_path, monkeypatch, capsys):
    """driver_works=False: both workers are spawned processes, so every row crosses the process boundary (its file
    written there, its entry sent back over the queue)."""
    table, out, first = local_run
    with_run_local(monkeypatch, driver_works=False)
    code = batch_main([table, "-o", str(tmp_path / "out"), "--model", ckpt, "--seed", "5", "--batch-size", "4",
                       "--workers", "2", *CLI_FAST])
    assert code == EXIT_ROWS_FAILED
    assert "summary: 9 rows: 6 ok, 3 failed, 0 complete from an earlier run" in capsys.readouterr().out
    assert_same_audio(out, tmp_path / "out", ["a", "b", "c", "d", "e", "7"])
    entries = journal(tmp_path / "out")
    assert comparable(sorted(entries, key=lambda e: e["row"])) == comparable(
        sorted(journal(out), key=lambda e: e["row"]))
    workers = {e["worker"] for e in entries if e["status"] == "ok"}
    assert workers and workers <= {"local-0", "local-1"}


@pytest.mark.parametrize("devices, failing, working", [(["cpu", "cuda:7"], 1, "local-0"),
                                                        (["cuda:7", "cpu"], 0, "local-1")])
def test_a_worker_that_cannot_start_leaves_its_rows_to_the_others(ckpt, local_run, tmp_path, monkeypatch, caplog,
                                                                  devices, failing, working):
    """One worker's device does not exist (cuda:7 on this machine): that worker (a spawned one, or the driver itself)
    fails to load its model, the other takes every row, the run completes, and a warning names the worker and the
    cause."""
    table, out, _ = local_run
    with_run_local(monkeypatch, devices=devices)
    with caplog.at_level("WARNING", logger="bark"):
        summary = synthesize_table(table, str(tmp_path / "out"), model=ckpt, seed=5, batch_size=4, **FAST)
    assert (summary.ok, summary.failed) == (6, 3)
    assert_same_audio(out, tmp_path / "out", ["a", "b", "c", "d", "e", "7"])
    assert {e["worker"] for e in summary.entries if e["status"] == "ok"} == {working}
    warned = [r.getMessage() for r in caplog.records if f"worker {failing}: " in r.getMessage()]
    assert len(warned) == 1 and "cuda:7" in warned[0] and "the other workers took its rows" in warned[0]


def test_no_worker_able_to_start_ends_the_run_in_one_line(ckpt, local_run, tmp_path, monkeypatch):
    table, _, _ = local_run
    with_run_local(monkeypatch, devices=["cuda:7", "cuda:8"], driver_works=False)
    with pytest.raises(BulkError) as error:
        synthesize_table(table, str(tmp_path / "out"), model=ckpt, seed=5, batch_size=4, **FAST)
    message = str(error.value)
    assert "\n" not in message and "worker 0: " in message and "worker 1: " in message
    assert message.endswith("6 rows not done: run the command again to resume")
    assert [e["status"] for e in journal(tmp_path / "out")] == ["failed"] * 3  # the bad rows only


def test_resume_after_sigkill_loses_nothing_and_repeats_nothing(ckpt, tmp_path):
    n = 24
    table = write_jsonl(tmp_path / "t.jsonl", [{"id": f"r{i:02d}", "text": "hello world. " * (1 + i % 3)}
                                               for i in range(n)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "import sys; from bark.cli.batch import batch_main; sys.exit(batch_main())", table,
           "-o", str(out), "--model", ckpt, "--greedy", "--batch-size", "2", *CLI_FAST]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    journal_path = out / "manifest.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.poll() is None:
        if journal_path.exists() and journal_path.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    assert run.poll() is None, f"the run ended before it could be killed: {run.stderr.read().decode()[-2000:]}"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    first = journal(out)
    assert 3 <= len(first) < n
    for name in os.listdir(out):  # no half-written file: every file under its real name is a whole WAV
        assert not name.startswith(".") or name.endswith(".tmp"), name
        if name.endswith(".wav"):
            size = os.path.getsize(out / name)
            assert size == 44 + 2 * read_wav(out / name).size, name
    rerun = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(first)} complete from an earlier run" in rerun.stdout
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # the kill's temporary files are gone
    entries = journal(out)
    ok = [e["id"] for e in entries if e["status"] == "ok"]
    assert sorted(ok) == [f"r{i:02d}" for i in range(n)]  # every id once: none missing, none repeated
    pq = pytest.importorskip("pyarrow.parquet")
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [m["id"] for m in manifest] == [f"r{i:02d}" for i in range(n)] and \
        {m["status"] for m in manifest} == {"ok"}


def test_flac_output_or_a_clear_error(ckpt, tmp_path, capsys):
    table = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": "hello.", "greedy": True}])
    try:
        import soundfile
    except (ImportError, OSError):
        with pytest.raises(BulkError, match="--format flac: needs the soundfile package"):
            synthesize_table(table, str(tmp_path / "out"), model=ckpt, format="flac", **FAST)
        return
    summary = synthesize_table(table, str(tmp_path / "out"), model=ckpt, format="flac", **FAST)
    data, rate = soundfile.read(str(tmp_path / "out" / "a.flac"), dtype="int16")
    assert summary.ok == 1 and rate == 24_000 and data.size == round(summary.entries[0]["audio_seconds"] * 24_000)


def test_every_flag_reaches_the_run(tmp_path, monkeypatch, capsys):
    import bark.cli.batch as batch_cli
    from bark.bulk import BulkSummary

    seen = {}

    def fake(input_path, out_dir, options):
        seen.update(input=input_path, out=out_dir, options=options)
        return BulkSummary(rows=2, skipped=1, ok=1, failed=0, audio_seconds=1.5, wall_seconds=3.0,
                           manifest=os.path.join(out_dir, "manifest.parquet"))

    monkeypatch.setattr(batch_cli, "synthesize_table", fake)
    argv = ["t.csv", "-o", "o", "--format", "flac", "--model", "m", "--voice", "v.npz", "--seed", "9", "--temperature",
            "0.6", "--semantic-max-new-tokens", "20", "--pause", "0.5", "--batch-size", "3", "--engine", "ray",
            "--workers", "2", "--ray-address", "auto", "--gpus-per-worker", "0.5", "--device", "cpu", "--dtype",
            "float32", "--attn", "sdpa", "--threads", "1", "--quiet"]
    assert batch_main(argv) == 0
    o = seen["options"]
    assert (seen["input"], seen["out"]) == ("t.csv", "o")
    assert (o.format, o.model, o.voice, o.seed, o.temperature, o.semantic_max_new_tokens, o.pause, o.batch_size,
            o.engine, o.workers, o.ray_address, o.gpus_per_worker, o.device, o.dtype, o.attn, o.threads, o.progress,
            o.greedy, o.devices) == ("flac", "m", "v.npz", 9, 0.6, 20, 0.5, 3, "ray", 2, "auto", 0.5, "cpu",
                                     "float32", "sdpa", 1, False, False, None)
    assert capsys.readouterr().out == ("summary: 2 rows: 1 ok, 0 failed, 1 complete from an earlier run; 1.50 s of "
                                       "audio in 0:00:03 (0.50 audio-s per wall-s)\nmanifest: o/manifest.parquet\n")
    assert batch_main(["t.txt", "-o", "o", "--devices", "cuda:0, cuda:1", "--greedy"]) == 0
    assert seen["options"].devices == ["cuda:0", "cuda:1"] and seen["options"].greedy


def test_batch_is_dispatched_through_its_entry_point(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    from bark_kernels import cli

    entry = EntryPoint(name="batch", value="bark.cli.batch:batch_main", group=cli.COMMAND_GROUP)
    monkeypatch.setattr(cli, "registered_commands", lambda: {"batch": entry})
    assert cli.main(["batch", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: bark-kernels batch ")
    assert cli.main(["batch", "t.jsonl"]) == 2
    assert capsys.readouterr().err == ("bark-kernels batch: error: the following arguments are required: "
                                       "-o/--output-dir (--help for usage)\n")


def test_a_kill_s_leftovers_are_cleaned_and_a_cut_journal_line_dropped(tmp_path):
    """What a kill can leave (a temporary audio file, a journal line without its newline) is gone before the next
    run appends: the next entry starts on its own line."""
    from bark.bulk.manifest import Journal, prepare_out_dir, read_journal

    out = tmp_path / "out"
    out.mkdir()
    (out / ".a.wav.x1y2.tmp").write_bytes(b"RIFF half")
    (out / ".keep-me").write_text("not ours")
    (out / "manifest.jsonl").write_text('{"id": "a", "status": "ok"}\n{"id": "b", "sta', encoding="utf-8")
    assert [e["id"] for e in read_journal(str(out))] == ["a"]
    prepare_out_dir(str(out), "wav")
    assert sorted(os.listdir(out)) == [".keep-me", "manifest.jsonl"]
    with Journal(str(out)) as j:
        j.append({"id": "c", "status": "ok"})
    assert [e["id"] for e in read_journal(str(out))] == ["a", "c"]


def test_steady_rate_is_the_sum_of_each_worker_s_own_rate():
    """Worker a loaded at t=0 and finished 10 rows by t=5 (2 rows/s); worker b loaded at t=3 and finished 4 rows by
    t=5 (2 rows/s): 4 rows/s together, whatever a was doing while b loaded. No row after a load: no figure."""
    from bark.bulk.synthesize import BulkSummary

    def summary(timings):
        return BulkSummary(rows=0, skipped=0, ok=0, failed=0, audio_seconds=0.0, wall_seconds=0.0, manifest="",
                           timings=timings)

    timings = [("a", 0.0, 0.5 * (i + 1)) for i in range(10)] + [("b", 3.0, 3.0 + 0.5 * (i + 1)) for i in range(4)]
    assert summary(timings).steady_rows_per_second == pytest.approx(4.0)
    assert summary([]).steady_rows_per_second is None
    assert summary([("a", 2.0, 2.0)]).steady_rows_per_second is None


def test_benchmark_derives_scaling_and_verdicts_only_from_its_own_runs():
    from benchmarks import bulk as bench

    runs = {"local-1": {"rows_per_s": 2.0, "steady_rows_per_s": 2.5}, "local-2": {"rows_per_s": 3.0,
                                                                              "steady_rows_per_s": 4.5},
            "ray-2": {"rows_per_s": 2.4, "steady_rows_per_s": 4.0}}
    derived = bench.derive(runs)
    assert (derived["local_scaling_end_to_end"], derived["local_scaling_steady"]) == (1.5, 1.8)
    assert derived["ray_scaling_steady"] is None  # no ray-1 run: nothing is made up
    assert derived["ray_vs_local_2_workers_end_to_end"] == 0.8
    assert derived["targets"]["local 2 workers >= 1.6x one (steady)"] == "met (1.8)"
    assert derived["targets"]["local 2 workers >= 1.6x one (end_to_end)"] == "not met (1.5)"
    assert derived["targets"]["ray 2 actors >= 1.6x one (steady)"] == "not measured"
    assert derived["targets"]["ray within 15% of local at 2 workers (steady)"] == "met (0.889)"
