"""FlexAttention rows of the GPU table: torch's ``flex_attention``, compiled, over the flattened
volume with a block mask of the same key boxes (keys outside the volume do not exist there, as
with ``padding="mask"``) and the relative-position bias as a ``score_mod``; bf16, both stages,
forward and forward+backward (gradients of q, k, v and the bias).

Compiling it takes minutes, so ``benchmarks/run_gpu.sh`` starts this script first, while the
extension builds and the tests run, and the table (``gpu_report.py``) has it time the compiled
variants later on a quiet GPU. The two talk through files in ``--dir`` (written atomically):

- ``status.json``: after each step, every variant's state (compiled in how long, failed, cut);
- ``go``: written by gpu_report.py when the GPU is free for these rows;
- ``rows.json``: the timings and the error against the op's reference, written after ``go``;
- ``closed``: written by gpu_report.py when it stops waiting; nothing is timed after that.

A variant whose compile would start after ``--compile-budget-s`` is reported as cut (a compile
already under way cannot be interrupted; the run script's timeout ends this process).

    python benchmarks/flex_attention_rows.py --dir DIR --compile-budget-s 300
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_timing import STAGES, WINDOW, SEARCH, BIAS_EXTENT, error_text, make_inputs, median_ms, peak_mb, write_json_atomically  # noqa: E402

MODES = ("forward", "forward+backward")
BLOCK = 128  # FlexAttention's default sparse block size
LEFT = (SEARCH - WINDOW) // 2


def _coordinates(index: torch.Tensor, volume):
    _, height, width = volume
    return index // (height * width), (index // width) % height, index % width


def window_block_mask(volume, device, block: int = BLOCK, rows_per_chunk: int = 16):
    """The BlockMask of the op's key boxes over the flattened volume, built from the geometry.

    ``create_block_mask`` evaluates the mask densely (about 55 bytes per query-key pair, ~90 GB
    at the first stage); here each chunk of query blocks is evaluated against all keys and
    reduced to partial and full blocks at once (equal to create_block_mask's, checked at small
    sizes by the tests of this file's helpers).
    """
    from torch.nn.attention.flex_attention import BlockMask

    length = math.prod(volume)
    blocks = -(-length // block)
    keys = torch.arange(blocks * block, device=device)
    key_coords = _coordinates(keys, volume)
    partial_rows, full_rows = [], []
    for first in range(0, blocks, rows_per_chunk):
        queries = torch.arange(first * block, min(blocks, first + rows_per_chunk) * block, device=device)
        inside = (queries < length)[:, None] & (keys < length)[None, :]
        for q_c, k_c in zip(_coordinates(queries, volume), key_coords):
            offset = k_c[None, :] - (q_c[:, None] // WINDOW) * WINDOW + LEFT
            inside &= (offset >= 0) & (offset < SEARCH)
        tiles = inside.view(-1, block, blocks, block)
        any_pair, all_pairs = tiles.any(dim=(1, 3)), tiles.all(dim=(1, 3))
        partial_rows.append(any_pair & ~all_pairs)
        full_rows.append(all_pairs)

    def as_indices(rows: List[torch.Tensor]):
        table = torch.cat(rows)  # (query blocks, key blocks) bool
        counts = table.sum(dim=1, dtype=torch.int32)
        order = torch.argsort((~table).to(torch.int8), dim=1, stable=True).to(torch.int32)  # used blocks first
        return counts[None, None], order[None, None]

    kv_num_blocks, kv_indices = as_indices(partial_rows)
    full_num_blocks, full_indices = as_indices(full_rows)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_num_blocks, full_indices, BLOCK_SIZE=block,
                                    mask_mod=window_mask_mod(volume), seq_lengths=(length, length))


def window_mask_mod(volume):
    def mask_mod(b, h, q_idx, kv_idx):
        inside = None
        for q_c, k_c in zip(_coordinates(q_idx, volume), _coordinates(kv_idx, volume)):
            offset = k_c - (q_c // WINDOW) * WINDOW + LEFT
            axis = (offset >= 0) & (offset < SEARCH)
            inside = axis if inside is None else inside & axis
        return inside

    return mask_mod


def bias_score_mod(volume, rel_pos_bias: torch.Tensor):
    """Adds rel_pos_bias[h, d + l + w - 1] for the offset d = key - query (clamped: the block
    mask drops the pairs whose offset falls outside the table)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        index = [(k_c - q_c + LEFT + WINDOW - 1).clamp(0, BIAS_EXTENT - 1)
                 for q_c, k_c in zip(_coordinates(q_idx, volume), _coordinates(kv_idx, volume))]
        return score + rel_pos_bias[h, index[0], index[1], index[2]]

    return score_mod


class FlexProblem:
    """One stage's bf16 inputs, block mask (built once) and calls of the compiled flex_attention."""

    def __init__(self, shape, compiled):
        batch, depth, height, width, heads, head_dim = shape
        self.shape, self.compiled = shape, compiled
        self.volume = (depth, height, width)
        self.q, self.k, self.v, self.bias, self.grad_out = make_inputs(shape, torch.bfloat16)
        started = time.time()
        self.block_mask = window_block_mask(self.volume, "cuda")
        torch.cuda.synchronize()
        self.block_mask_s = time.time() - started
        self.score_mod = bias_score_mod(self.volume, self.bias)

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        batch, _, _, _, heads, head_dim = self.shape
        return t.reshape(batch, -1, heads, head_dim).transpose(1, 2)

    def attend(self) -> torch.Tensor:
        out = self.compiled(self._flat(self.q), self._flat(self.k), self._flat(self.v), score_mod=self.score_mod,
                            block_mask=self.block_mask, scale=self.shape[-1] ** -0.5)
        return out.transpose(1, 2).reshape(self.shape)

    def forward(self):
        with torch.no_grad():
            return self.attend()

    def forward_backward(self):
        return torch.autograd.grad(self.attend(), (self.q, self.k, self.v, self.bias), self.grad_out)

    def call(self, mode: str):
        return self.forward if mode == "forward" else self.forward_backward

    def error_against_reference(self) -> float:
        """||flex - reference|| / ||reference|| of the forward, the reference in fp32."""
        from xmorpher_kernels import window_cross_attention

        with torch.no_grad():
            truth = window_cross_attention(self.q.float(), self.k.float(), self.v.float(), WINDOW, SEARCH,
                                           rel_pos_bias=self.bias.float(), backend="reference")
            return float((self.forward().float() - truth).norm() / truth.norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="folder of the status, go, rows and closed files")
    parser.add_argument("--compile-budget-s", type=float, default=300.0)
    parser.add_argument("--wait-s", type=float, default=900.0, help="give up waiting for 'go' after this")
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import flex_attention

    os.makedirs(args.dir, exist_ok=True)
    started = time.time()
    path = {name: os.path.join(args.dir, name) for name in ("status.json", "go", "rows.json", "closed")}
    status: Dict[str, dict] = {}
    problems: Dict[str, FlexProblem] = {}
    compiled = torch.compile(flex_attention, dynamic=False)
    for stage, shape in STAGES.items():
        try:
            problems[stage] = FlexProblem(shape, compiled)
        except Exception as error:  # reported in the table, never fatal
            for mode in MODES:
                status[f"{stage}|{mode}"] = {"state": "failed", "error": f"block mask: {error_text(error)}"}
            write_json_atomically(path["status.json"], status)
            continue
        for mode in MODES:
            key = f"{stage}|{mode}"
            if time.time() - started > args.compile_budget_s:
                status[key] = {"state": "cut", "error": f"compile budget of {args.compile_budget_s:.0f} s spent"}
            else:
                status[key] = {"state": "compiling", "since_s": round(time.time() - started, 1)}
                write_json_atomically(path["status.json"], status)
                compile_started = time.time()
                try:
                    problems[stage].call(mode)()
                    torch.cuda.synchronize()
                    status[key] = {"state": "compiled", "compile_s": round(time.time() - compile_started, 1),
                                   "block_mask_s": round(problems[stage].block_mask_s, 2)}
                except Exception as error:
                    status[key] = {"state": "failed", "error": error_text(error)}
            write_json_atomically(path["status.json"], status)
            print(f"[{time.time() - started:.0f} s] flex_attention {key}: {status[key]}", flush=True)

    while not os.path.exists(path["go"]):
        if os.path.exists(path["closed"]) or time.time() - started > args.wait_s:
            print("flex_attention: the table did not ask for the rows; nothing timed", flush=True)
            return 0
        time.sleep(0.2)
    rows = {}
    for key, state in status.items():
        if state["state"] != "compiled" or os.path.exists(path["closed"]):
            continue
        stage, mode = key.split("|")
        problem = problems[stage]
        try:
            row = {"ms": median_ms(problem.call(mode)), "mb": peak_mb(problem.call(mode))}
            if mode == "forward":
                row["rel_error_vs_reference"] = problem.error_against_reference()
        except Exception as error:
            row = {"error": error_text(error)}
        rows[key] = row
        print(f"flex_attention {key}: {row}", flush=True)
    write_json_atomically(path["rows.json"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
