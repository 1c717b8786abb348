"""Run transformers' own Bark test file with our attention forced on every Bark model, and compare with eager.

transformers' tests are not in its wheel: check out (or export) the transformers repository at the version that is
installed, then point ``--tests-root`` at that checkout (the folder holding ``tests/`` and ``utils/``). Nothing of it
is copied into this repository.

    python scripts/transformers_bark_tests.py --tests-root ~/transformers --impl eager  --junit eager.xml
    python scripts/transformers_bark_tests.py --tests-root ~/transformers --impl triton --junit triton.xml
    python scripts/transformers_bark_tests.py --compare eager.xml triton.xml

How the backend is forced: through transformers' own switch, the attention implementation a model resolves when it is
built. This file is also a pytest plugin (``-p transformers_bark_tests``); with ``BARK_HF_FORCE_IMPL=<name>`` it wraps
``PreTrainedModel.get_correct_attn_implementation`` so that every Bark model (BarkModel and its semantic, coarse and
fine sub-models) built without an explicit ``attn_implementation`` (transformers' default, how its testers build
their models) gets ``<name>`` (``triton``, ``bark_torch``, ``bark_eager``, ``bark_cuda``, ``bark_kernels``) instead
of eager. Tests that ask for ``"eager"`` by name keep it; ``--force-explicit-eager`` (``BARK_HF_FORCE_EXPLICIT=1``)
replaces those too (transformers then refuses ``config.output_attentions = True``, which it allows with "eager"
only). Other models (the EnCodec codec) are left alone. Without a GPU, ``triton`` runs under Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is imported).

``--compare`` reads two JUnit files and lists every test that passes in the first and does not pass in the second.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ENV_IMPL = "BARK_HF_FORCE_IMPL"
ENV_EXPLICIT = "BARK_HF_FORCE_EXPLICIT"
TEST_FILE = "tests/models/bark/test_modeling_bark.py"
REPO = Path(__file__).resolve().parent.parent

_forced = os.environ.get(ENV_IMPL, "").strip()
if _forced and _forced != "eager":
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------------------------------------
# the pytest plugin


def pytest_configure(config):
    impl = os.environ.get(ENV_IMPL, "").strip()
    if not impl or impl == "eager":
        return
    from transformers import modeling_utils
    from transformers.models.bark import modeling_bark

    import bark_kernels
    from bark_kernels.backends.triton._env import interpreter_enabled

    if interpreter_enabled():  # exact bf16 under the interpreter (else the triton backend refuses bf16)
        sys.path.insert(0, str(REPO))
        from tools import triton_interpreter

        triton_interpreter.apply()
    names = bark_kernels.register_transformers()
    if impl not in names:
        raise ValueError(f"{ENV_IMPL}: expected one of {names} or 'eager', got {impl!r}")
    original = modeling_utils.PreTrainedModel.get_correct_attn_implementation
    replaced = (None, "eager") if os.environ.get(ENV_EXPLICIT, "") == "1" else (None,)

    def get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
        if isinstance(self, modeling_bark.BarkPreTrainedModel) and requested_attention in replaced:
            requested_attention = impl
        return original(self, requested_attention, *args, **kwargs)

    modeling_utils.PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation
    config._bark_hf_forced = impl + (" (explicit 'eager' requests too)" if len(replaced) == 2 else "")


def pytest_report_header(config):
    impl = getattr(config, "_bark_hf_forced", None)
    import transformers

    return f"bark_kernels: transformers {transformers.__version__}, Bark attention forced to {impl or 'nothing (stock)'}"


# ----------------------------------------------------------------------------------------------------------------------
# runner and comparison


def junit_outcomes(path: str) -> dict[str, str]:
    """test id -> 'passed', 'failed', 'error' or 'skipped' from a pytest JUnit XML file."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                break
            if child.tag == "skipped":
                outcome = "skipped"
        outcomes[name] = outcome
    return outcomes


def counts(outcomes: dict[str, str]) -> dict[str, int]:
    result = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for outcome in outcomes.values():
        result[outcome] += 1
    return result


def compare(reference: str, other: str) -> list[str]:
    """Tests that pass in ``reference`` and do not pass in ``other`` (missing ones included)."""
    ref, out = junit_outcomes(reference), junit_outcomes(other)
    return sorted(name for name, outcome in ref.items() if outcome == "passed" and out.get(name) != "passed")


def run(tests_root: str, impl: str, junit: str, python: str, extra: list[str], explicit: bool = False) -> int:
    env = dict(os.environ)
    env[ENV_IMPL] = impl
    env[ENV_EXPLICIT] = "1" if explicit else "0"
    paths = [str(Path(__file__).resolve().parent), str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [python, "-m", "pytest", "-p", "transformers_bark_tests", TEST_FILE, "-q", "-p", "no:cacheprovider",
           f"--junitxml={os.path.abspath(junit)}", *extra]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=tests_root, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests-root", help="a transformers checkout at the installed version")
    parser.add_argument("--impl", default="triton", help="'eager' (stock) or one of our attn_implementation names")
    parser.add_argument("--junit", help="JUnit XML output file")
    parser.add_argument("--python", default=sys.executable, help="interpreter with transformers and bark_kernels")
    parser.add_argument("--force-explicit-eager", action="store_true",
                        help="also replace attn_implementation='eager' asked for by name")
    parser.add_argument("--compare", nargs=2, metavar=("EAGER_XML", "OURS_XML"),
                        help="list the tests that pass in the first run and not in the second")
    args, extra = parser.parse_known_args(argv)
    if args.compare:
        for path in args.compare:
            print(path, counts(junit_outcomes(path)))
        regressions = compare(*args.compare)
        print(f"{len(regressions)} test(s) pass in {args.compare[0]} and not in {args.compare[1]}")
        for name in regressions:
            print("  " + name)
        return 1 if regressions else 0
    if not args.tests_root or not args.junit:
        parser.error("--tests-root and --junit are needed to run the tests")
    rc = run(args.tests_root, args.impl, args.junit, args.python, extra, args.force_explicit_eager)
    if os.path.exists(args.junit):
        print(args.impl, counts(junit_outcomes(args.junit)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
