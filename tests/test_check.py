"""`bark-kernels check`: prints the environment and every backend, self-tests the available ones, exits 0.

The output is parsed into rows by whitespace-separated fields, not matched by column widths, and the expected rows are
derived from the registry, so the same test holds on a CPU machine (Triton under its interpreter runs on CPU tensors)
and on a CUDA machine (Triton runs on CUDA tensors only: its CPU rows are skips there, its CUDA rows must pass).
"""

import torch

from bark_kernels import cli, registry
from bark_kernels.backends.triton._env import interpreter_enabled

DTYPES = ("float16", "bfloat16", "float32")


def _sections(out: str) -> tuple[list[str], list[str]]:
    """The lines of the 'backends:' section and of the 'self-test' section of check's output."""
    lines = out.splitlines()
    backends_at = lines.index("backends:")
    self_test_at = next(i for i, line in enumerate(lines) if line.startswith("self-test"))
    return lines[backends_at + 1:self_test_at], lines[self_test_at + 1:]


def _self_test_rows(lines: list[str]) -> dict[tuple[str, str, str], str]:
    """(device, backend, dtype) -> 'ok', 'FAILED' or 'skip' for every self-test row; per-op detail lines (which do not
    start with a device and a backend name) and the closing line are left out."""
    rows = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[1] in registry.BACKENDS:
            key = (fields[0], fields[1], fields[2])
            assert key not in rows, f"self-test row {key} printed twice"
            rows[key] = fields[3].rstrip(":")
    return rows


def test_check_passes_and_lists_every_backend(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    backend_lines, self_test_lines = _sections(out)
    assert [line.split()[0] for line in backend_lines] == list(registry.BACKENDS)
    rows = _self_test_rows(self_test_lines)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    expected = {}
    for device in devices:
        for name in registry.available_backends():
            for dtype in DTYPES:
                reason = registry.why_not(name, "attention", torch.device(device), getattr(torch, dtype), 64)
                expected[(device, name, dtype)] = "ok" if reason is None else "skip"
    assert rows == expected, f"self-test rows differ from what the registry says:\n{out}"
    assert rows[("cpu", "eager", "float32")] == "ok"
    # our Triton kernels are self-tested in every dtype: natively on a CUDA machine, under the interpreter on CPU
    triton_device = "cuda" if torch.cuda.is_available() else "cpu" if interpreter_enabled() else None
    if triton_device is not None and registry.availability("triton") is None:
        assert all(rows[(triton_device, "triton", dtype)] == "ok" for dtype in DTYPES), rows
    assert out.rstrip().splitlines()[-1] == "check passed"


def test_self_test_rows_are_parsed_by_fields_not_columns():
    """The parser reads rows whatever the column widths, and skips per-op detail lines."""
    lines = ["  cpu triton float16 ok (4 ops, 2.05s)",
             "  cuda    cuda        bfloat16    FAILED (4 ops, 0.1s)",
             "      attention: FAIL: AssertionError: max error",
             "  cpu   triton  float32   skip: CPU tensors need Triton's interpreter",
             "check FAILED: 1 failure(s)"]
    assert _self_test_rows(lines) == {("cpu", "triton", "float16"): "ok", ("cuda", "cuda", "bfloat16"): "FAILED",
                                      ("cpu", "triton", "float32"): "skip"}


def test_check_reports_a_failing_backend(monkeypatch, capsys):
    """A backend whose op gives a wrong answer makes check fail and name the op."""
    registry._load("sdpa")
    module = registry._modules["sdpa"]
    monkeypatch.setitem(module.OPS, "attention", lambda q, k, v, causal, scale, **kw: q * 0 + 1)
    assert cli.main(["check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "attention: FAIL: AssertionError" in out and "check FAILED" in out
    assert _self_test_rows(_sections(out)[1])[("cpu", "sdpa", "float32")] == "FAILED"


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
