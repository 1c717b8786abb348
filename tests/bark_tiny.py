"""Tiny random transformers ``BarkModel``s for tests (ours, the codec's, the CLI's, the transformers integration's).

They keep every Bark vocabulary size and special token id (semantic 129_600 in / 10_048 out, coarse 12_096,
fine 1_056, codebook_size 1024, EOS 10_000, pads and infer tokens) but are 16-32 wide with 1-2 layers, and the
generation windows are small (fine: 64-frame windows, stride 32, by default) so that every code path runs in
seconds, also under the Triton interpreter. ``save_tiny_bark(path)`` writes a checkpoint directory with
``save_pretrained`` (config.json, generation_config.json, model.safetensors) that ``bark.BarkModel.from_pretrained``
loads.
"""

from __future__ import annotations

import inspect
import json
import os

import numpy as np
import torch

SEMANTIC_VOCAB = (129_600, 10_048)
COARSE_VOCAB = (12_096, 12_096)
FINE_VOCAB = (1_056, 1_056)
CODEBOOK_SIZE = 1024


def tiny_generation_config_dict(max_fine_input_length: int = 64, max_fine_history_length: int = 32,
                                sliding_window_len: int = 60, max_coarse_history: int = 630,
                                max_coarse_input_length: int = 256, fine_temperature: float = 1.0) -> dict:
    """generation_config.json content of a tiny Bark (Bark's token ids, smaller fine windows)."""
    return dict(
        semantic_config=dict(eos_token_id=10_000, max_new_tokens=768, text_encoding_offset=10_048,
                             text_pad_token=129_595, semantic_infer_token=129_599, semantic_vocab_size=10_000,
                             max_input_semantic_length=256, semantic_rate_hz=49.9),
        coarse_acoustics_config=dict(coarse_semantic_pad_token=12_048, coarse_rate_hz=75, n_coarse_codebooks=2,
                                     coarse_infer_token=12_050, max_coarse_input_length=max_coarse_input_length,
                                     max_coarse_history=max_coarse_history, sliding_window_len=sliding_window_len),
        fine_acoustics_config=dict(temperature=fine_temperature, max_fine_history_length=max_fine_history_length,
                                   max_fine_input_length=max_fine_input_length, n_fine_codebooks=8),
        sample_rate=24_000,
        codebook_size=CODEBOOK_SIZE,
    )


_GENERATION_KEYS = set(inspect.signature(tiny_generation_config_dict).parameters)


def tiny_hf_bark(seed: int = 0, hidden_size: int = 16, num_layers: int = 1, num_heads: int = 2,
                 semantic_bias: bool = False, coarse_bias: bool = True, fine_bias: bool = False,
                 block_size: int = 1024, **generation_overrides):
    """A random transformers BarkModel (eval mode, fp32) with Bark's vocabularies and token ids, tiny widths."""
    import transformers

    def sub(vocab, bias, **extra):
        return dict(block_size=block_size, input_vocab_size=vocab[0], output_vocab_size=vocab[1],
                    num_layers=num_layers, num_heads=num_heads, hidden_size=hidden_size, bias=bias, dropout=0.0,
                    **extra)

    codec = transformers.EncodecConfig(hidden_size=16, num_filters=4, codebook_size=CODEBOOK_SIZE,
                                       target_bandwidths=[1.5, 6.0])  # 8 quantizers, encodec_24khz structure
    config = transformers.BarkConfig(
        semantic_config=sub(SEMANTIC_VOCAB, semantic_bias),
        coarse_acoustics_config=sub(COARSE_VOCAB, coarse_bias),
        fine_acoustics_config=sub(FINE_VOCAB, fine_bias, n_codes_total=8, n_codes_given=1),
        codec_config=codec.to_dict(),
    )
    torch.manual_seed(seed)
    model = transformers.BarkModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("codec_model."):
                if name.endswith("codebook.embed") or name.endswith("bias") or name.endswith("original0"):
                    p.add_(0.1 * torch.randn_like(p))
                continue
            if "layernorm" in name:  # non-trivial LayerNorm affine parameters
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
        for layer in model.codec_model.quantizer.layers:
            layer.codebook.embed.normal_()
    # As transformers loads a Bark generation_config.json: a GenerationConfig whose semantic_config etc. are dicts
    # (BarkModel.generate builds the sub-configs from them).
    generation_config = transformers.GenerationConfig()
    for key, value in tiny_generation_config_dict(**generation_overrides).items():
        setattr(generation_config, key, value)
    model.generation_config = generation_config
    return model


def save_tiny_bark(path, seed: int = 0, **kwargs):
    """Build ``tiny_hf_bark(seed, **kwargs)`` and save it to ``path`` with save_pretrained; returns the HF model.

    generation_config.json is written here with the nested Bark layout that the real checkpoints have (transformers
    5.x cannot save a BarkGenerationConfig itself).
    """
    import transformers

    model = tiny_hf_bark(seed=seed, **kwargs)
    bark_generation_config = model.generation_config
    model.generation_config = transformers.GenerationConfig()
    try:
        model.save_pretrained(str(path))
    finally:
        model.generation_config = bark_generation_config
    gen = {k: v for k, v in kwargs.items() if k in _GENERATION_KEYS}
    with open(os.path.join(str(path), "generation_config.json"), "w") as f:
        json.dump(tiny_generation_config_dict(**gen), f, indent=2)
    return model


SMALL_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz.,!?'")
    + ["hello", "world", "the", "bark", "##s", "##ing"]
)


def save_tiny_speak_checkpoint(path, seed: int = 0, preset_seed: int = 2):
    """``save_tiny_bark(path)`` plus what ``bark-kernels speak`` reads besides the weights: a small WordPiece
    vocab.txt, tokenizer_config.json and one named voice preset, "v2/en_speaker_0" (speaker_embeddings_path.json and
    its .npy files). Returns the path."""
    save_tiny_bark(path, seed=seed)
    with open(os.path.join(str(path), "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(SMALL_VOCAB) + "\n")
    with open(os.path.join(str(path), "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write('{"do_lower_case": false}')
    os.makedirs(os.path.join(str(path), "speaker_embeddings"), exist_ok=True)
    table = {"v2/en_speaker_0": {}}
    for key, value in random_voice_preset(seed=preset_seed).items():
        rel = f"speaker_embeddings/en_speaker_0_{key}.npy"
        np.save(os.path.join(str(path), rel), value)
        table["v2/en_speaker_0"][key] = rel
    with open(os.path.join(str(path), "speaker_embeddings_path.json"), "w", encoding="utf-8") as f:
        json.dump(table, f)
    return path


def tiny_random_bark_config():
    """A ``bark.BarkConfig`` with Bark's vocabularies and token ids, 16 wide, one layer (no weights: for
    ``bark.BarkModel(config)``, e.g. as a stand-in for ``bark.config.bark_small_config`` in the CLI's random model)."""
    import bark

    def sub(vocab, **extra):
        return dict(block_size=1024, input_vocab_size=vocab[0], output_vocab_size=vocab[1], num_layers=1, num_heads=2,
                    hidden_size=16, bias=False, **extra)

    return bark.BarkConfig(
        semantic_config=sub(SEMANTIC_VOCAB),
        coarse_acoustics_config=sub(COARSE_VOCAB),
        fine_acoustics_config=sub(FINE_VOCAB, n_codes_total=8, n_codes_given=1),
        codec_config=dict(hidden_size=16, num_filters=4, codebook_size=CODEBOOK_SIZE, target_bandwidths=[1.5, 6.0]),
        generation_config=tiny_generation_config_dict(),
    )


def random_voice_preset(seed: int = 0, n_semantic: int = 40, n_coarse_frames: int = 60,
                        n_fine_frames: int | None = None) -> dict[str, np.ndarray]:
    """A random voice preset with Bark's layout: semantic_prompt (n,), coarse_prompt (2, m), fine_prompt (8, m)."""
    rng = np.random.default_rng(seed)
    n_fine_frames = n_coarse_frames if n_fine_frames is None else n_fine_frames
    return {
        "semantic_prompt": rng.integers(0, 10_000, size=(n_semantic,), dtype=np.int64),
        "coarse_prompt": rng.integers(0, CODEBOOK_SIZE, size=(2, n_coarse_frames), dtype=np.int64),
        "fine_prompt": rng.integers(0, CODEBOOK_SIZE, size=(8, n_fine_frames), dtype=np.int64),
    }


def as_torch_preset(preset: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in preset.items()}


def random_text_ids(batch: int, lengths, seed: int = 0, max_length: int = 256):
    """input_ids (B, 256) of random BERT-vocabulary ids, right-padded with 0, and the attention mask."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(batch, max_length, dtype=torch.long)
    attention_mask = torch.zeros(batch, max_length, dtype=torch.long)
    for b, n in enumerate(lengths):
        input_ids[b, :n] = torch.randint(1000, 119_547, (n,), generator=gen)
        attention_mask[b, :n] = 1
    return input_ids, attention_mask


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||out - ref|| / ||ref|| in float64 (the measure MODEL_RTOL bounds)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
