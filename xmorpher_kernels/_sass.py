"""Reading the SASS of the CUDA kernels without a GPU: ``cuobjdump --dump-sass`` of the built
extension split into kernels and instructions, and each kernel's hot loop measured.

Used by the SASS check (tests/test_brick_sass.py) and the static cost model
(benchmarks/cost_model.py). The hot loop of a kernel is the loop (a backward branch and the
address range it closes) holding the most tensor-core instructions (HMMA). Its cost per
iteration is counted on one path from the loop head to that branch: the path with the most HMMAs
and, among those, the fewest instructions, so that a rarely taken side (the masked windows, a
unit outside the volume) does not count and every predicated-off instruction does (it still
issues). Compiler-generated code is reducible, so a loop is the address range it spans.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")


@dataclass
class Instruction:
    address: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str  # with modifiers, e.g. "HMMA.16816.F32.BF16"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def branch_target(self) -> Optional[int]:
        if self.base != "BRA":
            return None
        match = _TARGET.search(self.operands)
        return int(match.group(1), 16) if match else None

    @property
    def unconditional(self) -> bool:
        return self.predicate in ("", "@PT") and "," not in self.operands


@dataclass
class Kernel:
    name: str  # mangled
    instructions: List[Instruction] = field(default_factory=list)

    def count(self, *opcodes: str) -> int:
        """Instructions whose base opcode is one of `opcodes` (e.g. "HMMA", "LDSM")."""
        return sum(1 for i in self.instructions if i.base in opcodes)

    def matching(self, pattern: str) -> List[Instruction]:
        """Instructions whose full opcode matches the regular expression `pattern`."""
        regex = re.compile(pattern)
        return [i for i in self.instructions if regex.search(i.opcode)]


_WIDTH = re.compile(r"\.(64|128)(\.|$)")


def shared_wavefronts(instruction: Instruction) -> int:
    """Passes through the shared-memory pipe (one 128-byte wavefront per clock per SM, no bank
    conflicts assumed) an instruction takes: LDS/STS/LDGSTS by width (a warp's 16-byte accesses
    move 512 bytes: 4), LDSM by matrices (.4: 4), SHFL and MOVM one crossbar pass; 0 otherwise."""
    base = instruction.base
    if base == "LDSM":
        return int(instruction.opcode.rsplit(".", 1)[-1]) if instruction.opcode[-1].isdigit() else 1
    if base in ("LDS", "STS", "LDGSTS", "ATOMS"):
        match = _WIDTH.search(instruction.opcode)
        return {"64": 2, "128": 4}[match.group(1)] if match else 1
    if base in ("SHFL", "MOVM"):
        return 1
    return 0


def find_cuobjdump() -> Optional[str]:
    """The CUDA toolkit's cuobjdump, or the copy triton's package carries."""
    candidates = [shutil.which("cuobjdump")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is not None:
            candidates.append(os.path.join(CUDA_HOME, "bin", "cuobjdump"))
    except ImportError:
        pass
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


def dump_sass(binary: str, arch: str, tool: Optional[str] = None) -> str:
    """``cuobjdump --dump-sass`` of the `arch` (e.g. "sm_90") cubins in `binary`."""
    tool = tool or find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit or triton's copy)")
    return subprocess.run(
        [tool, "--gpu-architecture", arch, "--dump-sass", binary], capture_output=True, text=True, check=True
    ).stdout


def parse_sass(text: str) -> Dict[str, Kernel]:
    """Kernels of a SASS dump by mangled name, instructions in address order."""
    kernels: Dict[str, Kernel] = {}
    current: Optional[Kernel] = None
    for line in text.splitlines():
        function = _FUNCTION.match(line)
        if function:
            current = kernels.setdefault(function.group(1), Kernel(function.group(1)))
            continue
        match = _INSTRUCTION.match(line)
        if current is None or not match:
            continue
        body = match.group(2).strip()
        predicate = ""
        if body.startswith("@"):
            predicate, body = body.split(None, 1)
        opcode, _, operands = body.partition(" ")
        current.instructions.append(Instruction(int(match.group(1), 16), predicate, opcode, operands.strip()))
    for kernel in kernels.values():
        kernel.instructions.sort(key=lambda i: i.address)
    return kernels


@dataclass
class LoopCost:
    head: int  # address of the loop's first instruction
    latch: int  # address of its backward branch
    hmma: int  # HMMAs (or the opcode the path was chosen by) on the counted path
    instructions: int  # instructions on the counted path, the branch included
    opcodes: Dict[str, int]  # base opcode -> count on the counted path
    path: List[Instruction] = field(default_factory=list, repr=False)  # the counted instructions

    @property
    def wavefronts(self) -> int:
        """Shared-memory and crossbar passes of the counted path (shared_wavefronts)."""
        return sum(shared_wavefronts(i) for i in self.path)

    def describe(self) -> str:
        top = ", ".join(f"{name} {n}" for name, n in sorted(self.opcodes.items(), key=lambda kv: -kv[1])[:12])
        return (
            f"loop 0x{self.head:x}..0x{self.latch:x}: {self.instructions} instructions, {self.hmma} HMMA "
            f"on its main path ({top})"
        )


def path_to(kernel: Kernel, end: int) -> Optional[LoopCost]:
    """The fewest-instruction path from the kernel's entry to the instruction at `end` (inner
    loops' bodies counted once), as a LoopCost from the entry."""
    body = [i for i in kernel.instructions if i.address <= end]
    return _main_path(body, body[0].address, end) if body else None


def loops(kernel: Kernel) -> List[Tuple[int, int]]:
    """(head, latch) address pairs of the kernel's backward branches."""
    found = []
    for i in kernel.instructions:
        target = i.branch_target
        if target is not None and target <= i.address:
            found.append((target, i.address))
    return found


def hot_loop(kernel: Kernel, opcode: str = "HMMA") -> Optional[LoopCost]:
    """The cost of the kernel's innermost loop holding the most `opcode` instructions (HMMA: the
    hot loop, see the module docstring), counted on its path with the most `opcode` instructions
    and then the fewest instructions; None without such a loop."""
    best: Optional[Tuple[int, int, LoopCost]] = None
    for head, latch in loops(kernel):
        body = [i for i in kernel.instructions if head <= i.address <= latch]
        held = sum(1 for i in body if i.base == opcode)
        if held == 0:
            continue
        cost = _main_path(body, head, latch, opcode)
        if cost is None:
            continue
        rank = (held, -(latch - head))
        if best is None or rank > best[:2]:
            best = (rank[0], rank[1], cost)
    return best[2] if best else None


def _main_path(body: Sequence[Instruction], head: int, latch: int, opcode: str = "HMMA") -> Optional[LoopCost]:
    """The path from `head` to the instruction at `latch` through `body` with the most `opcode`
    instructions, then the fewest instructions (LoopCost.hmma counts `opcode`).

    Forward edges only (an inner loop's body counts once); edges leaving the range end a path
    that does not reach the latch."""
    index = {i.address: n for n, i in enumerate(body)}
    # Basic block leaders: the head, branch targets inside the range, instructions after branches.
    leaders = {0}
    for n, i in enumerate(body):
        if i.base in ("BRA", "EXIT", "RET", "BRX", "JMP", "JMX"):
            if n + 1 < len(body):
                leaders.add(n + 1)
            target = i.branch_target
            if target is not None and target in index:
                leaders.add(index[target])
    starts = sorted(leaders)
    block_of = {}
    blocks = []
    for b, start in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(body)
        blocks.append((start, end))
        for n in range(start, end):
            block_of[n] = b
    # best[b] = (hmma, -instructions, opcode counts, instructions) of the best path from the head
    # to block b's start.
    best: List[Optional[Tuple[int, int, Dict[str, int], List[Instruction]]]] = [None] * len(blocks)
    best[0] = (0, 0, {}, [])
    result: Optional[LoopCost] = None
    for b, (start, end) in enumerate(blocks):
        if best[b] is None:
            continue
        hmma, neg_count, opcodes, path = best[b]
        opcodes, path = dict(opcodes), list(path)
        successors: List[int] = []
        falls_through = True
        for n in range(start, end):
            i = body[n]
            hmma += i.base == opcode
            neg_count -= 1
            opcodes[i.base] = opcodes.get(i.base, 0) + 1
            path.append(i)
            if i.address == latch:
                candidate = LoopCost(head, latch, hmma, -neg_count, opcodes, path)
                if result is None or (candidate.hmma, -candidate.instructions) > (result.hmma, -result.instructions):
                    result = candidate
                falls_through = not i.unconditional
                break
            if i.base in ("EXIT", "RET", "BRX", "JMP", "JMX") and i.predicate in ("", "@PT"):
                falls_through = False
                break
            target = i.branch_target
            if target is not None:
                if target > i.address and target in index:
                    successors.append(block_of[index[target]])
                if i.unconditional:
                    falls_through = False
                    break
        if falls_through and end < len(body):
            successors.append(block_of[end])
        for s in successors:
            if s <= b:
                continue
            candidate = (hmma, neg_count, opcodes, path)
            if best[s] is None or (candidate[0], candidate[1]) > (best[s][0], best[s][1]):
                best[s] = candidate
    return result
