"""The fused decode step (bark.session mode 'fused', bark_kernels.backends.triton.decode) under Triton's interpreter:

- the device work of one step of ``generate(..., decode_mode="fused")``: Triton launches + torch ops that would launch
  a kernel on a GPU (views and allocations aside), counted on real 12- and 24-layer models: 5 per layer, <= 4 else;
- greedy tokens equal the eager session's (semantic and coarse heads, fp32, bark-small widths: batch 1, 3 ragged
  rows, 8), each row equals that row decoded alone, the split-K combine inside the attention launch included;
  seeded sampling draws the eager session's tokens; a head without a fused form runs after the fused layers;
- each kernel in fp16/bf16 within the tolerance table (bark_kernels.testing) of an eager torch computation;
- the fused step traces with torch.compile(fullgraph=True) and reads nothing back from the device.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn import functional as F

import bark
from bark import session as bark_session
from bark.config import BarkSubModelConfig
from bark.generation import SamplingParams, _CoarseHead, _SemanticHead, _TokenRecord, generate_tokens
from bark.model_causal import BarkCausalModel
from bark_kernels.backends.triton import _env
from bark_kernels.testing import assert_close_to_reference

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.skipif(not _env.interpreter_enabled() and not torch.cuda.is_available(),
                                 reason="the fused kernels need CUDA or Triton's interpreter")]
if not _env.interpreter_enabled():  # on a GPU machine these are GPU tests (the GPU command runs them first)
    pytestmark.append(pytest.mark.gpu)
import bark_tiny  # noqa: E402

decode = pytest.importorskip("bark_kernels.backends.triton.decode")

# CPU under Triton's interpreter (CI); on a GPU machine (interpreter off) the same tests run on CUDA, where the fused
# step is captured as a CUDA graph
DEVICE = torch.device("cpu" if _env.interpreter_enabled() else "cuda")
WIDTH, HEADS = 128, 2  # head_dim 64 as Bark's; the interpreter's cost grows with the weights a step reads
SMALL_WIDTH, SMALL_HEADS = 768, 12  # bark-small's widths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bark_fused")
    bark_tiny.save_tiny_bark(path, seed=5, hidden_size=32, num_layers=2, num_heads=2)
    return bark.BarkModel.from_pretrained(path, attn_implementation="eager").to(DEVICE)


def _causal(vocab_in: int, vocab_out: int, layers: int = 1, bias: bool = False, seed: int = 0,
            dtype=torch.float32, width: int = WIDTH, heads: int = HEADS) -> BarkCausalModel:
    """A random causal Bark sub-model at bark-small's widths (non-trivial LayerNorm affine parameters)."""
    torch.manual_seed(seed)
    cfg = BarkSubModelConfig(block_size=1024, input_vocab_size=vocab_in, output_vocab_size=vocab_out,
                             num_layers=layers, num_heads=heads, hidden_size=width, bias=bias)
    model = BarkCausalModel(cfg, attn_backend="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device=DEVICE, dtype=dtype)


@pytest.fixture(scope="module")
def semantic():
    return _causal(10_048, 10_048, bias=False, seed=1)


@pytest.fixture(scope="module")
def coarse():
    return _causal(12_096, 12_096, bias=True, seed=2)


def _semantic_heads(model, gen, batch, params, generator, min_eos_p=None, min_new=0):
    record = _TokenRecord(batch, 24, gen.semantic_config.semantic_pad_token, DEVICE)
    return record, [_SemanticHead(model, record, gen, params, min_eos_p, min_new, generator)]


def _coarse_heads(model, gen, batch, params, generator):
    record = _TokenRecord(batch, 24, 0, DEVICE)
    sem = gen.semantic_config.semantic_vocab_size
    bounds = [(sem, sem + 1024), (sem + 1024, model.config.output_vocab_size)]
    return record, [_CoarseHead(model, record, b, params, generator) for b in bounds]


def _prompts(lengths, seed=0, width=WIDTH):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, generator=g).to(DEVICE) for n in lengths]


def _decode(model, heads_fn, mode, prompts, steps, params=SamplingParams(), seed=None, splits=None, **head_kw):
    """Prefill ``prompts`` (list of (T_b, C)) and run ``steps`` steps (variants alternate) -> record (B, steps + 1)."""
    batch = len(prompts)
    generator = torch.Generator(DEVICE).manual_seed(seed) if seed is not None else None
    record, heads = heads_fn(batch, params, generator, **head_kw)
    session = bark_session.DecodeSession(model, batch, 48, heads, mode, generators=[generator])
    if splits is not None:
        session.prepare()
        session._fused.set_num_splits(splits)
    if len({p.shape[0] for p in prompts}) == 1:
        session.prefill(torch.stack(prompts))
    else:
        session.prefill(prompts)
    for i in range(steps):
        session.step(i % len(heads))
    assert session.fallback is None, session.fallback  # CUDA: every variant captured as a graph
    return record.tokens[:, : steps + 1].clone(), session


# -- tokens --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["semantic", "coarse"])
@pytest.mark.parametrize("lengths", [[7], [5, 11, 3], [6] * 8], ids=["batch1", "ragged3", "batch8"])
def test_greedy_tokens_equal_the_eager_session_and_each_row_alone(tiny, semantic, coarse, stage, lengths):
    gen = tiny.generation_config
    model = semantic if stage == "semantic" else coarse

    def heads_fn(batch, params, generator):
        return (_semantic_heads if stage == "semantic" else _coarse_heads)(model, gen, batch, params, generator)

    prompts = _prompts(lengths, seed=len(lengths))
    steps = 3
    eager, _ = _decode(model, heads_fn, "eager", prompts, steps)
    fused, session = _decode(model, heads_fn, "fused", prompts, steps)
    assert session.fused_heads == {v: None for v in range(len(session.heads))}  # the fused head ran
    assert torch.equal(fused, eager), (fused, eager)
    assert len(set(eager[:, 1:].flatten().tolist())) > 1  # real choices, not one constant token
    for b in (range(3) if len(lengths) == 3 else [len(lengths) - 1]):  # every ragged row; batch 8: its last row
        alone, _ = _decode(model, heads_fn, "fused", prompts[b:b + 1], steps)
        assert torch.equal(alone[0], fused[b]), b


def test_greedy_tokens_at_bark_small_widths(tiny):
    """768 wide, 12 heads (bark-small's widths, one layer; the coarse one with biases): 2 ragged rows, semantic and
    coarse heads."""
    gen = tiny.generation_config
    for stage, vocab in (("semantic", 10_048), ("coarse", 12_096)):
        model = _causal(vocab, vocab, bias=stage == "coarse", seed=4, width=SMALL_WIDTH, heads=SMALL_HEADS)
        heads = _semantic_heads if stage == "semantic" else _coarse_heads

        def heads_fn(batch, params, generator, model=model, heads=heads):
            return heads(model, gen, batch, params, generator)

        prompts = _prompts([5, 9], seed=5, width=SMALL_WIDTH)
        eager, _ = _decode(model, heads_fn, "eager", prompts, 2)
        fused, _ = _decode(model, heads_fn, "fused", prompts, 2)
        assert torch.equal(fused, eager), (stage, fused, eager)


def test_split_keys_combined_inside_the_attention_launch(tiny, semantic):
    """Several programs per (row, head), the last one combining (atomic counter): the eager tokens, rows of different
    lengths (splits past a row's end are empty)."""
    gen = tiny.generation_config

    def heads_fn(batch, params, generator):
        return _semantic_heads(semantic, gen, batch, params, generator)

    prompts = _prompts([30, 4, 17], seed=3)
    eager, _ = _decode(semantic, heads_fn, "eager", prompts, 3)
    fused, session = _decode(semantic, heads_fn, "fused", prompts, 3, splits=3)
    assert session._fused.acc_ws.shape[0] == 3
    assert torch.equal(fused, eager)
    assert int(session._fused.counter.abs().sum()) == 0  # every counter reset by its combining program


@pytest.mark.parametrize("stage", ["semantic", "coarse"])
def test_seeded_sampling_draws_the_eager_tokens(tiny, semantic, coarse, stage):
    """temperature, top-k, top-p, then one draw per row by the exponential race (torch.multinomial's draw on the
    eager side): the same tokens from the same seed; semantic with min_eos_p and min_new_tokens on as well."""
    gen = tiny.generation_config
    model = semantic if stage == "semantic" else coarse
    extra = dict(min_eos_p=0.2, min_new=2) if stage == "semantic" else {}

    def heads_fn(batch, params, generator, **kw):
        if stage == "semantic":
            return _semantic_heads(model, gen, batch, params, generator, **kw)
        return _coarse_heads(model, gen, batch, params, generator)

    prompts = _prompts([6, 9, 4], seed=7)
    params = SamplingParams(True, 0.7, 20, 0.9) if stage == "semantic" else SamplingParams(True, 1.3, None, None)
    eager, _ = _decode(model, heads_fn, "eager", prompts, 3, params, seed=11, **extra)
    fused, _ = _decode(model, heads_fn, "fused", prompts, 3, params, seed=11, **extra)
    assert torch.equal(fused, eager), (params, fused, eager)
    if stage == "semantic":
        other, _ = _decode(model, heads_fn, "fused", prompts, 3, params, seed=12, **extra)
        assert not torch.equal(other, fused)  # the draw depends on the seed


def test_a_head_without_fused_form_runs_after_the_fused_layers(tiny, semantic, caplog):
    """A head callable the kernels do not know (here a plain function) runs as torch ops on the fused layers' output:
    the eager tokens, and the reason is logged once per variant."""
    gen = tiny.generation_config

    def heads_fn(batch, params, generator):
        record, (head,) = _semantic_heads(semantic, gen, batch, params, generator)
        return record, [lambda hidden: head(hidden)]

    prompts = _prompts([5, 8], seed=4)
    eager, _ = _decode(semantic, heads_fn, "eager", prompts, 3)
    with caplog.at_level(logging.INFO, logger="bark"):
        fused, session = _decode(semantic, heads_fn, "fused", prompts, 3)
    assert torch.equal(fused, eager)
    assert session.fused_heads == {0: "the head has no fused_spec()"}
    assert sum("runs as torch ops after the fused layers" in r.message for r in caplog.records) == 1


def test_generate_fused_gives_the_eager_tokens_for_every_stage(tiny):
    ids, mask = (t.to(DEVICE) for t in bark_tiny.random_text_ids(2, [12, 30], seed=1))
    ref = generate_tokens(tiny, ids, mask, semantic_max_new_tokens=5, decode_mode="eager")
    out = generate_tokens(tiny, ids, mask, semantic_max_new_tokens=5, decode_mode="fused")
    for stage in ("semantic", "coarse", "fine"):
        assert len(ref[stage]) == 2
        for a, b in zip(ref[stage], out[stage], strict=True):
            assert torch.equal(a, b), stage
    assert sum(t.numel() for t in ref["coarse"]) > 0


# -- counting the device work of one step ------------------------------------------------------------------------------

# aten ops that launch no kernel on a GPU: views, metadata, allocations
_NO_KERNEL = {"view", "_unsafe_view", "as_strided", "unsqueeze", "squeeze", "select", "slice", "expand", "t",
              "transpose", "permute", "alias", "detach", "empty", "empty_like", "empty_strided", "unbind", "reshape",
              "lift_fresh", "_to_copy_noop", "new_empty", "new_empty_strided", "split", "chunk"}


class _StepCounter:
    """Counts, per DecodeSession.step call: Triton kernel launches, and aten ops dispatched outside the custom ops
    (those that would launch a kernel on a GPU: views and allocations aside). With ``run_kernels=False`` a launch is
    counted but its body is not interpreted (the count is structural: which launches a step issues does not depend on
    the values; the interpreter costs ~0.1 s a launch, too slow for 24-layer models in CI)."""

    def __init__(self, monkeypatch, run_kernels: bool = True):
        from torch.utils._python_dispatch import TorchDispatchMode
        from triton.runtime import interpreter

        self.steps: list[dict] = []
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if func.namespace != "bark_kernels_triton" and name not in _NO_KERNEL:
                    counter.current["torch"].append(name)
                return func(*args, **(kwargs or {}))

        real_run = interpreter.InterpretedFunction.run
        real_step = bark_session.DecodeSession.step

        def run(fn_self, *args, **kwargs):
            if counter.current is not None:
                counter.current["triton"].append(fn_self.fn.__name__)
                if not run_kernels:
                    return None
            return real_run(fn_self, *args, **kwargs)

        def step(session, variant=0):
            counter.current = {"triton": [], "torch": [], "layers": session.model.config.num_layers}
            try:
                with Mode():
                    return real_step(session, variant)
            finally:
                counter.steps.append(counter.current)
                counter.current = None

        self.current = None
        monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
        monkeypatch.setattr(bark_session.DecodeSession, "step", step)


def _check_counts(steps, layers, do_sample):
    assert len(steps) >= 2  # a semantic step and a coarse step at least
    for step in steps:
        assert step["torch"] == (["exponential_"] if do_sample else []), step["torch"]
        per_layer = [n for n in step["triton"] if n not in ("_embed_kernel", "_pick_kernel")]
        assert len(per_layer) == 5 * layers + 1  # + the head's LN/lm-head launch
        assert step["triton"].count("_embed_kernel") == step["triton"].count("_pick_kernel") == 1
    return len(steps[0]["triton"]) + len(steps[0]["torch"])


@pytest.mark.skipif(not _env.interpreter_enabled(), reason="counts launches of Triton's interpreter")
def test_one_fused_step_of_generate_is_five_launches_per_layer_and_at_most_four_more(tmp_path, monkeypatch):
    """generate(decode_mode='fused') on real 12- and 24-layer models (narrow: the count does not depend on the
    width), greedy and sampling: every step of both stages counts 5 per layer + 3 (greedy: embeddings, head logits,
    pick) or + 4 (sampling: + the Exp(1) draw) -> bark-small 63 / 64 (<= 64), bark 123 / 124 (<= 124). The kernels
    run for real on a 2-layer model (the same count as with their bodies skipped), skipped on the deep ones."""
    counts = {}
    for layers in (2, 12, 24):
        path = tmp_path / f"l{layers}"
        bark_tiny.save_tiny_bark(path, seed=0, hidden_size=16, num_layers=layers, num_heads=2)
        model = bark.BarkModel.from_pretrained(path, attn_implementation="eager")
        ids, mask = bark_tiny.random_text_ids(2, [6, 9], seed=0)
        for do_sample in (False, True):
            for run_kernels in (True, False) if layers == 2 else (False,):
                counter = _StepCounter(monkeypatch, run_kernels)
                kw = dict(semantic_do_sample=do_sample, coarse_do_sample=do_sample)
                if do_sample:
                    kw.update(semantic_temperature=0.7, semantic_top_k=30, semantic_top_p=0.9, coarse_temperature=0.7)
                generate_tokens(model, ids, mask, semantic_max_new_tokens=2, decode_mode="fused",
                                generator=torch.Generator().manual_seed(0), **kw)
                counts[(layers, do_sample, run_kernels)] = _check_counts(counter.steps, layers, do_sample)
                monkeypatch.undo()
    for (layers, do_sample, _), total in counts.items():
        assert total == 5 * layers + (4 if do_sample else 3)
    assert counts[(12, True, False)] == 64 and counts[(24, True, False)] == 124, counts
    print(f"fused step device work (launches + kernel-launching torch ops): {counts}")


# -- compile, no host reads ----------------------------------------------------------------------------------------


def test_the_fused_step_traces_fullgraph_and_reads_nothing_back(tiny, semantic):
    """No host read in a fused step; torch.compile(fullgraph=True) traces it (aot_eager: dynamo + AOT
    functionalization of the mutating custom ops, as inductor sees them) and the compiled step gives the tokens of
    the plain one. Sampling: the same draw through dynamo's graph (backend 'eager'); aot_eager decomposes
    exponential_ into other random ops (a different draw), so there only the tracing is checked."""
    gen = tiny.generation_config
    prompts = _prompts([5, 9], seed=9)
    greedy, sampling = SamplingParams(), SamplingParams(True, 0.8, 25, 0.95)
    for params, backend in ((greedy, "aot_eager"), (sampling, "eager"), (sampling, "aot_eager")):
        record, heads = _semantic_heads(semantic, gen, 2, params, None)
        session = bark_session.DecodeSession(semantic, 2, 48, heads, "fused")
        torch.manual_seed(3)
        session.prefill(prompts)
        with bark_session.no_host_reads():
            session.step()
        stepped = record.tokens[:, :2].clone()
        record2, heads2 = _semantic_heads(semantic, gen, 2, params, None)
        session2 = bark_session.DecodeSession(semantic, 2, 48, heads2, "fused")
        torch.manual_seed(3)
        session2.prefill(prompts)
        compiled = torch.compile(session2._fused_step_fn(0), fullgraph=True, backend=backend)
        with torch.no_grad():
            compiled()
        assert session2.cache.seqlens.tolist() == [6, 10] and int(record2.col) == 2
        assert torch.equal(record2.tokens[:, 0], stepped[:, 0])  # the prefill's token
        if params is greedy or backend == "eager":
            assert torch.equal(record2.tokens[:, :2], stepped), (params, backend)
        else:
            assert bool(((record2.tokens[:, 1] >= 0) & (record2.tokens[:, 1] < 10_000)).all())


# -- kernels in fp16 / bf16 against float64, within the tolerance table ------------------------------------------------


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_within_the_tolerance_table(dtype):
    from bark_kernels.backends.triton import supports

    reason = supports("attention_with_kvcache", torch.device("cpu"), dtype, 64) if _env.interpreter_enabled() \
        else None
    if reason is not None:
        pytest.skip(reason)
    device = "cpu" if _env.interpreter_enabled() else "cuda"
    g = torch.Generator().manual_seed(0)
    batch, width, heads, hd, smax = 3, SMALL_WIDTH, SMALL_HEADS, 64, 40

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(torch.float64)

    x64, lnw, lnb = rnd(batch, width), 1 + rnd(width, scale=0.1), rnd(width, scale=0.1)
    wqkv, bqkv = rnd(3 * width, width, scale=width ** -0.5), rnd(3 * width, scale=0.02)
    w1, b1 = rnd(4 * width, width, scale=width ** -0.5), rnd(4 * width, scale=0.02)
    w2, b2 = rnd(width, 4 * width, scale=(4 * width) ** -0.5), rnd(width, scale=0.02)

    def cast(*ts):
        return [t.to(dtype).to(device) for t in ts]

    # LN + q/k/v + cache append
    seqlens = torch.tensor([3, 0, 7], dtype=torch.int32, device=device)
    xd, lnwd, lnbd, wqkvd, bqkvd = cast(x64, lnw, lnb, wqkv, bqkv)
    kc = torch.zeros(batch, smax, heads, hd, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    q = torch.zeros(batch, width, dtype=dtype, device=device)
    decode.fused_ln_qkv(xd, lnwd, lnbd, wqkvd, bqkvd, seqlens, q, kc, vc, 1e-5)
    ref = F.linear(_ln(xd.double(), lnwd.double(), lnbd.double()), wqkvd.double(), bqkvd.double())
    base = F.linear(_ln(xd, lnwd, lnbd), wqkvd, bqkvd)
    got = torch.cat([q, torch.stack([kc[b, int(seqlens[b])].reshape(-1) for b in range(batch)]),
                     torch.stack([vc[b, int(seqlens[b])].reshape(-1) for b in range(batch)])], dim=1)
    assert_close_to_reference(got.cpu(), ref.cpu(), base.cpu(), dtype, name="ln_qkv")
    assert int((kc != 0).any(dim=(2, 3)).sum()) == batch  # one position per row written, nothing else

    # LN + fc1 + GELU
    w1d, b1d = cast(w1, b1)
    h = torch.zeros(batch, 4 * width, dtype=dtype, device=device)
    decode.fused_ln_linear(xd, lnwd, lnbd, w1d, b1d, h, 1e-5, True)
    ref = F.gelu(F.linear(_ln(xd.double(), lnwd.double(), lnbd.double()), w1d.double(), b1d.double()))
    base = F.gelu(F.linear(_ln(xd, lnwd, lnbd), w1d, b1d))
    assert_close_to_reference(h.cpu(), ref.cpu(), base.cpu(), dtype, name="ln_fc1_gelu")

    # fc2 + residual (in place)
    w2d, b2d = cast(w2, b2)
    xr = xd.clone()
    decode.fused_linear_residual(h, w2d, b2d, xr)
    ref = xd.double() + F.linear(h.double(), w2d.double(), b2d.double())
    base = xd + F.linear(h, w2d, b2d)
    assert_close_to_reference(xr.cpu(), ref.cpu(), base.cpu(), dtype, name="fc2_residual")

    # final LN + lm head (float32 logits)
    logits = torch.zeros(batch, 4 * width, dtype=torch.float32, device=device)
    decode.fused_ln_linear(xd, lnwd, None, w1d, None, logits, 1e-5, False)
    ref = F.linear(_ln(xd.double(), lnwd.double(), None), w1d.double())
    base = F.linear(_ln(xd, lnwd, None), w1d).float()
    assert_close_to_reference(logits.cpu(), ref.cpu(), base.cpu(), dtype, name="ln_lm_head")

    # attention over the cache (keys 0..seqlens[b]), one split and three
    kc.copy_(rnd(batch, smax, heads, hd).to(dtype))
    vc.copy_(rnd(batch, smax, heads, hd).to(dtype))
    qd = cast(rnd(batch, width))[0]
    mask = torch.arange(smax, device=device)[None, :] <= seqlens.long()[:, None]  # (B, S)
    scale = hd ** -0.5

    def attend(qq, kk, vv):
        s = torch.einsum("bhd,bshd->bhs", qq.view(batch, heads, hd), kk) * scale
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.einsum("bhs,bshd->bhd", s.softmax(-1), vv).reshape(batch, width)

    ref = attend(qd.double(), kc.double(), vc.double())
    base = attend(qd.float(), kc.float(), vc.float()).to(dtype)  # eager attention in the dtype: fp32 math, rounded
    for splits in (1, 3):
        rows = batch * heads
        out = torch.zeros(batch, width, dtype=dtype, device=device)
        ws = (torch.zeros(splits, rows, 64, device=device), torch.zeros(splits, rows, device=device),
              torch.zeros(splits, rows, device=device), torch.zeros(rows, dtype=torch.int32, device=device))
        if splits > 1:  # a split size of one key block: rows of length <= 8 leave splits 2 and 3 empty
            kc_long = torch.zeros(batch, 128 * 3, heads, hd, dtype=dtype, device=device)
            kc_long[:, :smax] = kc
            vc_long = torch.zeros_like(kc_long)
            vc_long[:, :smax] = vc
            decode.fused_attention(qd, kc_long, vc_long, seqlens, out, *ws, scale)
        else:
            decode.fused_attention(qd, kc, vc, seqlens, out, *ws, scale)
        assert_close_to_reference(out.cpu(), ref.cpu(), base.cpu(), dtype, name=f"attention splits={splits}")
        assert int(ws[3].abs().sum()) == 0

    # embeddings: exact
    wte, wpe = cast(rnd(50, width), rnd(64, width))
    tokens = torch.tensor([3, 49, 0], device=device)
    xe = torch.zeros(batch, width, dtype=dtype, device=device)
    decode.fused_embed(tokens, seqlens, wte, wpe, xe)
    assert torch.equal(xe, wte[tokens] + wpe[seqlens.long()])
