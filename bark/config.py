"""Configuration of the Bark model: the three transformer sub-models, the codec, and generation.

The field names are those of the Hugging Face checkpoint files, so a ``config.json`` (``semantic_config``,
``coarse_acoustics_config``, ``fine_acoustics_config``, ``codec_config``) and a ``generation_config.json``
(``semantic_config``, ``coarse_acoustics_config``, ``fine_acoustics_config``, ``sample_rate``, ``codebook_size``) map
onto these dataclasses one to one. Unknown keys (``model_type``, ``transformers_version``, ...) are ignored.

Token layout (the defaults of suno/bark and suno/bark-small):

    semantic model input:  text token t -> t + text_encoding_offset (10_048); padding -> text_pad_token (129_595);
                           semantic history tokens 0..9_999, history padding = semantic_pad_token (10_000);
                           one semantic_infer_token (129_599) after the 256 text positions.
    semantic model output: 0..9_999 semantic tokens, 10_000 = EOS (= semantic_pad_token); everything else suppressed.
    coarse model:          semantic tokens (pad -> coarse_semantic_pad_token 12_048), coarse_infer_token (12_050), then
                           interleaved codes of 2 codebooks: codebook n token c -> semantic_vocab_size + n * 1024 + c.
    fine model:            8 codebooks of 1024 codes each; 1024 (= codebook_size) is the "not yet predicted" pad.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "EncodecDecoderConfig",
    "BarkSubModelConfig",
    "BarkSemanticConfig",
    "BarkCoarseConfig",
    "BarkFineConfig",
    "BarkSemanticGenerationConfig",
    "BarkCoarseGenerationConfig",
    "BarkFineGenerationConfig",
    "BarkGenerationConfig",
    "BarkConfig",
    "bark_small_config",
    "bark_config",
    "ATTN_IMPLEMENTATIONS",
    "attn_backend_name",
]

# attn_implementation (transformers' names plus ours) -> bark_kernels backend name (None: the dispatcher chooses).
ATTN_IMPLEMENTATIONS: dict[str, str | None] = {
    "auto": None,
    "triton": "triton",
    "cuda": "cuda",
    "flash_attention_2": "flash_attn",
    "sdpa": "sdpa",
    "eager": "eager",
}


@dataclass
class EncodecDecoderConfig:
    """The fields of Hugging Face's ``EncodecConfig`` (``codec_config`` in Bark's config.json) the decoder uses.

    Defaults are those of ``facebook/encodec_24khz``. Build from the checkpoint's dict with :meth:`from_dict`
    (unknown keys such as ``model_type`` or ``transformers_version`` are ignored).
    """

    sampling_rate: int = 24_000
    audio_channels: int = 1
    hidden_size: int = 128
    num_filters: int = 32
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 5, 4, 2)
    norm_type: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "reflect"
    compress: int = 2
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 1024
    codebook_dim: int | None = None
    use_conv_shortcut: bool = True
    target_bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)
    # Not part of HF's config; derived from target_bandwidths when None (32 for encodec_24khz).
    num_quantizers: int | None = field(default=None)

    def __post_init__(self) -> None:
        self.upsampling_ratios = tuple(int(r) for r in self.upsampling_ratios)
        self.target_bandwidths = tuple(float(b) for b in self.target_bandwidths)
        if self.codebook_dim is None:
            self.codebook_dim = self.hidden_size
        if self.norm_type not in ("weight_norm", "time_group_norm"):
            raise ValueError(
                f"codec_config.norm_type: expected 'weight_norm' or 'time_group_norm', got {self.norm_type!r}"
            )
        if self.pad_mode not in ("reflect", "constant", "replicate", "circular"):
            raise ValueError(
                f"codec_config.pad_mode: expected one of reflect/constant/replicate/circular, got {self.pad_mode!r}"
            )
        if not self.use_causal_conv and self.trim_right_ratio != 1.0:
            raise ValueError(
                "codec_config.trim_right_ratio: values != 1.0 only make sense with use_causal_conv=True, "
                f"got trim_right_ratio={self.trim_right_ratio} with use_causal_conv=False"
            )
        if len(self.upsampling_ratios) == 0 or any(r < 1 for r in self.upsampling_ratios):
            raise ValueError(
                f"codec_config.upsampling_ratios: expected a non-empty list of positive ints, "
                f"got {self.upsampling_ratios}"
            )
        if self.codebook_size < 1:
            raise ValueError(f"codec_config.codebook_size: expected a positive int, got {self.codebook_size}")
        if self.codebook_dim != self.hidden_size:
            # HF's quantizer output feeds the decoder's first conv, whose input width is hidden_size.
            raise ValueError(
                f"codec_config.codebook_dim: expected it to equal hidden_size ({self.hidden_size}), "
                f"got {self.codebook_dim}"
            )
        if self.num_quantizers is None:
            self.num_quantizers = self._num_quantizers_from_bandwidth()
        if self.num_quantizers < 1:
            raise ValueError(
                f"codec_config: the number of quantizers must be >= 1, got {self.num_quantizers} "
                f"(from target_bandwidths={self.target_bandwidths})"
            )

    @property
    def hop_length(self) -> int:
        """Audio samples per code frame (320 for encodec_24khz)."""
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    def _num_quantizers_from_bandwidth(self) -> int:
        # Same formula as HF's EncodecConfig.num_quantizers.
        nbits = math.ceil(math.log2(self.codebook_size))
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * nbits))

    @classmethod
    def from_dict(cls, config: Mapping | EncodecDecoderConfig | object) -> EncodecDecoderConfig:
        """Build from HF's codec_config dict (or an object with the same attributes, e.g. an EncodecConfig)."""
        if isinstance(config, EncodecDecoderConfig):
            return config
        names = [f.name for f in dataclasses.fields(cls) if f.name != "num_quantizers"]
        if isinstance(config, Mapping):
            kwargs = {k: config[k] for k in names if k in config and config[k] is not None}
        else:
            kwargs = {k: getattr(config, k) for k in names if getattr(config, k, None) is not None}
        if not isinstance(config, Mapping) and not kwargs:
            raise TypeError(
                f"codec_config: expected a dict, an EncodecDecoderConfig or an EncodecConfig-like object, "
                f"got {type(config).__name__}"
            )
        return cls(**kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["upsampling_ratios"] = list(self.upsampling_ratios)
        d["target_bandwidths"] = list(self.target_bandwidths)
        return d


def attn_backend_name(attn_implementation: str | None) -> str | None:
    """Map an ``attn_implementation`` to the bark_kernels backend name (None = automatic choice)."""
    if attn_implementation is None:
        return None
    if not isinstance(attn_implementation, str) or attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation: expected one of {sorted(ATTN_IMPLEMENTATIONS)}, got {attn_implementation!r}"
        )
    return ATTN_IMPLEMENTATIONS[attn_implementation]


def _from_mapping(cls, data, what: str):
    """Build dataclass ``cls`` from a dict (unknown keys ignored) or return an instance unchanged."""
    if isinstance(data, cls):
        return data
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        if hasattr(data, "to_dict"):  # a transformers config object
            data = data.to_dict()
        else:
            raise TypeError(f"{what}: expected a dict or a {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in data.items() if k in names})


def _check_int(what: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}: expected an int >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# model configs


@dataclass
class BarkSubModelConfig:
    """One GPT-style Bark sub-model (keys of ``semantic_config`` etc. in config.json)."""

    block_size: int = 1024
    input_vocab_size: int = 10_048
    output_vocab_size: int = 10_048
    num_layers: int = 12
    num_heads: int = 12
    hidden_size: int = 768
    dropout: float = 0.0
    bias: bool = True

    _what = "sub-model config"

    def __post_init__(self) -> None:
        for name in ("block_size", "input_vocab_size", "output_vocab_size", "num_layers", "num_heads", "hidden_size"):
            _check_int(f"{self._what}.{name}", getattr(self, name), 1)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{self._what}: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not isinstance(self.bias, bool):
            raise ValueError(f"{self._what}.bias: expected a bool, got {self.bias!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, data):
        return _from_mapping(cls, data, cls._what)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BarkSemanticConfig(BarkSubModelConfig):
    _what = "semantic_config"


@dataclass
class BarkCoarseConfig(BarkSubModelConfig):
    _what = "coarse_acoustics_config"


@dataclass
class BarkFineConfig(BarkSubModelConfig):
    """The non-causal fine model: one input embedding per codebook, one lm_head per predicted codebook."""

    n_codes_total: int = 8
    n_codes_given: int = 1
    tie_word_embeddings: bool = True

    _what = "fine_acoustics_config"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int(f"{self._what}.n_codes_total", self.n_codes_total, 2)
        _check_int(f"{self._what}.n_codes_given", self.n_codes_given, 1)
        if self.n_codes_given >= self.n_codes_total:
            raise ValueError(
                f"{self._what}: n_codes_given ({self.n_codes_given}) must be < n_codes_total ({self.n_codes_total})"
            )
        if self.tie_word_embeddings and self.input_vocab_size != self.output_vocab_size:
            raise ValueError(
                f"{self._what}: tied lm_heads need input_vocab_size == output_vocab_size, got "
                f"{self.input_vocab_size} and {self.output_vocab_size}"
            )


# ----------------------------------------------------------------------------------------------------------------------
# generation configs (generation_config.json)


@dataclass
class _SamplingFields:
    """Sampling fields shared by the semantic and coarse stages (transformers' GenerationConfig names)."""

    do_sample: bool = False
    temperature: float | None = 1.0
    top_k: int | None = None  # None: 50 when sampling, as transformers' generate defaults it
    top_p: float | None = None


@dataclass
class BarkSemanticGenerationConfig(_SamplingFields):
    eos_token_id: int = 10_000
    max_new_tokens: int = 768
    text_encoding_offset: int = 10_048
    text_pad_token: int = 129_595
    semantic_infer_token: int = 129_599
    semantic_vocab_size: int = 10_000
    max_input_semantic_length: int = 256
    semantic_rate_hz: float = 49.9
    min_eos_p: float | None = None

    @property
    def semantic_pad_token(self) -> int:
        """The semantic padding token is the EOS token (as in transformers)."""
        return self.eos_token_id


@dataclass
class BarkCoarseGenerationConfig(_SamplingFields):
    coarse_semantic_pad_token: int = 12_048
    coarse_rate_hz: float = 75
    n_coarse_codebooks: int = 2
    coarse_infer_token: int = 12_050
    max_coarse_input_length: int = 256
    max_coarse_history: int = 630
    sliding_window_len: int = 60


@dataclass
class BarkFineGenerationConfig:
    temperature: float | None = 1.0  # 1.0 or None: argmax; otherwise sampled (transformers' rule, whatever do_sample)
    max_fine_history_length: int = 512
    max_fine_input_length: int = 1024
    n_fine_codebooks: int = 8


@dataclass
class BarkGenerationConfig:
    semantic_config: BarkSemanticGenerationConfig = field(default_factory=BarkSemanticGenerationConfig)
    coarse_acoustics_config: BarkCoarseGenerationConfig = field(default_factory=BarkCoarseGenerationConfig)
    fine_acoustics_config: BarkFineGenerationConfig = field(default_factory=BarkFineGenerationConfig)
    sample_rate: int = 24_000
    codebook_size: int = 1024

    def __post_init__(self) -> None:
        self.semantic_config = _from_mapping(BarkSemanticGenerationConfig, self.semantic_config,
                                             "generation_config.semantic_config")
        self.coarse_acoustics_config = _from_mapping(BarkCoarseGenerationConfig, self.coarse_acoustics_config,
                                                     "generation_config.coarse_acoustics_config")
        self.fine_acoustics_config = _from_mapping(BarkFineGenerationConfig, self.fine_acoustics_config,
                                                   "generation_config.fine_acoustics_config")
        sem, coarse, fine = self.semantic_config, self.coarse_acoustics_config, self.fine_acoustics_config
        _check_int("generation_config.codebook_size", self.codebook_size, 1)
        _check_int("generation_config.semantic_config.max_input_semantic_length", sem.max_input_semantic_length, 1)
        _check_int("generation_config.coarse_acoustics_config.sliding_window_len", coarse.sliding_window_len, 1)
        _check_int("generation_config.coarse_acoustics_config.n_coarse_codebooks", coarse.n_coarse_codebooks, 1)
        _check_int("generation_config.fine_acoustics_config.max_fine_input_length", fine.max_fine_input_length, 1)
        _check_int("generation_config.fine_acoustics_config.max_fine_history_length", fine.max_fine_history_length, 1)
        if fine.max_fine_history_length >= fine.max_fine_input_length:
            raise ValueError(
                "generation_config.fine_acoustics_config: max_fine_history_length "
                f"({fine.max_fine_history_length}) must be < max_fine_input_length ({fine.max_fine_input_length})"
            )
        if fine.n_fine_codebooks <= coarse.n_coarse_codebooks:
            raise ValueError(
                f"generation_config: n_fine_codebooks ({fine.n_fine_codebooks}) must be > n_coarse_codebooks "
                f"({coarse.n_coarse_codebooks})"
            )

    @property
    def semantic_to_coarse_ratio(self) -> float:
        """Coarse tokens (all codebooks interleaved) per semantic token: 75 / 49.9 * 2 for Bark."""
        c, s = self.coarse_acoustics_config, self.semantic_config
        return c.coarse_rate_hz / s.semantic_rate_hz * c.n_coarse_codebooks

    @property
    def max_semantic_history(self) -> int:
        return int(math.floor(self.coarse_acoustics_config.max_coarse_history / self.semantic_to_coarse_ratio))

    @classmethod
    def from_dict(cls, data) -> BarkGenerationConfig:
        return _from_mapping(cls, data, "generation_config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# the whole model


@dataclass
class BarkConfig:
    semantic_config: BarkSemanticConfig = field(default_factory=BarkSemanticConfig)
    coarse_acoustics_config: BarkCoarseConfig = field(default_factory=BarkCoarseConfig)
    fine_acoustics_config: BarkFineConfig = field(default_factory=BarkFineConfig)
    codec_config: EncodecDecoderConfig = field(default_factory=EncodecDecoderConfig)
    generation_config: BarkGenerationConfig = field(default_factory=BarkGenerationConfig)

    def __post_init__(self) -> None:
        self.semantic_config = BarkSemanticConfig.from_dict(self.semantic_config)
        self.coarse_acoustics_config = BarkCoarseConfig.from_dict(self.coarse_acoustics_config)
        self.fine_acoustics_config = BarkFineConfig.from_dict(self.fine_acoustics_config)
        self.codec_config = EncodecDecoderConfig.from_dict(self.codec_config)
        self.generation_config = BarkGenerationConfig.from_dict(self.generation_config)
        self._check_consistency()

    def _check_consistency(self) -> None:
        gen, sem, coarse, fine = (self.generation_config, self.semantic_config, self.coarse_acoustics_config,
                                  self.fine_acoustics_config)
        g_sem, g_coarse, g_fine = gen.semantic_config, gen.coarse_acoustics_config, gen.fine_acoustics_config
        cb = gen.codebook_size
        for what, token, vocab in (
            ("semantic_config.input_vocab_size vs text_pad_token", g_sem.text_pad_token, sem.input_vocab_size),
            ("semantic_config.input_vocab_size vs semantic_infer_token", g_sem.semantic_infer_token,
             sem.input_vocab_size),
            ("semantic_config.output_vocab_size vs eos_token_id", g_sem.eos_token_id, sem.output_vocab_size),
            ("coarse_acoustics_config.input_vocab_size vs coarse_infer_token", g_coarse.coarse_infer_token,
             coarse.input_vocab_size),
            ("coarse_acoustics_config.output_vocab_size vs the last coarse code",
             g_sem.semantic_vocab_size + g_coarse.n_coarse_codebooks * cb - 1, coarse.output_vocab_size),
            ("fine_acoustics_config.input_vocab_size vs the fine pad code (codebook_size)", cb,
             fine.input_vocab_size),
        ):
            if not 0 <= token < vocab:
                raise ValueError(f"config: {what}: token id {token} does not fit a vocabulary of {vocab}")
        if fine.output_vocab_size < cb:
            raise ValueError(f"config: fine_acoustics_config.output_vocab_size ({fine.output_vocab_size}) must be >= "
                             f"codebook_size ({cb})")
        if fine.n_codes_total != g_fine.n_fine_codebooks:
            raise ValueError(f"config: fine_acoustics_config.n_codes_total ({fine.n_codes_total}) != "
                             f"generation n_fine_codebooks ({g_fine.n_fine_codebooks})")
        if g_coarse.n_coarse_codebooks < fine.n_codes_given:
            raise ValueError(f"config: n_coarse_codebooks ({g_coarse.n_coarse_codebooks}) must be >= the fine "
                             f"model's n_codes_given ({fine.n_codes_given})")
        if self.codec_config.codebook_size != cb:
            raise ValueError(f"config: codec_config.codebook_size ({self.codec_config.codebook_size}) != "
                             f"generation codebook_size ({cb})")
        if self.codec_config.num_quantizers < g_fine.n_fine_codebooks:
            raise ValueError(f"config: the codec has {self.codec_config.num_quantizers} quantizers, fewer than the "
                             f"{g_fine.n_fine_codebooks} fine codebooks")
        if fine.block_size < g_fine.max_fine_input_length:
            raise ValueError(f"config: fine_acoustics_config.block_size ({fine.block_size}) must be >= "
                             f"max_fine_input_length ({g_fine.max_fine_input_length})")

    @classmethod
    def from_dicts(cls, config: Mapping, generation_config: Mapping | None = None) -> BarkConfig:
        """From the parsed config.json (and generation_config.json, defaults when None)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict (parsed config.json), got {type(config).__name__}")
        return cls(
            semantic_config=config.get("semantic_config"),
            coarse_acoustics_config=config.get("coarse_acoustics_config"),
            fine_acoustics_config=config.get("fine_acoustics_config"),
            codec_config=config.get("codec_config") or {},
            generation_config=generation_config,
        )

    def to_dict(self) -> dict:
        return {
            "semantic_config": self.semantic_config.to_dict(),
            "coarse_acoustics_config": self.coarse_acoustics_config.to_dict(),
            "fine_acoustics_config": self.fine_acoustics_config.to_dict(),
            "codec_config": self.codec_config.to_dict(),
            "generation_config": self.generation_config.to_dict(),
        }


def _real_config(hidden_size: int, num_layers: int, num_heads: int) -> BarkConfig:
    common = dict(block_size=1024, num_layers=num_layers, num_heads=num_heads, hidden_size=hidden_size, dropout=0.0,
                  bias=False)
    return BarkConfig(
        semantic_config=BarkSemanticConfig(input_vocab_size=129_600, output_vocab_size=10_048, **common),
        coarse_acoustics_config=BarkCoarseConfig(input_vocab_size=12_096, output_vocab_size=12_096, **common),
        fine_acoustics_config=BarkFineConfig(input_vocab_size=1056, output_vocab_size=1056, n_codes_total=8,
                                             n_codes_given=1, **common),
        codec_config=EncodecDecoderConfig(),  # facebook/encodec_24khz
        generation_config=BarkGenerationConfig(),
    )


def bark_small_config() -> BarkConfig:
    """The shapes of suno/bark-small (768 wide, 12 layers, 12 heads per sub-model; EnCodec 24 kHz)."""
    return _real_config(hidden_size=768, num_layers=12, num_heads=12)


def bark_config() -> BarkConfig:
    """The shapes of suno/bark (1024 wide, 24 layers, 16 heads per sub-model; EnCodec 24 kHz)."""
    return _real_config(hidden_size=1024, num_layers=24, num_heads=16)
