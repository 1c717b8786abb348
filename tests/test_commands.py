"""``bark-kernels`` commands registered by other packages (``speak`` of the model package) through the entry-point group
``bark_kernels.commands``: bark_kernels itself imports nothing from ``bark``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from bark_kernels import cli

ROOT = Path(__file__).resolve().parent.parent


def _entry(value: str, name: str = "speak") -> EntryPoint:
    return EntryPoint(name=name, value=value, group=cli.COMMAND_GROUP)


def _declared() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["project"]["entry-points"][cli.COMMAND_GROUP]


def test_pyproject_registers_speak_of_the_model_package():
    import bark.cli

    assert _declared() == {"speak": "bark.cli:speak_main", "batch": "bark.cli.batch:batch_main",
                           "serve": "bark.cli.serve:serve_main"}
    assert _entry(_declared()["speak"]).load() is bark.cli.speak_main
    import bark.cli.serve

    assert _entry(_declared()["serve"], "serve").load() is bark.cli.serve.serve_main
    import bark.cli.batch

    assert _entry(_declared()["batch"], "batch").load() is bark.cli.batch.batch_main


def test_installed_metadata_of_this_checkout_has_the_commands(tmp_path):
    """What the console script sees, run outside the checkout (only installed metadata counts there). The entry points
    reach the metadata only through `pip install -e .`: an install of this checkout made before they were declared
    must be redone (scripts/setup.sh). An install of another tree says nothing about this one."""
    code = ("import json, bark_kernels; from bark_kernels import cli; listed = getattr(cli, 'registered_commands', "
            "None); print(json.dumps([bark_kernels.__file__, listed and {n: e.value for n, e in listed().items()}]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=env)
    if run.returncode != 0:
        pytest.skip(f"bark_kernels is not installed in this environment (run scripts/setup.sh): {run.stderr[-300:]}")
    package_file, installed = json.loads(run.stdout.strip().splitlines()[-1])
    if not Path(package_file).resolve().is_relative_to(ROOT):
        pytest.skip(f"bark_kernels is installed from {Path(package_file).parent.parent}, not from {ROOT}")
    assert installed == _declared(), (f"the installed metadata has {installed}, pyproject.toml declares {_declared()}: "
                                      "run `bash scripts/setup.sh` (pip install -e .) again")


def test_speak_is_dispatched_through_its_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(cli, "registered_commands", lambda: {"speak": _entry("bark.cli:speak_main")})
    assert cli.main(["speak", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: bark-kernels speak ")
    assert cli.main(["speak", "hi"]) == 2  # speak's own one-line usage error
    assert capsys.readouterr().err == ("bark-kernels speak: error: the following arguments are required: -o/--output "
                                       "(--help for usage)\n")
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bark-kernels {check,speak} ...") and "from bark.cli:speak_main" in out


def _fake_command(argv):
    _fake_command.calls.append(argv)
    if argv == ["interrupt"]:
        raise KeyboardInterrupt
    return 7


_fake_command.calls = []


def test_a_command_gets_its_arguments_and_its_exit_code_is_kept(monkeypatch, capsys):
    monkeypatch.setattr(cli, "registered_commands", lambda: {"fake": _entry(f"{__name__}:_fake_command", "fake")})
    monkeypatch.setattr(_fake_command, "calls", [])
    assert cli.main(["fake", "a", "--b"]) == 7
    assert cli.main(["fake", "interrupt"]) == 130
    assert _fake_command.calls == [["a", "--b"], ["interrupt"]]
    assert capsys.readouterr().err == "bark-kernels fake: interrupted\n"


def test_missing_metadata_is_one_line_that_says_to_install_again(monkeypatch, capsys):
    monkeypatch.setattr(cli, "registered_commands", lambda: {})
    assert cli.main(["speak", "hi", "-o", "x.wav"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("bark-kernels: error: unknown command 'speak' (expected check; --help for usage)")
    assert "bark_kernels.commands" in err and "scripts/setup.sh" in err and "pip install -e ." in err


def test_a_command_that_cannot_be_loaded_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "registered_commands", lambda: {"speak": _entry("no_such_module_for_bk:main")})
    assert cli.main(["speak", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "command 'speak' (no_such_module_for_bk:main, entry-point group 'bark_kernels.commands') cannot be " \
           "loaded: ModuleNotFoundError" in err


def test_listing_the_commands_imports_none_of_them():
    code = ("import sys; from bark_kernels import cli; names = cli.registered_commands(); cli._usage(names); "
            "print(sorted(m for m in sys.modules if m == 'bark' or m.startswith('bark.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
