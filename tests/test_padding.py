"""unpad_input / pad_input round trips for left and right padding, on every backend's gather/scatter."""

import pytest
import torch
from conftest import DEVICES, backends_for

import bark_kernels as bk
from bark_kernels import registry


def _params():
    out = []
    for device in DEVICES:
        for name in backends_for(device):
            if registry.why_not(name, "gather_rows", torch.device(device), torch.float32, 1) is None:
                out.append(pytest.param(device, name, id=f"{device}-{name}"))
    return out


MASKS = {
    "right": [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]],
    "left": [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]],
    "empty_row": [[0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("device,backend", _params())
def test_unpad_pad_round_trip(device, backend, dtype, mask_kind):
    mask = torch.tensor(MASKS[mask_kind], device=device)
    batch, seqlen = mask.shape
    hidden = torch.randn(batch, seqlen, 3, 8, generator=torch.Generator().manual_seed(0)).to(dtype=dtype, device=device)
    unpadded, indices, cu, max_seqlen = bk.unpad_input(hidden, mask, backend=backend)
    lengths = mask.sum(-1)
    assert unpadded.shape == (int(lengths.sum()), 3, 8)
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + torch.cumsum(lengths, 0).tolist()
    assert max_seqlen == int(lengths.max())
    # the kept rows, in order, exactly
    expected = torch.cat([hidden[b][mask[b].bool()] for b in range(batch)])
    assert torch.equal(unpadded, expected)
    padded = bk.pad_input(unpadded, indices, batch, seqlen, backend=backend)
    assert torch.equal(padded, hidden * mask[..., None, None].to(dtype))  # pad positions are 0


@pytest.mark.parametrize("device,backend", _params())
def test_unpad_bool_and_int_masks_agree(device, backend):
    hidden = torch.randn(2, 4, 5, device=device)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], device=device)
    a = bk.unpad_input(hidden, mask, backend=backend)
    b = bk.unpad_input(hidden, mask.bool(), backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3]


def test_unpad_then_varlen_equals_padded_attention():
    """The flash-attn recipe: unpad, varlen attention, pad back == masked attention on the padded batch."""
    torch.manual_seed(0)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    qkv = torch.randn(2, 5, 3, 2, 16)  # (B, S, 3, H, D)
    packed, indices, cu, max_seqlen = bk.unpad_input(qkv, mask)
    q, k, v = packed.unbind(1)  # each (nnz, H, D)
    out = bk.attention_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
    padded = bk.pad_input(out, indices, 2, 5)  # (B, S, H, D)
    for b in range(2):
        keep = mask[b].bool()
        qb, kb, vb = (t[b][keep][None] for t in qkv.unbind(2))
        alone = bk.attention(qb, kb, vb, causal=True, backend="eager")[0]
        torch.testing.assert_close(padded[b][keep], alone)
        assert torch.count_nonzero(padded[b][~keep]) == 0
