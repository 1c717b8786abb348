"""bark.codec: our EnCodec decoder against transformers' EncodecModel on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from bark.codec import (
    EncodecDecoder,
    EncodecDecoderConfig,
    fold_weight_norm,
    is_ignored_codec_key,
    load_codec_state_dict,
)
from bark_kernels.testing import MODEL_RTOL

transformers = pytest.importorskip("transformers")

RTOL_FP32_MODEL = MODEL_RTOL[torch.float32]  # model-level parity against transformers, from the one table

CODEBOOK_SIZE = 64
NUM_QUANTIZERS = 8  # 1000 * 3.6 // (75 frames/s * 6 bits)


def _tiny_hf_config(**overrides):
    # Same structure as facebook/encodec_24khz (ratios 8,5,4,2; causal; reflect; LSTM 2 layers), tiny widths.
    kwargs = dict(hidden_size=16, num_filters=4, codebook_size=CODEBOOK_SIZE, target_bandwidths=[1.8, 3.6])
    kwargs.update(overrides)
    return transformers.EncodecConfig(**kwargs)


def _tiny_hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.EncodecModel(_tiny_hf_config(**overrides)).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:  # HF initialises codebooks to zeros: make them random
            layer.codebook.embed.normal_()
        for name, p in model.named_parameters():  # non-trivial biases and weight-norm magnitudes
            if name.endswith("bias") or name.endswith("original0"):
                p.add_(0.1 * torch.randn_like(p))
    assert model.config.num_quantizers == NUM_QUANTIZERS
    return model


def _legacy_weight_norm_form(state_dict):
    """parametrizations.weight.original0/1 -> weight_g/weight_v (what older torch/transformers saved)."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        out[k] = v.clone()
    return out


def _hf_decode(model, codes):
    # HF API in transformers 5.x: audio_codes (nb_frames, B, n_q, T), one scale per frame.
    with torch.no_grad():
        return model.decode(codes[None], [None], return_dict=False)[0]


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def hf_model():
    return _tiny_hf_model()


@pytest.mark.parametrize("form", ["parametrizations", "weight_g_v"])
@pytest.mark.parametrize("batch,n_q,frames", [(1, 8, 1), (2, 8, 37), (2, 3, 11)])
def test_decode_matches_transformers(hf_model, form, batch, n_q, frames):
    state_dict = hf_model.state_dict()
    if form == "weight_g_v":
        state_dict = _legacy_weight_norm_form(state_dict)
        assert any(k.endswith(".weight_g") for k in state_dict)
    ours = EncodecDecoder(hf_model.config.to_dict()).eval()
    ignored = load_codec_state_dict(ours, state_dict)
    assert ignored and all(k.startswith("encoder.") or ".codebook." in k for k in ignored)

    torch.manual_seed(batch * 100 + frames)
    codes = torch.randint(0, CODEBOOK_SIZE, (batch, n_q, frames))
    ref = _hf_decode(hf_model, codes)
    with torch.no_grad():
        out = ours.decode(codes)
    assert out.shape == (batch, 1, frames * 320) == ref.shape
    assert out.dtype == torch.float32
    assert ref.abs().max() > 0
    assert _rel_err(out, ref) <= RTOL_FP32_MODEL


def test_decode_rows_match_single_decodes(hf_model):
    ours = EncodecDecoder(hf_model.config.to_dict()).eval()
    load_codec_state_dict(ours, hf_model.state_dict())
    torch.manual_seed(1)
    codes = torch.randint(0, CODEBOOK_SIZE, (2, 8, 9))
    with torch.no_grad():
        rows = ours.decode_rows(codes, [9, 4])
        ref1 = _hf_decode(hf_model, codes[1:2, :, :4])
    assert [tuple(r.shape) for r in rows] == [(1, 9 * 320), (1, 4 * 320)]
    assert _rel_err(rows[1], ref1[0]) <= RTOL_FP32_MODEL
    with pytest.raises(ValueError, match="lengths"):
        ours.decode_rows(codes, [9])


def test_non_causal_and_group_norm_variants_match_transformers():
    # Not Bark's settings, but the config allows them: the padding / norm branches must still match HF.
    for overrides in (dict(use_causal_conv=False), dict(norm_type="time_group_norm", pad_mode="constant")):
        hf = _tiny_hf_model(seed=3, upsampling_ratios=[4, 2], sampling_rate=600, **overrides)  # 75 frames/s
        ours = EncodecDecoder(hf.config).eval()  # an EncodecConfig object works too
        load_codec_state_dict(ours, hf.state_dict())
        codes = torch.randint(0, CODEBOOK_SIZE, (2, 5, 13))
        with torch.no_grad():
            out = ours.decode(codes)
        ref = _hf_decode(hf, codes)
        assert out.shape == ref.shape == (2, 1, 13 * 8), overrides
        assert _rel_err(out, ref) <= RTOL_FP32_MODEL, overrides


def test_fold_weight_norm_equals_torch_weight_norm():
    torch.manual_seed(0)
    for conv in (torch.nn.Conv1d(5, 7, 3), torch.nn.ConvTranspose1d(6, 4, 8, stride=4)):
        wn = torch.nn.utils.parametrizations.weight_norm(conv)
        with torch.no_grad():
            wn.parametrizations.weight.original0.mul_(1.7)
            expected = wn.weight.detach().clone()
        sd = {"conv." + k: v for k, v in wn.state_dict().items()}
        for form in (sd, _legacy_weight_norm_form(sd)):
            folded = fold_weight_norm(form)
            assert set(folded) == {"conv.weight", "conv.bias"}
            assert torch.equal(folded["conv.weight"], expected)
            assert torch.equal(folded["conv.bias"], conv.bias.detach())


def test_fold_weight_norm_bad_pairs():
    v = torch.randn(4, 3, 2)
    g = torch.rand(4, 1, 1)
    with pytest.raises(ValueError, match=r"a\.weight.*missing"):
        fold_weight_norm({"a.weight_v": v})
    with pytest.raises(ValueError, match=r"a\.weight"):
        fold_weight_norm({"a.weight": v, "a.weight_g": g, "a.weight_v": v})
    with pytest.raises(ValueError, match=r"a\.weight.*shape"):
        fold_weight_norm({"a.weight_g": torch.rand(3, 1, 1), "a.weight_v": v})


def test_ignored_keys():
    assert is_ignored_codec_key("encoder.layers.0.conv.parametrizations.weight.original0")
    assert is_ignored_codec_key("encoder.layers.1.lstm.weight_ih_l0")
    assert is_ignored_codec_key("quantizer.layers.31.codebook.embed_avg")
    assert is_ignored_codec_key("quantizer.layers.0.codebook.cluster_size")
    assert is_ignored_codec_key("quantizer.layers.0.codebook.inited")
    assert not is_ignored_codec_key("quantizer.layers.0.codebook.embed")
    assert not is_ignored_codec_key("decoder.layers.0.conv.weight")
    assert not is_ignored_codec_key("decoder.extra")


def test_bark_small_shapes_and_keys():
    # The real encodec_24khz config: 32 codebooks of 1024 x 128, hop 320.
    model = EncodecDecoder(EncodecDecoderConfig())
    assert model.config.num_quantizers == 32 and model.hop_length == 320 and model.sampling_rate == 24_000
    keys = set(model.state_dict())
    assert "quantizer.layers.31.codebook.embed" in keys
    assert "decoder.layers.0.conv.weight" in keys and "decoder.layers.1.lstm.weight_hh_l1" in keys
    assert "decoder.layers.4.block.1.conv.weight" in keys and "decoder.layers.4.shortcut.conv.bias" in keys
    assert "decoder.layers.15.conv.weight" in keys


def test_bad_state_dicts_name_the_key(hf_model):
    ours = EncodecDecoder(hf_model.config.to_dict())
    good = {"codec_model." + k: v for k, v in hf_model.state_dict().items()}
    load_codec_state_dict(ours, good, prefix="codec_model.")

    missing = dict(good)
    del missing["codec_model.decoder.layers.4.shortcut.conv.bias"]
    with pytest.raises(ValueError, match=r"missing.*codec_model\.decoder\.layers\.4\.shortcut\.conv\.bias"):
        load_codec_state_dict(ours, missing, prefix="codec_model.")

    missing_half = dict(good)
    del missing_half["codec_model.decoder.layers.0.conv.parametrizations.weight.original0"]
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.conv\.weight"):
        load_codec_state_dict(ours, missing_half, prefix="codec_model.")

    wrong_shape = dict(good)
    wrong_shape["codec_model.quantizer.layers.2.codebook.embed"] = torch.zeros(CODEBOOK_SIZE + 1, 16)
    with pytest.raises(ValueError, match=r"codec_model\.quantizer\.layers\.2\.codebook\.embed.*shape"):
        load_codec_state_dict(ours, wrong_shape, prefix="codec_model.")

    unexpected = dict(good)
    unexpected["codec_model.decoder.layers.99.conv.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected.*codec_model\.decoder\.layers\.99\.conv\.bias"):
        load_codec_state_dict(ours, unexpected, prefix="codec_model.")
    load_codec_state_dict(ours, unexpected, prefix="codec_model.", strict=False)


def test_bad_codes(hf_model):
    ours = EncodecDecoder(hf_model.config.to_dict())
    with pytest.raises(ValueError, match="codes.*shape"):
        ours.decode(torch.zeros(8, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="codes.*integer"):
        ours.decode(torch.zeros(1, 8, 5))
    with pytest.raises(ValueError, match="n_q"):
        ours.decode(torch.zeros(1, NUM_QUANTIZERS + 1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes.*\[0, 64\)"):
        ours.decode(torch.full((1, 2, 5), CODEBOOK_SIZE, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook_dim"):
        EncodecDecoder({"hidden_size": 16, "codebook_dim": 8})
    with pytest.raises(ValueError, match="norm_type"):
        EncodecDecoder({"norm_type": "batch_norm"})


def test_empty_codes_give_empty_audio(hf_model):
    ours = EncodecDecoder(hf_model.config.to_dict())
    out = ours.decode(torch.zeros(2, 8, 0, dtype=torch.long))
    assert out.shape == (2, 1, 0)


def test_random_init_is_not_silent(hf_model):
    # The CLI's built-in random model relies on this: random codebooks, so random codes decode to noise, not a constant.
    torch.manual_seed(0)
    ours = EncodecDecoder(hf_model.config.to_dict()).eval()
    with torch.no_grad():
        audio = ours.decode(torch.randint(0, CODEBOOK_SIZE, (1, 8, 20)))
    assert torch.isfinite(audio).all() and audio[0, 0, 320:].std() > 1e-3
