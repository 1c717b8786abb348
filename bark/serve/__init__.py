"""bark's speech server: an OpenAI-compatible ``/v1/audio/speech`` over :class:`bark.Engine`, streamed sentence by
sentence, with the requests of all clients batched by the engine (bark.serve.app; docs/serve.md). Needs the extra
``bark-kernels[serve]`` (FastAPI, uvicorn; soundfile for flac/mp3/opus). Run it with ``bark-kernels serve``."""

from .app import MAX_INPUT_CHARS, MODEL_ALIASES, ServeSettings, create_app

__all__ = ["create_app", "ServeSettings", "MAX_INPUT_CHARS", "MODEL_ALIASES"]
