"""The FlexAttention peer of the GPU table computes the op itself (checked on the CPU, eager
flex_attention, small volumes): the block mask built from the geometry equals
create_block_mask's, and flex_attention with it and the bias score_mod matches the op's
reference, so the table's FlexAttention figures are for the same work."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch.nn.attention.flex_attention")
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

from flex_attention_rows import bias_score_mod, window_block_mask, window_mask_mod  # noqa: E402
from gpu_timing import BIAS_EXTENT, SEARCH, WINDOW  # noqa: E402
from xmorpher_kernels import window_cross_attention  # noqa: E402

VOLUMES = [(3, 5, 7), (4, 4, 6), (2, 3, 9)]


def _block_sets(mask):
    """Per query block: the sets of partial and of full key blocks."""
    def rows(counts, indices):
        return [set(indices[0, 0, i, : counts[0, 0, i]].tolist()) for i in range(counts.shape[-1])]

    return rows(mask.kv_num_blocks, mask.kv_indices), rows(mask.full_kv_num_blocks, mask.full_kv_indices)


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("volume", VOLUMES)
def test_block_mask_equals_create_block_mask(volume, block):
    length = volume[0] * volume[1] * volume[2]
    ours = window_block_mask(volume, "cpu", block=block, rows_per_chunk=3)
    theirs = create_block_mask(window_mask_mod(volume), None, None, length, length, device="cpu", BLOCK_SIZE=block)
    partial, full = _block_sets(ours)
    assert (partial, full) == _block_sets(theirs)
    assert any(partial) and (block > 4 or any(full))  # with blocks of 4 rows some are full: both kinds are checked


@pytest.mark.parametrize("volume", VOLUMES)
def test_flex_attention_matches_the_reference(volume, seed):
    generator = torch.Generator().manual_seed(seed)
    heads, head_dim = 2, 8
    shape = (2, *volume, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(heads, BIAS_EXTENT, BIAS_EXTENT, BIAS_EXTENT, generator=generator, dtype=torch.float64)
    length = volume[0] * volume[1] * volume[2]

    def flat(t):
        return t.reshape(2, length, heads, head_dim).transpose(1, 2)

    out = flex_attention(flat(q), flat(k), flat(v), score_mod=bias_score_mod(volume, bias),
                         block_mask=window_block_mask(volume, "cpu", block=16), scale=head_dim**-0.5)
    truth = window_cross_attention(q, k, v, WINDOW, SEARCH, rel_pos_bias=bias, backend="reference")
    torch.testing.assert_close(out.transpose(1, 2).reshape(shape), truth, rtol=1e-9, atol=1e-9)
