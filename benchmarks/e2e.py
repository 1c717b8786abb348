"""End to end: our ``bark.BarkModel`` against transformers' ``BarkModel`` on the same random weights.

Both models are built from one configuration with Bark's real shapes (``bark.bark_small_config()`` /
``bark.bark_config()``; quick mode: a tiny configuration, labelled): transformers' model is initialised randomly (seeded)
and its state dict is copied into ours with ``bark.loading.load_state_dict_into`` (the same strict path that loads
real checkpoints). Both then generate from the same text ids with the same settings:

- greedy decoding (``do_sample=False``, transformers' Bark default) so both do the same work;
- EOS suppressed identically so every run produces exactly ``semantic_tokens`` semantic tokens and therefore the same
  number of coarse and fine frames and the same audio length (see ``EOS_METHOD``);
- no voice preset (history_prompt=None).

Per stage (semantic, coarse, fine, codec) the wall time is measured around that stage's call with the device
synchronised before and after; total, seconds per 10 s of generated audio (real-time factor x 10), tokens/s and peak
GPU memory come from the same run. Each configuration is timed once after a warm-up generation (GPU only, short).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger("benchmarks")

EOS_METHOD = (
    "Greedy decoding in both. EOS suppressed identically: both get `semantic_min_new_tokens=N, "
    "semantic_max_new_tokens=N` (transformers' MinNewTokensLength processor and ours set the EOS score (id 10_000) to "
    "-inf for the first N tokens). min_eos_p stays None; coarse and fine lengths follow from N, so both produce the "
    "same audio length (checked per run: same_audio_length_as_transformers). Stage times: transformers' sub-model "
    "generate calls timed (device synchronised around each); ours from generate's stage events (callback)."
)


@dataclass
class E2EPlan:
    label: str
    models: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    batches: tuple[int, ...]
    semantic_tokens: int
    warmup_tokens: int  # transformers: semantic tokens of the warm-up generation before each timed run (0: none)
    warmup_tokens_ours: int  # ours: the same (full length on a GPU: Triton compiles/autotunes on first use of a shape)
    text_tokens: int = 32  # non-pad text tokens per row (the rest of the 256 is padding)
    # transformers' BarkModel with bark_kernels attention (attn_implementation names), batch-1 configurations only
    hf_integration: tuple[str, ...] = ()
    # run ours before transformers (one-time costs left after warm-up then fall on ours, not on them)
    ours_first: bool = False
    # before any timed run, one short generation of each implementation with the TINY model (process-wide one-time
    # costs: lazy imports, first calls of torch ops, logits-processor setup), much cheaper than a real-size warm-up
    warmup_tiny: bool = False


def gpu_plan(quick: bool) -> E2EPlan:
    if quick:
        return E2EPlan("gpu quick: bark-small fp16 batch 1, 64 semantic tokens", ("bark-small",), (torch.float16,),
                       (1,), 64, 8, 64, hf_integration=("triton",))
    # 256 semantic tokens = 5.1 s of audio: the whole matrix fits the 8-minute budget; figures are also given per
    # 10 s of audio (measured seconds scaled by 10 / measured audio seconds).
    return E2EPlan("gpu: 256 semantic tokens (5.1 s of audio) per run", ("bark-small", "bark"),
                   (torch.float32, torch.float16, torch.bfloat16), (1, 8), 256, 16, 256, hf_integration=("triton",))


def cpu_plan(quick: bool) -> E2EPlan:
    if quick:
        return E2EPlan("cpu quick: TINY model (2 layers, 64 wide; not Bark's shapes), 8 semantic tokens", ("tiny",),
                       (torch.float32,), (1,), 8, 0, 0, ours_first=True)  # smoke test: no warm-up
    # No real-size warm-up on CPU: even 2 semantic tokens cost transformers a full 1024-frame fine window (tens of
    # seconds on 2 cores). Each implementation is warmed up with the tiny model instead, and ours runs first, so
    # whatever one-time cost remains is charged to ours, not to transformers.
    return E2EPlan("cpu: bark-small and small (4 layers, width 256) fp32 batch 1, 48 semantic tokens (1 s of audio), "
                   "same torch threads for all", ("bark-small", "small"), (torch.float32,), (1,), 48, 0, 0,
                   hf_integration=("bark_torch",), ours_first=True, warmup_tiny=True)


# ----------------------------------------------------------------------------------------------------------------------
# building the two models


def ours_available() -> str | None:
    """None when bark.BarkModel can run the benchmark, else why not."""
    try:
        import bark
    except Exception as exc:
        return f"bark.BarkModel not available (import bark failed: {type(exc).__name__}: {exc})"
    if not hasattr(bark, "BarkModel"):
        return "bark.BarkModel not available (bark has no BarkModel)"
    try:
        import bark.generation  # noqa: F401
        from bark.loading import load_state_dict_into  # noqa: F401
    except Exception as exc:
        return f"bark.BarkModel not available (generation/loading: {type(exc).__name__}: {exc})"
    return None


def transformers_available() -> str | None:
    try:
        import transformers  # noqa: F401
        from transformers import BarkModel  # noqa: F401
    except Exception as exc:
        return f"transformers' BarkModel not importable: {type(exc).__name__}: {exc}"
    return None


def bark_config_for(model: str):
    import bark

    if model == "bark-small":
        return bark.bark_small_config()
    if model == "bark":
        return bark.bark_config()
    if model == "tiny":
        return _tiny_config()
    if model == "small":
        return _small_config()
    raise ValueError(f"model: expected 'bark-small', 'bark', 'small' or 'tiny', got {model!r}")


def _small_config():
    """Bark-small with 4 layers of width 256 and 4 heads in every sub-model (real vocabularies, windows and codec): a
    model whose decode steps cost little, so per-step overhead shows."""
    import bark

    real = bark.bark_small_config().to_dict()
    for name in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config"):
        real[name].update(num_layers=4, num_heads=4, hidden_size=256)
    return bark.BarkConfig.from_dicts(real, real["generation_config"])


def _tiny_config():
    """Bark's vocabularies and token ids, 2 layers of width 64, a small codec and short fine windows (quick mode)."""
    import bark
    from bark.codec import EncodecDecoderConfig

    real = bark.bark_small_config().to_dict()
    for name in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config"):
        real[name].update(num_layers=2, num_heads=2, hidden_size=64)
    real["codec_config"] = EncodecDecoderConfig(hidden_size=32, num_filters=8,
                                                target_bandwidths=(1.5, 6.0)).to_dict()
    gen = real["generation_config"]
    gen["fine_acoustics_config"].update(max_fine_input_length=64, max_fine_history_length=32)
    return bark.BarkConfig.from_dicts(real, gen)


def _hf_config(config, attn_implementation: str):
    import transformers

    d = config.to_dict()
    codec = {k: v for k, v in d["codec_config"].items() if k != "num_quantizers"}
    return transformers.BarkConfig(semantic_config=d["semantic_config"],
                                   coarse_acoustics_config=d["coarse_acoustics_config"],
                                   fine_acoustics_config=d["fine_acoustics_config"], codec_config=codec,
                                   attn_implementation=attn_implementation)


def hf_model_for(config, device: torch.device, seed: int = 0):
    """transformers' BarkModel with the shapes of our ``config``, random weights (seeded), eval, fp32, on device,
    with its default attention (eager: Bark has no sdpa path in transformers)."""
    import transformers

    d = config.to_dict()
    hf_config = _hf_config(config, "eager")
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.BarkModel(hf_config)
    model.eval()
    # transformers' random init leaves the EnCodec codebooks at zero (the audio would ignore the tokens): random ones
    with torch.no_grad():
        for layer in model.codec_model.quantizer.layers:
            layer.codebook.embed.normal_()
    g = d["generation_config"]
    from transformers.models.bark.generation_configuration_bark import BarkGenerationConfig

    full = BarkGenerationConfig(semantic_config=g["semantic_config"], coarse_acoustics_config=g["coarse_acoustics_config"],
                                fine_acoustics_config=g["fine_acoustics_config"], sample_rate=g["sample_rate"],
                                codebook_size=g["codebook_size"])
    # BarkModel.generate reads the sub-configs as dicts, as a generation_config.json loaded from the hub gives them.
    model.generation_config = transformers.GenerationConfig(
        semantic_config=full.semantic_config.to_dict(), coarse_acoustics_config=full.coarse_acoustics_config.to_dict(),
        fine_acoustics_config=full.fine_acoustics_config.to_dict(), sample_rate=full.sample_rate,
        codebook_size=full.codebook_size)
    return model


def hf_twin(config, hf_model, device: torch.device, attn_implementation: str):
    """transformers' BarkModel with the same weights as ``hf_model`` (strict load) but ``attn_implementation`` set to
    one of bark_kernels' names (the transformers integration: what a transformers user gets by switching)."""
    import transformers

    import bark_kernels.integrations as integrations

    integrations.register_transformers()
    with torch.device(device):
        model = transformers.BarkModel(_hf_config(config, attn_implementation))
    model.load_state_dict(hf_model.state_dict(), strict=True)
    model.eval()
    model.generation_config = hf_model.generation_config
    return model


def ours_from_hf(config, hf_model, device: torch.device, attn_implementation: str = "auto"):
    """Our BarkModel with transformers' weights, loaded strictly (as from a checkpoint)."""
    import bark
    from bark.loading import load_state_dict_into

    with torch.device("meta"):
        model = bark.BarkModel(config, attn_implementation=attn_implementation)
    model = model.to_empty(device=device)
    if config.fine_acoustics_config.tie_word_embeddings:
        model.fine_acoustics.tie_weights()
    load_state_dict_into(model, hf_model.state_dict(), {})
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------------------
# timing stages


class StageClock:
    """Wall time of each stage: wraps a callable so the device is synchronised before and after it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.outputs: dict[str, object] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
            self.outputs[stage] = out
            return out

        return timed


@contextlib.contextmanager
def _patched(obj, name: str, replacement):
    """Set ``obj.name`` (an instance attribute over a method) for the duration of the block."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def generate_hf(model, input_ids, attention_mask, semantic_tokens: int, clock: StageClock):
    """transformers' own BarkModel.generate, each stage timed through its sub-model call."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(model.semantic, "generate", clock.wrap("semantic", model.semantic.generate)))
        stack.enter_context(_patched(model.coarse_acoustics, "generate",
                                     clock.wrap("coarse", model.coarse_acoustics.generate)))
        stack.enter_context(_patched(model.fine_acoustics, "generate",
                                     clock.wrap("fine", model.fine_acoustics.generate)))
        stack.enter_context(_patched(model, "codec_decode", clock.wrap("codec", model.codec_decode)))
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  semantic_min_new_tokens=semantic_tokens, semantic_max_new_tokens=semantic_tokens)


def generate_ours(model, input_ids, attention_mask, semantic_tokens: int, clock: StageClock):
    """Our BarkModel.generate with the same settings: EOS suppressed with ``semantic_min_new_tokens`` (what transformers
    gets too), each stage timed and its tokens kept through generate's stage events (``callback``)."""

    def on_event(event) -> None:
        if event.kind == "end":
            clock.seconds[event.stage] = clock.seconds.get(event.stage, 0.0) + event.seconds
            if event.output is not None:
                clock.outputs[event.stage] = event.output

    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, semantic_max_new_tokens=semantic_tokens,
                              semantic_min_new_tokens=semantic_tokens, callback=on_event)


# ----------------------------------------------------------------------------------------------------------------------
# the section


def _inputs(batch: int, text_tokens: int, device: torch.device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 119_547, (batch, 256), generator=g)  # BERT multilingual vocabulary
    attention_mask = torch.zeros(batch, 256, dtype=torch.long)
    attention_mask[:, :text_tokens] = 1
    input_ids = input_ids * attention_mask  # padding ids 0, as the processor gives them
    return input_ids.to(device), attention_mask.to(device)


def _row_length(tokens) -> int | None:
    """Tokens per row of a stage's output: a (B, n) tensor (transformers) or a list of (n_b,) tensors (ours; the
    longest row)."""
    if isinstance(tokens, torch.Tensor):
        return int(tokens.shape[-1])
    if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, torch.Tensor) for t in tokens):
        return max(int(t.shape[-1]) for t in tokens)
    return None


def _semantic_rows(tokens) -> list[list[int]] | None:
    if isinstance(tokens, torch.Tensor):
        return tokens.tolist()
    if isinstance(tokens, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in tokens):
        return [t.tolist() for t in tokens]
    return None


def _one_run(impl: str, model, batch: int, plan: E2EPlan, device: torch.device, sample_rate: int):
    """One timed generation (after the plan's warm-up); returns (figures, semantic tokens per row, wall s incl.
    warm-up)."""
    t_begin = time.perf_counter()
    input_ids, attention_mask = _inputs(batch, plan.text_tokens, device)
    hf_like = impl.startswith("transformers")
    generate = generate_hf if hf_like else generate_ours
    warmup = plan.warmup_tokens_ours if impl == "ours" or "triton" in impl else plan.warmup_tokens
    if warmup:
        generate(model, input_ids, attention_mask, warmup, StageClock(device))
    clock = StageClock(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)  # both models' weights, whatever else is alive
    t0 = time.perf_counter()
    audio = generate(model, input_ids, attention_mask, plan.semantic_tokens, clock)
    clock.sync()
    total = time.perf_counter() - t0
    if isinstance(audio, tuple):
        audio = audio[0]
    semantic = clock.outputs.get("semantic")
    coarse = clock.outputs.get("coarse")
    if isinstance(coarse, tuple):
        coarse = coarse[0]
    n_sem, n_coarse = _row_length(semantic), _row_length(coarse)
    audio_s = audio.shape[-1] / sample_rate
    f = {"total_s": {"value": total, "unit": "s"},
         "audio_seconds": {"value": audio_s, "unit": "s of audio per row (measured output length)"},
         "seconds_per_10s_audio": {"value": total * 10.0 / audio_s, "unit": "s per 10 s of audio (per row)"},
         "audio_seconds_per_second": {"value": batch * audio_s / total, "unit": "s of audio per wall s (all rows)"}}
    for stage in ("semantic", "coarse", "fine", "codec"):
        if stage in clock.seconds:
            f[f"{stage}_s"] = {"value": clock.seconds[stage], "unit": "s"}
    if n_sem is not None and "semantic_s" in f:
        f["semantic_tokens"] = {"value": n_sem, "unit": "tokens per row"}
        f["semantic_tokens_per_s"] = {"value": batch * n_sem / clock.seconds["semantic"],
                                      "unit": "tokens/s (all rows)"}
    if n_coarse is not None and "coarse_s" in f:
        f["coarse_tokens"] = {"value": n_coarse, "unit": "tokens per row (both codebooks interleaved)"}
        f["coarse_tokens_per_s"] = {"value": batch * n_coarse / clock.seconds["coarse"],
                                    "unit": "tokens/s (all rows)"}
    if device.type == "cuda":
        own = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        peak = torch.cuda.max_memory_allocated(device) - resident + own
        f["peak_gpu_memory"] = {"value": peak / 2**30,
                                "unit": "GiB (this model's weights + peak allocated during generate)"}
    return f, (_semantic_rows(semantic), audio.detach().float().cpu()), time.perf_counter() - t_begin


def _size(config) -> float:
    """A proxy for a model's cost per token: layers x hidden^2, summed over the three transformers."""
    return sum(c.num_layers * c.hidden_size ** 2 for c in (config.semantic_config, config.coarse_acoustics_config,
                                                            config.fine_acoustics_config))


def _estimate(last_wall: dict, impl: str, model_name: str, batch: int, device: torch.device, built: dict,
              semantic_tokens: int = 256) -> float:
    """Seconds the next run (warm-up included) is expected to take, from the last run of the same implementation:
    scaled by batch (linearly on a CPU, mildly on a GPU) and, for a model not run yet, by the size ratio."""
    prev = last_wall.get((impl, model_name))
    scale = 1.0
    if prev is None:
        others = [(m, v) for (i, m), v in last_wall.items() if i == impl and m in built]
        if not others:
            return first_run_estimate(built[model_name][0], batch, device, semantic_tokens)
        other, prev = others[-1]
        scale = _size(built[model_name][0]) / _size(built[other][0])
    prev_batch, prev_wall = prev
    if device.type == "cpu":
        scale *= max(1.0, batch / prev_batch)
    else:
        scale *= max(1.0, (1 + batch / 16) / (1 + prev_batch / 16))
    return prev_wall * scale


# A first run has no earlier run to scale from: assume this many seconds per decode step of a 12-layer, 768-wide model
# (semantic + coarse steps; scaled by _size), plus a fixed warm-up (first calls, Triton compiles on a GPU). Generous on
# purpose: overrunning the budget costs more than skipping a configuration.
FIRST_RUN_STEP_S = {"cuda": 4e-3, "cpu": 0.08}
FIRST_RUN_WARMUP_S = {"cuda": 30.0, "cpu": 5.0}


def first_run_estimate(config, batch: int, device: torch.device, semantic_tokens: int) -> float:
    """Seconds a first run of ``config`` is expected to take when nothing has run yet to scale from."""
    from bark.config import bark_small_config

    steps = semantic_tokens * (1 + config.generation_config.semantic_to_coarse_ratio)
    scale = _size(config) / _size(bark_small_config())
    kind = "cuda" if device.type == "cuda" else "cpu"
    per_batch = max(1.0, batch / 4) if kind == "cpu" else 1 + batch / 16
    return FIRST_RUN_WARMUP_S[kind] + steps * FIRST_RUN_STEP_S[kind] * scale * per_batch


def _attn_label(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which attention each row ran: transformers' eager, ours' automatic choice (named), or the integration's."""
    if impl == "transformers":
        return "eager (transformers' default for Bark)"
    if impl.startswith("transformers[attn="):
        return impl[len("transformers[attn="):-1] + " (bark_kernels via the transformers integration)"
    try:
        from bark_kernels import registry

        return f"auto -> {registry.select('attention', device, dtype, 64)[0]}"
    except Exception as exc:
        return f"auto (selection failed: {type(exc).__name__})"


def run_order(plan: E2EPlan) -> list[tuple[str, torch.dtype, int]]:
    """Most telling configurations first, so a budget cut drops the least telling: batch 1 of the first model in
    every dtype, batch 1 of the others in fp16 then fp32, then fp16 at larger batches, then the rest."""
    def tier(m, d, b):
        first = m == plan.models[0]
        if b == 1 and first:
            return 0
        if b == 1 and d in (torch.float16, torch.float32):
            return 1
        if d == torch.float16:
            return 2
        return 3

    items = [(m, d, b) for m in plan.models for d in plan.dtypes for b in plan.batches]
    return sorted(items, key=lambda x: (tier(*x), plan.models.index(x[0]), x[2], plan.dtypes.index(x[1])))


def run_e2e(device: torch.device, quick: bool, budget, progress=None, on_update=None) -> dict:
    """Run the end-to-end plan for ``device``; returns {"status", "reason"?, "plan", "method", "runs": [...]}.
    ``on_update(result)`` is called after every run (the caller writes its tables: a cut run keeps what it measured)."""
    plan = gpu_plan(quick) if device.type == "cuda" else cpu_plan(quick)
    result = {"status": "ok", "plan": plan.label, "method": EOS_METHOD, "runs": [],
              "torch_threads": torch.get_num_threads()}
    reason = transformers_available()
    if reason:
        return dict(result, status="skipped", reason=reason)
    import transformers

    transformers.logging.set_verbosity_error()  # its per-call deprecation notices about generation kwargs
    ours_reason = ours_available()
    if ours_reason is None:
        result["ours_eos_suppression"] = "semantic_min_new_tokens (as for transformers)"
    runs = result["runs"]
    last_wall: dict[tuple[str, str], tuple[int, float]] = {}  # (impl, model) -> (batch, wall s incl. warm-up)
    built: dict[str, list] = {}  # model -> [config, hf, ours, dtype]
    build_errors: dict[str, str] = {}
    if plan.warmup_tiny:
        try:
            t0 = time.perf_counter()
            tiny = _tiny_config()
            tiny_hf = hf_model_for(tiny, device)
            tiny_models = [("transformers", tiny_hf)]
            if ours_reason is None:
                tiny_models.append(("ours", ours_from_hf(tiny, tiny_hf, device)))
            for impl_name in plan.hf_integration:
                tiny_models.append((f"transformers[attn={impl_name}]", hf_twin(tiny, tiny_hf, device, impl_name)))
            ids, mask = _inputs(1, plan.text_tokens, device)
            for impl, m in tiny_models:
                (generate_ours if impl == "ours" else generate_hf)(m, ids, mask, 2, StageClock(device))
            result["warmup"] = f"each implementation generated 2 tokens with the tiny model first ({time.perf_counter() - t0:.1f} s, not timed)"
            del tiny_models, tiny_hf
        except Exception as exc:
            result["warmup"] = f"tiny warm-up failed: {type(exc).__name__}: {str(exc)[:200]}"
    order = run_order(plan)
    for model_name, dtype, batch in (progress(order, desc="e2e") if progress else order):
        params = {"model": model_name, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                  "semantic_tokens": plan.semantic_tokens}
        if model_name not in built and model_name not in build_errors and budget.left() < 5.0:
            # building real-size models takes seconds and memory that no run could use any more
            for impl in ("transformers", "ours"):
                runs.append({"section": "e2e", "provider": impl, "params": params, "figures": {},
                             "status": "skipped", "reason": f"time budget: {budget.left():.0f} s left, the models "
                                                           f"of {model_name} were not built"})
            continue
        if model_name not in built and model_name not in build_errors:
            try:
                config = bark_config_for(model_name)
                hf = hf_model_for(config, device)
                ours = ours_from_hf(config, hf, device) if ours_reason is None else None
                built[model_name] = [config, hf, ours, torch.float32, {}]
            except Exception as exc:
                build_errors[model_name] = f"building the models failed: {type(exc).__name__}: {str(exc)[:300]}"
                logger.warning("e2e %s: %s", model_name, build_errors[model_name])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if model_name in build_errors:
            for impl in ("transformers", "ours"):
                runs.append({"section": "e2e", "provider": impl, "params": params, "figures": {},
                             "status": "failed", "reason": build_errors[model_name]})
            continue
        config, hf, ours, current, twins = built[model_name]
        if current != dtype:  # all models converted the same way, so their weights stay identical
            for m in [hf, ours, *twins.values()]:
                if not isinstance(m, str) and m is not None:
                    m.to(dtype)
            built[model_name][3] = dtype
        candidates = [("ours", ours), ("transformers", hf)] if plan.ours_first else [("transformers", hf), ("ours", ours)]
        if batch == 1:
            for impl_name in plan.hf_integration:
                if impl_name not in twins:
                    try:
                        twins[impl_name] = hf_twin(config, hf, device, impl_name).to(dtype)
                    except Exception as exc:
                        twins[impl_name] = f"building it failed: {type(exc).__name__}: {str(exc)[:300]}"
                candidates.append((f"transformers[attn={impl_name}]", twins[impl_name]))
        pair, tokens = {}, {}
        for impl, model in candidates:
            rec = {"section": "e2e", "provider": impl, "params": dict(params, attn_implementation=_attn_label(impl, device,
                                                                                                        dtype)),
                   "figures": {}}
            runs.append(rec)
            if model is None or isinstance(model, str):
                rec.update(status="skipped" if model is None else "failed", reason=model or ours_reason)
                continue
            estimate = _estimate(last_wall, impl, model_name, batch, device, built, plan.semantic_tokens)
            if budget.left() < max(5.0, 1.2 * estimate):
                rec.update(status="skipped", reason=f"time budget: {budget.left():.0f} s left, a run of this "
                                                    f"configuration is estimated at {estimate:.0f} s")
                continue
            try:
                figs, tokens[impl], wall = _one_run(impl, model, batch, plan, device,
                                                    config.generation_config.sample_rate)
            except Exception as exc:
                rec.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                logger.warning("e2e %s %s failed: %s", impl, params, rec["reason"])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            rec.update(status="ok", figures=figs)
            last_wall[(impl, model_name)] = (batch, wall)
            pair[impl] = rec
            if on_update is not None:
                on_update(result)
        if "transformers" in pair:
            t = pair["transformers"]["figures"]
            sem_t, audio_t = tokens["transformers"]
            for impl, rec in pair.items():
                if impl == "transformers":
                    continue
                o = rec["figures"]
                o["speedup_vs_transformers"] = {"value": t["total_s"]["value"] / o["total_s"]["value"],
                                                "unit": "x (transformers eager total s / this, same dtype and batch)"}
                same = abs(o["audio_seconds"]["value"] - t["audio_seconds"]["value"]) < 1e-9
                o["same_audio_length_as_transformers"] = {"value": same, "unit": "bool"}
                sem_o, audio_o = tokens[impl]
                if sem_o is not None and sem_t is not None:
                    o["same_semantic_tokens_as_transformers"] = {
                        "value": sem_o == sem_t,
                        "unit": "bool (greedy; may differ in fp16/bf16 where rounding differs)"}
                if audio_o.shape == audio_t.shape:
                    o["audio_max_abs_diff_vs_transformers"] = {
                        "value": float((audio_o - audio_t).abs().max()) if audio_o.numel() else 0.0,
                        "unit": f"abs (waveform; transformers' peak |audio| is {float(audio_t.abs().max()):.3g})"}
    # speedup against transformers as users run it by default: fp32, same model and batch
    by = {(r["provider"], r["params"]["model"], r["params"]["dtype"], r["params"]["batch"]): r
          for r in runs if r.get("status") == "ok"}
    for r in runs:
        if r["provider"] != "transformers" and r.get("status") == "ok":
            base = by.get(("transformers", r["params"]["model"], "float32", r["params"]["batch"]))
            if base is not None:
                r["figures"]["speedup_vs_transformers_fp32"] = {
                    "value": base["figures"]["total_s"]["value"] / r["figures"]["total_s"]["value"],
                    "unit": "x (transformers fp32 eager total s / this, same batch)"}
    if not any(r.get("status") == "ok" for r in runs):
        result["status"] = "skipped" if all(r.get("status") == "skipped" for r in runs) else "failed"
        result["reason"] = "; ".join(sorted({r.get("reason", "") for r in runs})) or "no runs"
    elif ours_reason:
        result["note"] = f"ours: {ours_reason}; transformers measured alone"
    return result
