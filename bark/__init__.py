"""bark: the Bark text-to-speech model (suno/bark, suno/bark-small) on the bark_kernels attention dispatcher.

    import bark
    model = bark.BarkModel.from_pretrained("suno/bark-small", attn_implementation="triton")
    processor = bark.BarkProcessor.from_pretrained("suno/bark-small")
    inputs = processor("Hello there", voice_preset="v2/en_speaker_6")
    audio = model.generate(**inputs)                      # (batch, samples) at 24 kHz

A model with the real shapes and random weights: ``bark.BarkModel(bark.bark_small_config())``.

Text of any length in one voice (split into sentences, generated in ragged batches, joined; bark.longform)::

    audio = bark.synthesize(model, long_text, processor=processor, voice="v2/en_speaker_6")   # float32, 24 kHz
    for piece in bark.stream(model, long_text, processor=processor):                          # piece by piece
        ...

One model, many callers (bark.engine): requests in, pieces out, batched across callers::

    engine = bark.Engine(model, processor, max_batch=8)      # or bark.Engine.from_options(bark.EngineOptions(...))
    for piece in engine.submit(bark.SpeechRequest(long_text, voice="v2/en_speaker_6")):
        ...
"""

from .config import (
    BarkCoarseConfig,
    BarkConfig,
    BarkFineConfig,
    BarkGenerationConfig,
    BarkSemanticConfig,
    bark_config,
    bark_small_config,
)
from .generation import StageEvent
from .engine import Engine, EngineClosedError, QueueFullError, RequestCancelled, RequestHandle, SpeechRequest
from .options import EngineOptions, OptionError
from .longform import SpeechPiece, stream, synthesize
from .model import BarkModel

try:  # the processor is optional at import time (it needs the tokenizers library)
    from .processor import BarkProcessor
except ImportError as _error:  # pragma: no cover - only without the optional dependency
    _processor_error = _error

    class BarkProcessor:  # type: ignore[no-redef]
        """Placeholder: bark.processor could not be imported."""

        def __init__(self, *args, **kwargs):
            raise ImportError(f"bark.BarkProcessor is unavailable: {_processor_error}")

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ImportError(f"bark.BarkProcessor is unavailable: {_processor_error}")


__all__ = [
    "BarkModel",
    "StageEvent",
    "BarkProcessor",
    "BarkConfig",
    "BarkSemanticConfig",
    "BarkCoarseConfig",
    "BarkFineConfig",
    "BarkGenerationConfig",
    "bark_small_config",
    "bark_config",
    "synthesize",
    "stream",
    "SpeechPiece",
    "Engine",
    "SpeechRequest",
    "RequestHandle",
    "QueueFullError",
    "EngineClosedError",
    "RequestCancelled",
    "EngineOptions",
    "OptionError",
]
