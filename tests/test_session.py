"""bark.session: prepared decode sessions. A whole step (layers, logits processing, sampling, finished mask) traces
with torch.compile(fullgraph=True) and gives the eager tokens; a step reads nothing back from the device, makes no
per-layer dispatch (the attention op is called directly, once per layer); modes and stage events."""

from __future__ import annotations

import copy

import pytest
import torch

import bark
import bark_kernels as bk
from bark import session as bark_session
from bark.generation import SamplingParams, _SemanticHead, _TokenRecord, generate_tokens
from bark_kernels import registry

transformers = pytest.importorskip("transformers")
import bark_tiny  # noqa: E402

CPU_BACKENDS = [n for n in ("eager", "sdpa")
                if registry.why_not(n, "attention_with_kvcache", torch.device("cpu"), torch.float32, 16) is None]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bark_session")
    bark_tiny.save_tiny_bark(path, seed=3, hidden_size=32, num_layers=2, num_heads=2)
    return bark.BarkModel.from_pretrained(path, attn_implementation="eager")


def _semantic_session(model, batch, mode, backend, params=SamplingParams(), generator=None, min_eos_p=None, **kw):
    """A semantic-stage session with its head, as generate_semantic builds it."""
    semantic = model.semantic
    semantic.attn_backend = backend
    gen = model.generation_config
    record = _TokenRecord(batch, 16, gen.semantic_config.semantic_pad_token, model.device)
    head = _SemanticHead(semantic, record, gen, params, min_eos_p, 0, generator)
    session = bark_session.DecodeSession(semantic, batch, 40, [head], mode, generators=[generator], **kw)
    embeds = torch.randn(batch, 9, semantic.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return session, record, embeds


def _run(session, embeds, steps):
    session.prefill(embeds)
    for _ in range(steps):
        session.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_whole_step_traces_fullgraph_and_gives_the_eager_tokens(model, backend):
    """torch.compile(fullgraph=True) of a whole step (aot_eager: the same tracing and functionalization as inductor,
    without its C++ build): no graph break, and the same tokens as eager, greedy and seeded sampling, under both
    recipes (suno's: its top-p, temperature and EOS rule at min_eos_p 0.2)."""
    try:
        for params in (SamplingParams(), SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
                       SamplingParams(True, 0.7, 20, 0.9, "suno")):
            runs = {}
            for mode in ("eager", "compile"):
                gen = torch.Generator().manual_seed(11) if params.do_sample else None
                session, record, embeds = _semantic_session(model, 2, mode, backend, params, gen,
                                                            0.2 if params.recipe == "suno" else None,
                                                            compile_backend="aot_eager")
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                _run(session, embeds, 11)  # more steps than dynamo's recompile limit (8)
                if mode == "compile":  # compiled once: nothing in the step guards on a value that changes per step
                    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
                runs[mode] = record.tokens.clone()
            assert torch.equal(runs["eager"], runs["compile"]), (params, runs)
            assert (runs["eager"][:, :8] != model.generation_config.semantic_config.semantic_pad_token).any()
    finally:
        model.semantic.attn_backend = "eager"


@pytest.mark.slow
def test_generate_with_inductor_compiled_steps_gives_the_eager_tokens(model):
    """The real thing on CPU: every stage's steps through inductor (C++ codegen: about a minute)."""
    ids, mask = bark_tiny.random_text_ids(2, [12, 30], seed=1)
    presets = [bark_tiny.as_torch_preset(bark_tiny.random_voice_preset(0)), None]
    model.attn_implementation = "sdpa"
    try:
        ref = generate_tokens(model, ids, mask, history_prompt=presets, semantic_max_new_tokens=20,
                              decode_mode="eager")
        out = generate_tokens(model, ids, mask, history_prompt=presets, semantic_max_new_tokens=20,
                              decode_mode="compile")
    finally:
        model.attn_implementation = "eager"
    for stage in ("semantic", "coarse", "fine"):
        for a, b in zip(ref[stage], out[stage], strict=True):
            assert torch.equal(a, b), stage


@pytest.mark.parametrize("recipe", ["transformers", "suno"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_step_reads_nothing_back_and_calls_the_op_once_per_layer(model, backend, recipe, monkeypatch):
    """No .item()/.tolist()/bool()/int() inside a step; no registry lookup or public-API validation; the resolved
    attention op called exactly num_layers times per step. Under both recipes (suno's: sampled, top-p, EOS rule)."""
    from bark_kernels import interface
    from bark_kernels.backends import _common

    # the sdpa/eager ops trim the cache with a read of CPU lengths; on a device they use the whole cache (no read):
    # take that path here so that any other read fails the test
    monkeypatch.setattr(_common, "used_cache_length", lambda cache_seqlens, seqlen_new, max_seqlen: max_seqlen)
    try:
        params, gen = SamplingParams(), None
        if recipe == "suno":
            params, gen = SamplingParams(True, 0.7, None, 0.9, "suno"), torch.Generator().manual_seed(0)
        session, record, embeds = _semantic_session(model, 2, "compile", backend, params, gen,
                                                    0.2 if recipe == "suno" else None, compile_backend="eager")
        session.mode = "eager"  # the device-lengths step, called directly (the one CUDA captures)
        session.prefill(embeds)
        calls = {"op": 0}
        real_op = session._op

        def counting_op(*args):
            calls["op"] += 1
            return real_op(*args)

        session._op = counting_op

        def no_dispatch(*args, **kwargs):
            raise AssertionError("registry/public API called inside a step")

        monkeypatch.setattr(registry, "select", no_dispatch)
        for name in ("attention", "attention_with_kvcache", "attention_varlen"):
            monkeypatch.setattr(interface, name, no_dispatch)
            monkeypatch.setattr(bk, name, no_dispatch)
        with bark_session.no_host_reads():
            for _ in range(3):
                session.step()
        assert calls["op"] == 3 * model.semantic.config.num_layers
    finally:
        model.semantic.attn_backend = "eager"
    assert session.cache.host_seqlens == [12, 12] and session.cache.seqlens.tolist() == [12, 12]
    assert record.col.item() == 4


def test_host_lengths_path_equals_the_device_path(model):
    """CPU + sdpa in eager mode attends with host-known lengths (cache slices, one mask per step); it must give the
    tokens of the static device-lengths path, also for ragged rows (varlen prefill)."""
    semantic = model.semantic
    out = {}
    for host in (True, False):
        session, record, _ = _semantic_session(model, 3, "eager", "sdpa")
        assert session.host_lengths and session.cache.heads_first
        session._set_host_lengths(host)  # the device path on its own (B, S, H, D) cache
        assert session.cache.heads_first == host
        g = torch.Generator().manual_seed(2)
        ragged = [torch.randn(n, semantic.config.hidden_size, generator=g) for n in (4, 9, 6)]
        session.prefill(ragged)
        for _ in range(6):
            session.step()
        out[host] = record.tokens.clone()
    semantic.attn_backend = "eager"
    assert torch.equal(out[True], out[False])


def test_rows_not_live_skip_attention_and_live_rows_are_unchanged(model):
    """Host mode: rows left out by set_live get no attention (their tokens are garbage, thrown away by the stages);
    the live rows' tokens are those of a run where every row is live. Prefill is row by row, as each row alone."""
    semantic = model.semantic
    try:
        tokens = {}
        for live in (None, [0, 2]):
            session, record, embeds = _semantic_session(model, 3, "eager", "sdpa")
            assert session.host_lengths
            session.prefill(embeds)
            session.set_live(live)
            for _ in range(5):
                session.step()
            tokens[live is None] = record.tokens.clone()
            assert session.cache.host_seqlens == [14] * 3
        assert torch.equal(tokens[True][[0, 2]], tokens[False][[0, 2]])
        cache = semantic.new_cache(2, 12)
        ragged = [torch.randn(n, semantic.config.hidden_size, generator=torch.Generator().manual_seed(n))
                  for n in (5, 9)]
        rows = semantic.prefill_rows(ragged, cache)
        assert cache.host_seqlens == [5, 9]
        for b, e in enumerate(ragged):
            alone = semantic.new_cache(1, 12)
            assert torch.equal(rows[b], semantic.prefill(e[None], alone)[0])
            n = e.shape[0]
            assert torch.equal(cache.k[:, b, :n], alone.k[:, 0, :n])
            assert torch.equal(cache.v[:, b, :n], alone.v[:, 0, :n])
    finally:
        semantic.attn_backend = "eager"


def test_modes_and_their_errors(model):
    assert bark_session.resolve_mode("auto", torch.device("cpu")) == "eager"
    assert bark_session.resolve_mode("compile", torch.device("cpu")) == "compile"
    with pytest.raises(ValueError, match="'graph' captures CUDA graphs and needs a CUDA device"):
        bark_session.resolve_mode("graph", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"decode_mode: expected one of \['auto', 'eager', 'graph', 'compile', 'fused'\]"):
        model.generate(torch.ones(1, 4, dtype=torch.long), decode_mode="fast")
    with pytest.raises(TypeError, match="callback: expected a callable"):
        model.generate(torch.ones(1, 4, dtype=torch.long), callback=3)
    with pytest.raises(ValueError, match="max_seqlen: 5000 positions exceed the model's block_size"):
        bark_session.DecodeSession(model.semantic, 1, 5000, [lambda h: h[:, 0].long()])


def test_min_new_tokens_blocks_eos_until_reached(model):
    """semantic_min_new_tokens (transformers' MinNewTokensLength): with EOS the best token at every step, the head
    picks EOS only from step min_new_tokens on; through generate, no row stops before it."""
    semantic = model.semantic
    gen = model.generation_config
    eos = gen.semantic_config.eos_token_id
    hidden = torch.randn(2, semantic.config.hidden_size, generator=torch.Generator().manual_seed(1))
    weight = torch.zeros_like(semantic.lm_head.weight)
    weight[eos] = hidden.mean(0) * 100  # EOS scores far above the rest (all 0)
    weight[5] = hidden.mean(0) * 50  # the runner-up

    class Stub:  # the semantic model as the head sees it
        lm_head = semantic.lm_head

        @staticmethod
        def lm_logits(h, start, stop):
            return torch.nn.functional.linear(h, weight[start:stop])

    for min_new, expect in ((0, 0), (3, 3)):
        record = _TokenRecord(2, 8, gen.semantic_config.semantic_pad_token, model.device)
        head = _SemanticHead(semantic, record, gen, SamplingParams(), None, min_new, None)
        head.model = Stub()
        picked = [head(hidden).tolist() for _ in range(5)]
        first_eos = next(i for i, p in enumerate(picked) if p == [eos, eos])
        assert first_eos == expect and all(p == [5, 5] for p in picked[:first_eos]), picked
    # through generate: an EOS-steered model stops early; with min_new_tokens no row is shorter than it
    weight = semantic.lm_head.weight
    saved = weight[eos].clone()
    ids, mask = bark_tiny.random_text_ids(3, [5, 20, 40], seed=2)
    try:
        with torch.no_grad():
            weight[eos] = 6.0 * torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)) * weight.std()
        free = [t.shape[0] for t in generate_tokens(model, ids, mask, semantic_max_new_tokens=30)["semantic"]]
        held = [t.shape[0] for t in generate_tokens(model, ids, mask, semantic_max_new_tokens=30,
                                                     semantic_min_new_tokens=8)["semantic"]]
    finally:
        with torch.no_grad():
            weight[eos] = saved
    assert min(free) < 8 and min(held) >= 8, (free, held)
    with pytest.raises(ValueError, match="semantic_min_new_tokens: expected an int >= 0"):
        generate_tokens(model, ids, mask, semantic_min_new_tokens=-1)


def test_stage_events_report_every_stage_in_order(model):
    events = []
    ids, mask = bark_tiny.random_text_ids(2, [12, 30], seed=1)
    audio = model.generate(ids, attention_mask=mask, semantic_max_new_tokens=20, sync_every=4,
                           callback=events.append)
    stages = [e.stage for e in events if e.kind == "start"]
    assert stages == ["semantic", "coarse", "fine", "codec"]
    for stage in stages:
        mine = [e for e in events if e.stage == stage]
        assert mine[0].kind == "start" and mine[-1].kind == "end"
        assert all(e.kind == "progress" for e in mine[1:-1])
        done = [e.done for e in mine]
        assert done == sorted(done) and mine[-1].done > 0, (stage, done)
        assert mine[-1].seconds >= 0 and mine[0].rows == 2
    semantic = [e for e in events if e.stage == "semantic"]
    assert semantic[0].total == 20 and [e.done for e in semantic[1:-1]] == [4, 8, 12, 16][: len(semantic) - 2]
    assert audio.shape[0] == 2


# ----------------------------------------------------------------------------------------------------------------------
# GPU: captured steps


def _cuda_decode_backends(dtype=torch.float32):
    device = torch.device("cuda")
    return [n for n in bk.available_backends()
            if registry.why_not(n, "attention_with_kvcache", device, dtype, 16) is None]


@pytest.fixture(scope="module")
def cuda_model(model):
    return copy.deepcopy(model).to("cuda")


@pytest.mark.gpu
def test_graph_replay_gives_the_eager_tokens(cuda_model, caplog):
    """decode_mode='graph' (every step a CUDA-graph replay) gives exactly the tokens of the eager session, for every
    backend that serves the decode op on CUDA, greedy and seeded sampling; no capture falls back."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ids, mask = bark_tiny.random_text_ids(2, [12, 30], seed=1)
    presets = [bark_tiny.as_torch_preset(bark_tiny.random_voice_preset(0)), None]
    ids, mask = ids.cuda(), mask.cuda()
    half = copy.deepcopy(cuda_model).half()
    for model, dtype in ((cuda_model, torch.float32), (half, torch.float16)):
        names = _cuda_decode_backends(dtype)
        assert names, f"no backend serves the {dtype} decode op on CUDA"
        for name in names:
            model.attn_implementation = {"flash_attn": "flash_attention_2"}.get(name, name)
            for kwargs in (dict(do_sample=False), dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.95)):
                out = {}
                for mode in ("eager", "graph"):
                    gen = torch.Generator("cuda").manual_seed(3) if kwargs["do_sample"] else None
                    with caplog.at_level("WARNING", logger="bark"):
                        out[mode] = generate_tokens(model, ids, mask, history_prompt=presets, generator=gen,
                                                    semantic_max_new_tokens=24, decode_mode=mode, **kwargs)
                assert "capture" not in caplog.text, caplog.text
                for stage in ("semantic", "coarse", "fine"):
                    for b in range(2):
                        assert torch.equal(out["eager"][stage][b], out["graph"][stage][b]), \
                            (name, dtype, kwargs, stage, b)
    cuda_model.attn_implementation = "eager"


@pytest.mark.gpu
def test_inductor_compiled_and_captured_step_gives_the_eager_tokens(cuda_model):
    """decode_mode='compile' on CUDA: the step through inductor, then captured; the same greedy tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ids, mask = bark_tiny.random_text_ids(1, [20], seed=4)
    ids, mask = ids.cuda(), mask.cuda()
    cuda_model.attn_implementation = "triton" if "triton" in _cuda_decode_backends() else "sdpa"
    try:
        ref = generate_tokens(cuda_model, ids, mask, semantic_max_new_tokens=16, decode_mode="eager")
        out = generate_tokens(cuda_model, ids, mask, semantic_max_new_tokens=16, decode_mode="compile")
    finally:
        cuda_model.attn_implementation = "eager"
    for stage in ("semantic", "coarse", "fine"):
        assert torch.equal(ref[stage][0], out[stage][0]), stage


@pytest.mark.gpu
def test_replayed_steps_do_not_synchronize(cuda_model):
    """Replays of a captured step under torch's sync debug mode 'error': nothing in a step waits for the device."""
    for name in _cuda_decode_backends():
        session, record, embeds = _semantic_session(cuda_model, 2, "graph", name)
        session.prefill(embeds.cuda())
        assert session.fallback is None, session.fallback
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                session.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert session.cache.seqlens.tolist() == [14, 14], name
        assert record.col.item() == 6, name
    cuda_model.semantic.attn_backend = "eager"


def test_sessions_are_reused_by_later_calls_with_the_same_shapes(model):
    """A second generate with the same shapes and settings reuses the semantic and coarse sessions (their caches,
    compiled code and captured graphs); other settings get their own; the pool per model stays bounded."""
    from bark.session import _POOLS, POOL_SIZE

    _POOLS.pop(model.semantic, None)
    _POOLS.pop(model.coarse_acoustics, None)
    ids, mask = bark_tiny.random_text_ids(2, [12, 30], seed=1)
    first = generate_tokens(model, ids, mask, semantic_max_new_tokens=10)
    sessions = list(_POOLS[model.semantic].values())
    assert len(sessions) == 1 and len(_POOLS[model.coarse_acoustics]) == 1
    again = generate_tokens(model, ids, mask, semantic_max_new_tokens=10)
    assert list(_POOLS[model.semantic].values()) == sessions
    for stage in ("semantic", "coarse", "fine"):
        for a, b in zip(first[stage], again[stage], strict=True):
            assert torch.equal(a, b), stage  # a reused session starts clean
    for n in range(POOL_SIZE + 2):
        generate_tokens(model, ids[:1], mask[:1], semantic_max_new_tokens=4 + n)
    assert len(_POOLS[model.semantic]) == POOL_SIZE
