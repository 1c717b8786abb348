"""EnCodec 24 kHz decoder: residual vector quantizer decode + SEANet decoder.

Only the half of EnCodec that Bark needs (``BarkModel.codec_decode``): audio codes -> waveform. Parameter names equal
the Hugging Face checkpoint keys under ``codec_model.`` once weight norm is folded (see :func:`fold_weight_norm`):

    quantizer.layers.{i}.codebook.embed          (codebook_size, codebook_dim)
    decoder.layers.{n}.conv.weight / .bias       Conv1d / ConvTranspose1d layers
    decoder.layers.{n}.lstm.*                    the 2-layer LSTM with skip connection
    decoder.layers.{n}.block.{1,3}.conv.*        residual block convolutions
    decoder.layers.{n}.shortcut.conv.*           residual block 1x1 shortcut

The behaviour (causal / non-causal padding, reflect padding of short inputs, transposed-conv trimming, LSTM skip)
follows transformers' ``EncodecModel`` for the ``facebook/encodec_24khz`` configuration that suno/bark ships as
``codec_config``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .config import EncodecDecoderConfig

__all__ = [
    "EncodecDecoderConfig",
    "EncodecDecoder",
    "fold_weight_norm",
    "is_ignored_codec_key",
    "IGNORED_CODEC_KEY_PATTERNS",
    "load_codec_state_dict",
]


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


def _pad1d(x: torch.Tensor, padding_left: int, padding_right: int, mode: str) -> torch.Tensor:
    """F.pad on the last dim; reflect padding of an input no longer than the pad first appends zeros (as HF/EnCodec)."""
    if mode != "reflect":
        return F.pad(x, (padding_left, padding_right), mode=mode)
    length = x.shape[-1]
    max_pad = max(padding_left, padding_right)
    extra_zeros = 0
    if length <= max_pad:
        extra_zeros = max_pad - length + 1
        x = F.pad(x, (0, extra_zeros))
    x = F.pad(x, (padding_left, padding_right), mode="reflect")
    return x[..., : x.shape[-1] - extra_zeros]


class EncodecConv1d(nn.Module):
    """Conv1d with causal (left) or centred padding so that output length = ceil(input length / stride).

    Holds ``conv`` (plain nn.Conv1d; weight norm is folded into ``conv.weight`` at load time) and, for
    norm_type="time_group_norm", ``norm`` (GroupNorm with one group).
    """

    def __init__(
        self,
        config: EncodecDecoderConfig,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.causal = config.use_causal_conv
        self.pad_mode = config.pad_mode
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation)
        if config.norm_type == "time_group_norm":
            self.norm = nn.GroupNorm(1, out_channels)
        self.stride = stride
        self.effective_kernel_size = (kernel_size - 1) * dilation + 1
        self.padding_total = self.effective_kernel_size - stride

    def _extra_padding(self, length: int) -> int:
        # Right padding so that the last window is full: the number of output frames is
        # ceil((length - k + padding_total) / stride) + 1 and the ideal input length is what those frames cover.
        k, s, p = self.effective_kernel_size, self.stride, self.padding_total
        n_frames = -(-(length - k + p) // s)  # ceil((length - k + p) / s) = ceil(.. / s + 1) - 1
        ideal_length = n_frames * s + k - p
        return ideal_length - length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, L) -> (B, C_out, ceil(L / stride))"""
        extra = self._extra_padding(x.shape[-1])
        if self.causal:
            x = _pad1d(x, self.padding_total, extra, self.pad_mode)
        else:
            padding_right = self.padding_total // 2
            padding_left = self.padding_total - padding_right
            x = _pad1d(x, padding_left, padding_right + extra, self.pad_mode)
        x = self.conv(x)
        if hasattr(self, "norm"):
            x = self.norm(x)
        return x


class EncodecConvTranspose1d(nn.Module):
    """ConvTranspose1d whose output is trimmed back to input length * stride (right-trimmed when causal)."""

    def __init__(
        self, config: EncodecDecoderConfig, in_channels: int, out_channels: int, kernel_size: int, stride: int
    ) -> None:
        super().__init__()
        self.causal = config.use_causal_conv
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        if config.norm_type == "time_group_norm":
            self.norm = nn.GroupNorm(1, out_channels)
        padding_total = kernel_size - stride
        if self.causal:
            self.padding_right = math.ceil(padding_total * config.trim_right_ratio)
        else:
            self.padding_right = padding_total // 2
        self.padding_left = padding_total - self.padding_right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, L) -> (B, C_out, L * stride)"""
        x = self.conv(x)  # (B, C_out, (L - 1) * stride + kernel_size)
        if hasattr(self, "norm"):
            x = self.norm(x)
        return x[..., self.padding_left : x.shape[-1] - self.padding_right]


class EncodecLSTM(nn.Module):
    """Multi-layer LSTM over time with a skip connection, on conv layout (B, C, T)."""

    def __init__(self, config: EncodecDecoderConfig, dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, config.num_lstm_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) -> (B, C, T)"""
        x = x.permute(2, 0, 1)  # (T, B, C): nn.LSTM's default sequence-first layout
        x = self.lstm(x)[0] + x
        return x.permute(1, 2, 0)  # (B, C, T)


class EncodecResnetBlock(nn.Module):
    """SEANet residual block: ELU, conv(k, dilation) to dim // compress, ELU, conv(1) back to dim; plus a shortcut."""

    def __init__(self, config: EncodecDecoderConfig, dim: int, dilations: tuple[int, int]) -> None:
        super().__init__()
        kernel_sizes = (config.residual_kernel_size, 1)
        hidden = dim // config.compress
        layers: list[nn.Module] = []
        for i, (k, d) in enumerate(zip(kernel_sizes, dilations, strict=True)):
            c_in = dim if i == 0 else hidden
            c_out = dim if i == len(kernel_sizes) - 1 else hidden
            layers.append(nn.ELU())
            layers.append(EncodecConv1d(config, c_in, c_out, k, dilation=d))
        self.block = nn.ModuleList(layers)  # indices 1 and 3 are convs: keys block.1.conv.*, block.3.conv.*
        self.shortcut = EncodecConv1d(config, dim, dim, kernel_size=1) if config.use_conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, dim, T) -> (B, dim, T)"""
        y = x
        for layer in self.block:
            y = layer(y)
        return self.shortcut(x) + y


class SEANetDecoder(nn.Module):
    """conv -> LSTM -> [ELU, transposed conv (upsample by ratio), residual blocks] per ratio -> ELU -> conv."""

    def __init__(self, config: EncodecDecoderConfig) -> None:
        super().__init__()
        scale = 2 ** len(config.upsampling_ratios)
        layers: list[nn.Module] = [
            EncodecConv1d(config, config.hidden_size, scale * config.num_filters, config.kernel_size),
            EncodecLSTM(config, scale * config.num_filters),
        ]
        for ratio in config.upsampling_ratios:
            channels = scale * config.num_filters
            layers.append(nn.ELU())
            layers.append(EncodecConvTranspose1d(config, channels, channels // 2, kernel_size=2 * ratio, stride=ratio))
            for j in range(config.num_residual_layers):
                layers.append(EncodecResnetBlock(config, channels // 2, (config.dilation_growth_rate**j, 1)))
            scale //= 2
        layers.append(nn.ELU())
        layers.append(EncodecConv1d(config, config.num_filters, config.audio_channels, config.last_kernel_size))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, hidden_size, T) -> audio (B, audio_channels, T * hop_length)"""
        for layer in self.layers:
            x = layer(x)
        return x


class _Codebook(nn.Module):
    def __init__(self, config: EncodecDecoderConfig) -> None:
        super().__init__()
        # Random until a checkpoint is loaded (HF starts from zeros, which would make a random model decode silence).
        self.register_buffer("embed", torch.randn(config.codebook_size, config.codebook_dim))


class _VectorQuantization(nn.Module):
    def __init__(self, config: EncodecDecoderConfig) -> None:
        super().__init__()
        self.codebook = _Codebook(config)


class ResidualVectorQuantizerDecoder(nn.Module):
    """Decode half of the residual vector quantizer: the embeddings of each codebook's codes, summed."""

    def __init__(self, config: EncodecDecoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_VectorQuantization(config) for _ in range(config.num_quantizers)])

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n_q, T) long -> embeddings (B, codebook_dim, T), summed over the first n_q codebooks"""
        out = None
        for i in range(codes.shape[1]):
            q = F.embedding(codes[:, i], self.layers[i].codebook.embed)  # (B, T, D)
            out = q if out is None else out + q
        return out.transpose(1, 2)  # (B, D, T)


# --------------------------------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------------------------------


class EncodecDecoder(nn.Module):
    """EnCodec decoder: codes (B, n_q, T) -> audio (B, audio_channels, T * hop_length).

    Its state dict keys are the HF checkpoint's ``codec_model.*`` decoder keys (quantizer codebook embeddings and
    ``decoder.*``), with weight norm folded. Load a raw checkpoint with :func:`load_codec_state_dict`.
    """

    def __init__(self, config: Mapping | EncodecDecoderConfig | object | None = None) -> None:
        super().__init__()
        self.config = EncodecDecoderConfig.from_dict(config) if config is not None else EncodecDecoderConfig()
        self.quantizer = ResidualVectorQuantizerDecoder(self.config)
        self.decoder = SEANetDecoder(self.config)

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def _check_codes(self, codes: torch.Tensor, check_values: bool) -> None:
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes: expected a torch.Tensor of shape (B, n_q, T), got {type(codes).__name__}")
        if codes.dim() != 3:
            raise ValueError(f"codes: expected shape (B, n_q, T), got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise TypeError(f"codes: expected an integer tensor (torch.long), got {codes.dtype}")
        n_q = codes.shape[1]
        if not 1 <= n_q <= self.config.num_quantizers:
            raise ValueError(
                f"codes: expected 1 <= n_q <= {self.config.num_quantizers} codebooks (dim 1), got n_q={n_q} "
                f"(shape {tuple(codes.shape)})"
            )
        if check_values and codes.numel() > 0:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.config.codebook_size:
                raise ValueError(f"codes: expected values in [0, {self.config.codebook_size}), got min {lo}, max {hi}")

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, n_q, T) -> quantized embeddings (B, codebook_dim, T) (HF: ``codec_model.quantizer.decode``)."""
        self._check_codes(codes, check_values=True)
        return self.quantizer(codes.long())

    def decode(self, codes: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """codes (B, n_q, T) integer -> audio (B, audio_channels, T * hop_length) in the model's dtype.

        Matches HF's ``codec_model.decoder(codec_model.quantizer.decode(codes.transpose(0, 1)))``.
        ``check_values`` validates the code range (one host sync); pass False to skip it.
        """
        self._check_codes(codes, check_values=check_values)
        if codes.shape[-1] == 0:
            dtype = self.quantizer.layers[0].codebook.embed.dtype
            return torch.zeros(codes.shape[0], self.config.audio_channels, 0, dtype=dtype, device=codes.device)
        emb = self.quantizer(codes.long())  # (B, D, T)
        return self.decoder(emb)  # (B, C, T * hop)

    def decode_each(self, codes: Sequence[torch.Tensor], check_values: bool = True,
                    together: bool = True) -> list[torch.Tensor]:
        """Decode a list of rows, each (n_q, T_b) -> (audio_channels, T_b * hop_length). Rows of one length are decoded
        as one batch when ``together`` (as transformers' generate does); otherwise each alone (the LSTM must not see
        another row's padding)."""
        frames = [int(c.shape[-1]) for c in codes]
        if together and codes and len(set(frames)) == 1:
            audio = self.decode(torch.stack(list(codes)), check_values=check_values)  # (B, C, T * hop)
            return list(audio.unbind(0))
        return [self.decode(c[None], check_values=check_values)[0] for c in codes]

    def decode_rows(self, codes: torch.Tensor, lengths: Iterable[int], check_values: bool = True) -> list[torch.Tensor]:
        """Decode each row b alone on its first lengths[b] frames (the LSTM would see padding otherwise).

        codes (B, n_q, T) -> list of B tensors (audio_channels, lengths[b] * hop_length), as HF's codec_decode with
        output_lengths (which squeezes them further).
        """
        lengths = [int(n) for n in lengths]
        self._check_codes(codes, check_values=check_values)
        if len(lengths) != codes.shape[0]:
            raise ValueError(f"lengths: expected {codes.shape[0]} entries (one per row of codes), got {len(lengths)}")
        for b, n in enumerate(lengths):
            if not 0 <= n <= codes.shape[-1]:
                raise ValueError(f"lengths[{b}]: expected 0 <= length <= {codes.shape[-1]}, got {n}")
        return self.decode_each([codes[b, :, :n] for b, n in enumerate(lengths)], check_values=False, together=False)

    forward = decode


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint helpers
# --------------------------------------------------------------------------------------------------------------------

_PARAMETRIZED_G = ".parametrizations.weight.original0"
_PARAMETRIZED_V = ".parametrizations.weight.original1"
_LEGACY_G = ".weight_g"
_LEGACY_V = ".weight_v"


def _fold(g: torch.Tensor, v: torch.Tensor, key: str) -> torch.Tensor:
    if g.dim() != v.dim() or g.shape[0] != v.shape[0] or any(s != 1 for s in g.shape[1:]):
        raise ValueError(
            f"{key}: weight-norm magnitude g must have shape ({v.shape[0]}, 1, ..., 1) to match direction v "
            f"{tuple(v.shape)}, got {tuple(g.shape)}"
        )
    dtype = v.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    # torch's weight norm (dim=0): weight = v * (g / ||v||), the norm over every dim but 0.
    w = torch._weight_norm(v.to(compute), g.to(compute), 0)
    return w.to(dtype)


def fold_weight_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn weight-normed entries into plain ``X.weight`` (same math as torch's weight_norm with dim=0).

    Handles both ``X.parametrizations.weight.original0`` (g) / ``original1`` (v), as saved by
    ``torch.nn.utils.parametrizations.weight_norm``, and the legacy ``X.weight_g`` / ``X.weight_v``. Other entries
    pass through unchanged (same order). Raises ValueError naming the key when only one half of a pair is present or
    when a plain ``X.weight`` is present too.
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for g_suffix, v_suffix in ((_PARAMETRIZED_G, _PARAMETRIZED_V), (_LEGACY_G, _LEGACY_V)):
            if key.endswith(g_suffix) or key.endswith(v_suffix):
                is_g = key.endswith(g_suffix)
                prefix = key[: -len(g_suffix if is_g else v_suffix)]
                weight_key = prefix + ".weight"
                if weight_key in out and weight_key not in pairs:
                    raise ValueError(f"{key}: a plain {weight_key} and weight-norm halves are both present")
                slot = pairs.setdefault(weight_key, {})
                part = "g" if is_g else "v"
                if part in slot:
                    raise ValueError(f"{key}: weight norm given twice for {weight_key} (both saved forms present)")
                slot[part] = value
                out.setdefault(weight_key, None)  # keeps the position of the first half
                break
        else:
            if key in out:
                raise ValueError(f"{key}: a plain weight and weight-norm halves are both present for this key")
            out[key] = value
    for weight_key, slot in pairs.items():
        if "g" not in slot or "v" not in slot:
            missing = "g (magnitude)" if "g" not in slot else "v (direction)"
            raise ValueError(f"{weight_key}: weight norm half {missing} is missing from the state dict")
        out[weight_key] = _fold(slot["g"], slot["v"], weight_key)
    return out


# Checkpoint keys (relative to ``codec_model.``) that the decoder does not use: the whole encoder, the quantizer's
# training statistics, and buffers that HF versions have saved for the conv padding arithmetic.
IGNORED_CODEC_KEY_PATTERNS: tuple[str, ...] = (
    r"encoder\..*",
    r"quantizer\.layers\.\d+\.codebook\.(inited|cluster_size|embed_avg)",
    r"decoder\.layers\.\d+(\.block\.\d+|\.shortcut)?\.(stride|kernel_size|padding_total)",
)
_IGNORED_RE = re.compile("|".join(f"(?:{p})" for p in IGNORED_CODEC_KEY_PATTERNS))


def is_ignored_codec_key(key: str) -> bool:
    """True for a codec checkpoint key (without the ``codec_model.`` prefix) that the decoder ignores by design."""
    return _IGNORED_RE.fullmatch(key) is not None


def load_codec_state_dict(
    model: EncodecDecoder, state_dict: Mapping[str, torch.Tensor], prefix: str = "", strict: bool = True
) -> list[str]:
    """Fold weight norm, drop ignored keys and load into ``model`` with clear errors.

    ``state_dict`` holds codec keys, optionally all starting with ``prefix`` (e.g. "codec_model."); other keys are
    skipped. Raises ValueError naming the key for a missing key, a wrong shape, or (strict) an unexpected key.
    Returns the list of keys that were ignored by design (encoder, quantizer statistics).
    """
    if not isinstance(model, EncodecDecoder):
        raise TypeError(f"model: expected an EncodecDecoder, got {type(model).__name__}")
    sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    folded = fold_weight_norm(sub)
    ignored = [k for k in folded if is_ignored_codec_key(k)]
    wanted = model.state_dict()
    unexpected = [k for k in folded if k not in wanted and not is_ignored_codec_key(k)]
    missing = [k for k in wanted if k not in folded]
    if missing:
        raise ValueError(
            f"codec state dict: missing key(s) {[prefix + k for k in missing[:8]]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    if strict and unexpected:
        raise ValueError(
            f"codec state dict: unexpected key(s) {[prefix + k for k in unexpected[:8]]}"
            + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        )
    for k, ref in wanted.items():
        got = folded[k]
        if not isinstance(got, torch.Tensor):
            raise TypeError(f"{prefix + k}: expected a torch.Tensor, got {type(got).__name__}")
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(f"{prefix + k}: expected shape {tuple(ref.shape)}, got {tuple(got.shape)}")
        if not got.dtype.is_floating_point:
            raise TypeError(f"{prefix + k}: expected a floating-point tensor, got {got.dtype}")
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(folded[name])
    return [prefix + k for k in ignored]
