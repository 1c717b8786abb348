"""The whole Bark text-to-speech model: semantic -> coarse -> fine -> EnCodec decoder, built from a config or loaded
from a Hugging Face checkpoint (:meth:`BarkModel.from_pretrained`).

Layout (imports point down): bark.config (a leaf) <- bark.layers <- bark.model_causal, bark.model_fine <- bark.model
(with bark.codec, bark.loading's checkpoint reading and bark.generation) <- bark.longform, bark.cli. docs/layout.md
maps the whole project.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bark_kernels.devices import parse_device

from .codec import EncodecDecoder
from .config import BarkConfig, attn_backend_name, bark_small_config
from .generation import generate as _generate
from .layers import BarkBlock, BarkMLP, BarkSelfAttention, check_backend, set_attn_implementation
from .loading import list_keys, load_checkpoint, load_state_dict_into, parse_dtype
from .model_causal import BarkCausalModel
from .model_fine import BarkFineModel

__all__ = ["BarkModel", "BarkBlock", "BarkCausalModel", "BarkFineModel", "BarkSelfAttention", "BarkMLP",
           "check_backend", "load_bark_model"]

logger = logging.getLogger(__name__)


class BarkModel(nn.Module):
    """The whole Bark text-to-speech model: semantic -> coarse -> fine -> EnCodec decoder.

    Sub-module names equal the checkpoint's top-level prefixes (``semantic``, ``coarse_acoustics``,
    ``fine_acoustics``, ``codec_model``). ``attn_implementation`` picks the bark_kernels backend for every attention
    call: "auto" (the dispatcher's choice), "triton", "cuda", "flash_attention_2", "sdpa" or "eager".
    """

    def __init__(self, config=None, attn_implementation: str = "auto") -> None:
        super().__init__()
        if config is None:
            config = bark_small_config()
        if not isinstance(config, BarkConfig):
            raise TypeError(f"config: expected a bark.BarkConfig (e.g. bark.bark_small_config()), "
                            f"got {type(config).__name__}")
        self.config = config
        self.semantic = BarkCausalModel(config.semantic_config)
        self.coarse_acoustics = BarkCausalModel(config.coarse_acoustics_config)
        self.fine_acoustics = BarkFineModel(config.fine_acoustics_config)
        self.codec_model = EncodecDecoder(config.codec_config)
        self.generation_config = config.generation_config
        self._attn_implementation = "auto"
        self.attn_implementation = attn_implementation
        self.eval()

    @property
    def attn_implementation(self) -> str:
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        set_attn_implementation([self.semantic, self.coarse_acoustics, self.fine_acoustics], value)
        self._attn_implementation = value

    @property
    def attn_backend(self) -> str | None:
        """The bark_kernels backend name passed to every attention call (None: automatic)."""
        return self.semantic.attn_backend

    @property
    def device(self) -> torch.device:
        return self.semantic.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.semantic.lm_head.weight.dtype

    @property
    def sampling_rate(self) -> int:
        return self.generation_config.sample_rate

    @classmethod
    def from_pretrained(cls, path_or_repo_id, attn_implementation: str = "auto", dtype=None, device=None,
                        revision: str | None = None, codec=None) -> BarkModel:
        """Load a Hugging Face Bark checkpoint (directory or repo id) or suno's original files (a directory holding
        text_2.pt, coarse_2.pt, fine_2.pt or bark-small's text.pt, coarse.pt, fine.pt; or those three paths in a
        list; ``codec``: where their codec comes from, see bark.loading); see :func:`load_bark_model`."""
        return load_bark_model(path_or_repo_id, attn_implementation=attn_implementation, dtype=dtype, device=device,
                               revision=revision, codec=codec)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, history_prompt=None,
                 return_output_lengths: bool = False, **kwargs):
        """Text ids -> 24 kHz audio, as transformers' ``BarkModel.generate``; see :func:`bark.generation.generate`."""
        return _generate(self, input_ids, attention_mask=attention_mask, history_prompt=history_prompt,
                        return_output_lengths=return_output_lengths, **kwargs)


_INIT_OPS = frozenset((torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
                       nn.init.normal_, nn.init.uniform_, nn.init.zeros_, nn.init.ones_, nn.init.constant_,
                       nn.init.trunc_normal_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_,
                       nn.init.xavier_uniform_, nn.init.xavier_normal_))


class _SkipMetaInit(TorchFunctionMode):
    """The modules' initialisers skipped on meta tensors while a model is built for a checkpoint to fill: they have no
    values to set, and ``normal_`` on a meta tensor runs a Python reference that imports torch._dynamo (1.4 s, the
    first time in a process: most of a bulk worker's or ``speak``'s model load). A torch function mode is this
    thread's alone: a model built at the same time in another thread is initialised as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INIT_OPS:
            tensor = args[0] if args else (kwargs or {}).get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **(kwargs or {}))


def load_bark_model(path_or_repo_id, attn_implementation: str = "auto", dtype=None, device=None,
                    revision: str | None = None, codec=None):
    """Build a ``BarkModel`` from a checkpoint directory or repo id, on ``device`` in ``dtype`` (default fp32).

    Every argument is checked before a file is read (device: cpu, cuda or cuda:N, present), and every weight is
    checked as it is read (names, shapes, dtypes, finite values)."""
    target_dtype = parse_dtype(dtype)
    # Resolve the backend (and let bark_kernels import/self-test its backends) outside the meta-device block below.
    check_backend(attn_backend_name(attn_implementation))
    target_device = parse_device(device, "device") if device is not None else torch.device("cpu")
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision: expected a str (a branch, tag or commit of the Hugging Face repo) or None, "
                        f"got {type(revision).__name__}")
    config, tensors, origin = load_checkpoint(path_or_repo_id, revision, codec)
    with torch.device("meta"), _SkipMetaInit():
        model = BarkModel(config, attn_implementation=attn_implementation)
    model = model.to_empty(device=target_device)
    model.fine_acoustics.tie_weights() if config.fine_acoustics_config.tie_word_embeddings else None
    ignored = load_state_dict_into(model, tensors, origin)
    if ignored:
        logger.info("ignored %d checkpoint keys by design (mask buffers, tied heads, codec encoder): %s",
                    len(ignored), list_keys(ignored, 4))
    model = model.to(dtype=target_dtype)
    model.eval()
    return model
