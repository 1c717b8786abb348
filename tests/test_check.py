"""`bark-kernels check`: prints the environment and every backend, self-tests the available ones, exits 0."""

from bark_kernels import cli, registry


def test_check_passes_and_lists_every_backend(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for name in registry.BACKENDS:
        assert f"  {name} " in out
    assert "cpu   eager       float32   ok" in out
    if registry.availability("triton") is None:  # under the interpreter (conftest), our kernels are self-tested too
        for dtype in ("float16", "bfloat16", "float32"):
            assert f"cpu   triton      {dtype:<9} ok" in out
    assert "check passed" in out


def test_check_reports_a_failing_backend(monkeypatch, capsys):
    """A backend whose op gives a wrong answer makes check fail and name the op."""
    registry._load("sdpa")
    module = registry._modules["sdpa"]
    monkeypatch.setitem(module.OPS, "attention", lambda q, k, v, causal, scale, **kw: q * 0 + 1)
    assert cli.main(["check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "attention: FAIL: AssertionError" in out and "check FAILED" in out


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
