"""bark.loading: tiny transformers checkpoints (safetensors, pytorch_model.bin, sharded, legacy weight norm, HF cache
layout) load into ours; every broken checkpoint gives a clear error naming the file and the key."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import bark
from bark.loading import CheckpointError

transformers = pytest.importorskip("transformers")
import bark_tiny  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bark_load")
    hf = bark_tiny.save_tiny_bark(path, seed=2)
    return path, hf


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _same_weights(ours, hf) -> None:
    ref = hf.state_dict()
    for key, value in ours.state_dict().items():
        if key.startswith("codec_model."):
            continue
        assert torch.equal(value.float(), ref[key].float()), key
    ids = torch.randint(0, 12_096, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.coarse_acoustics(ids), hf.coarse_acoustics(ids).logits)


def test_safetensors_checkpoint_loads(saved):
    path, hf = saved
    ours = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
    _same_weights(ours, hf)
    assert ours.config.generation_config.fine_acoustics_config.max_fine_input_length == 64
    assert ours.config.fine_acoustics_config.tie_word_embeddings
    assert ours.fine_acoustics.lm_heads[0].weight is ours.fine_acoustics.input_embeds_layers[1].weight


def test_pytorch_bin_and_dtype(saved, tmp_path):
    path, hf = saved
    ckpt = _copy(path, tmp_path)
    os.remove(ckpt / "model.safetensors")
    torch.save(hf.state_dict(), ckpt / "pytorch_model.bin")  # includes tied heads and mask buffers: ignored
    ours = bark.BarkModel.from_pretrained(ckpt, attn_implementation="eager")
    _same_weights(ours, hf)
    half = bark.BarkModel.from_pretrained(ckpt, attn_implementation="eager", dtype="float16", device="cpu")
    assert half.dtype == torch.float16 and half.codec_model.quantizer.layers[0].codebook.embed.dtype == torch.float16


def test_sharded_checkpoint_and_missing_shard(saved, tmp_path):
    path, hf = saved
    ckpt = _copy(path, tmp_path)
    os.remove(ckpt / "model.safetensors")
    tensors = load_file(str(path / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: tensors[k].contiguous() for k in ks}, str(ckpt / name))
        weight_map.update(dict.fromkeys(ks, name))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _same_weights(bark.BarkModel.from_pretrained(ckpt, attn_implementation="eager"), hf)
    os.remove(ckpt / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        bark.BarkModel.from_pretrained(ckpt)


def test_legacy_weight_norm_codec_keys(saved, tmp_path):
    path, hf = saved
    ckpt = _copy(path, tmp_path)
    tensors = load_file(str(ckpt / "model.safetensors"))
    legacy = {k.replace(".parametrizations.weight.original0", ".weight_g")
               .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in tensors.items()}
    assert any(k.endswith(".weight_g") for k in legacy)
    save_file(legacy, str(ckpt / "model.safetensors"))
    ours = bark.BarkModel.from_pretrained(ckpt)
    ref = bark.BarkModel.from_pretrained(path)
    codes = torch.randint(0, 1024, (1, 8, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.codec_model.decode(codes), ref.codec_model.decode(codes))


def _rewrite(ckpt, edit):
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("case,error,pattern", [
    ("missing_key", CheckpointError, r"model\.safetensors.*missing key.*'semantic\.lm_head\.weight'"),
    ("unexpected_key", CheckpointError, r"model\.safetensors.*unexpected key.*'coarse_acoustics\.extra\.weight'"),
    ("wrong_shape", CheckpointError, r"model\.safetensors.*'fine_acoustics\.position_embeds_layer\.weight'.*"
                                     r"expected shape \(1024, 16\), got \(1023, 16\)"),
    ("integer_tensor", CheckpointError, r"'semantic\.layernorm_final\.weight'.*floating-point"),
    ("missing_codec_key", CheckpointError, r"model\.safetensors.*codec_model\.decoder\.layers\.0\.conv\.bias"),
    ("corrupt_weights", CheckpointError, r"model\.safetensors: cannot read safetensors"),
    ("no_weights", FileNotFoundError, r"no weights in directory .*model\.safetensors"),
    ("no_config", FileNotFoundError, r"config\.json is missing from directory"),
    ("corrupt_config", CheckpointError, r"config\.json: cannot read JSON"),
    ("not_bark_config", CheckpointError, r"config\.json: expected a 'fine_acoustics_config' object"),
    ("bad_vocab_config", CheckpointError, r"config\.json: invalid Bark configuration.*text_pad_token"),
    ("pickled_object", CheckpointError, r"pytorch_model\.bin: cannot read PyTorch weights"),
])
def test_broken_checkpoints_name_file_and_key(saved, tmp_path, case, error, pattern):
    path, _ = saved
    ckpt = _copy(path, tmp_path)
    if case == "missing_key":
        _rewrite(ckpt, lambda t: t.pop("semantic.lm_head.weight"))
    elif case == "unexpected_key":
        _rewrite(ckpt, lambda t: t.update({"coarse_acoustics.extra.weight": torch.zeros(2)}))
    elif case == "wrong_shape":
        _rewrite(ckpt, lambda t: t.update({"fine_acoustics.position_embeds_layer.weight": torch.zeros(1023, 16)}))
    elif case == "integer_tensor":
        _rewrite(ckpt, lambda t: t.update({"semantic.layernorm_final.weight": torch.ones(16, dtype=torch.int64)}))
    elif case == "missing_codec_key":
        _rewrite(ckpt, lambda t: t.pop("codec_model.decoder.layers.0.conv.bias"))
    elif case == "corrupt_weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif case == "no_weights":
        os.remove(ckpt / "model.safetensors")
    elif case == "no_config":
        os.remove(ckpt / "config.json")
    elif case == "corrupt_config":
        (ckpt / "config.json").write_text('{"semantic_config": {')
    elif case == "not_bark_config":
        config = json.loads((ckpt / "config.json").read_text())
        del config["fine_acoustics_config"]
        (ckpt / "config.json").write_text(json.dumps(config))
    elif case == "bad_vocab_config":
        config = json.loads((ckpt / "config.json").read_text())
        config["semantic_config"]["input_vocab_size"] = 10_048
        (ckpt / "config.json").write_text(json.dumps(config))
    elif case == "pickled_object":
        os.remove(ckpt / "model.safetensors")
        torch.save({"semantic.lm_head.weight": torch.nn.Linear(2, 2)}, ckpt / "pytorch_model.bin")
    with pytest.raises(error, match=pattern):
        bark.BarkModel.from_pretrained(ckpt)


def test_bad_arguments(saved, tmp_path):
    path, _ = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bark.BarkModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is a file"):
        bark.BarkModel.from_pretrained(path / "config.json")
    with pytest.raises(ValueError, match="dtype"):
        bark.BarkModel.from_pretrained(path, dtype="int8")
    with pytest.raises(ValueError, match="attn_implementation"):
        bark.BarkModel.from_pretrained(path, attn_implementation="xformers")


def _offline_hub(monkeypatch, cache_dir):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))


def test_repo_id_resolves_through_the_local_cache(saved, tmp_path, monkeypatch):
    path, hf = saved
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--tiny-bark" / "snapshots" / revision
    shutil.copytree(path, snapshot)
    (cache / "models--someone--tiny-bark" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-bark" / "refs" / "main").write_text(revision)
    _offline_hub(monkeypatch, cache)
    _same_weights(bark.BarkModel.from_pretrained("someone/tiny-bark", attn_implementation="eager"), hf)


def test_repo_id_offline_and_not_cached_says_what_to_do(tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path / "empty_hub")
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing from Hugging Face repo suno/bark-small.*"
                                                r"HF_HUB_OFFLINE.*hf download suno/bark-small"):
        bark.BarkModel.from_pretrained("suno/bark-small")


def test_building_for_a_checkpoint_skips_only_meta_initialisers(saved):
    """load_bark_model builds the modules on the meta device with their initialisers skipped (nothing to set there;
    torch's meta normal_ would import torch._dynamo, 1.4 s of every process's first load). A module built on a real
    device under the same mode is initialised as usual, and a fresh process loads a checkpoint without torch._dynamo."""
    import subprocess
    import sys

    from bark.model import _SkipMetaInit

    torch.manual_seed(3)
    expected = torch.nn.Embedding(7, 5).weight.detach().clone()
    torch.manual_seed(3)
    with _SkipMetaInit():
        built = torch.nn.Embedding(7, 5).weight.detach()
        with torch.device("meta"):
            skipped = torch.nn.Linear(4, 3)
    assert torch.equal(built, expected)
    assert skipped.weight.is_meta and skipped.bias.is_meta
    path, _ = saved
    code = ("import sys, bark; m = bark.BarkModel.from_pretrained(sys.argv[1], attn_implementation='sdpa'); "
            "assert all(not p.is_meta for p in m.parameters()); print('torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"
