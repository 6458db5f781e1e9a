"""The op with its core dependencies only (torch and numpy), as `pip install xmorpher-kernels` gives it.

Run by scripts/test.sh with the python of an environment that has torch, numpy and the wheel but
not the `registration` extra: the install must have brought none of the extra's packages, the op
must import and run forward and backward on the CPU (the fused cpu backend against the reference)
without loading any of them, and `import xmorpher` must fail with a message naming the extra.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys

import torch

# The extra as the installed wheel declares it (its distribution names are the import names).
REGISTRATION_PACKAGES = sorted(
    re.split(r"[\s;<>=!~\[]", requirement)[0]
    for requirement in importlib.metadata.requires("xmorpher-kernels") or []
    if re.search(r"extra\s*==\s*[\"']registration[\"']", requirement)
)


def forward_backward(backend: str, inputs: list) -> list:
    from xmorpher_kernels import window_cross_attention

    query, key, value, bias = (t.detach().clone().requires_grad_() for t in inputs)
    out = window_cross_attention(query, key, value, 2, 6, rel_pos_bias=bias, backend=backend)
    out.backward(torch.ones_like(out))
    return [out.detach(), query.grad, key.grad, value.grad, bias.grad]


if __name__ == "__main__":
    if not REGISTRATION_PACKAGES:
        sys.exit("the installed xmorpher-kernels declares no registration extra")
    installed = [name for name in REGISTRATION_PACKAGES if importlib.util.find_spec(name) is not None]
    if installed:
        sys.exit(f"the core install brought packages of the registration extra: {installed}")

    import xmorpher_kernels

    cpu = xmorpher_kernels.available_backends()["cpu"]
    if not cpu.available:
        sys.exit(f"the cpu backend did not load with the core dependencies: {cpu.reason}")
    generator = torch.Generator().manual_seed(0)
    shape = (2, 5, 4, 3, 2, 8)  # a volume that is no multiple of the window
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    inputs.append(torch.randn(2, 7, 7, 7, generator=generator, dtype=torch.float64))
    fused, reference = forward_backward("cpu", inputs), forward_backward("reference", inputs)
    for name, a, b in zip(("output", "query grad", "key grad", "value grad", "bias grad"), fused, reference):
        if not torch.allclose(a, b, rtol=1e-9, atol=1e-9):
            sys.exit(f"cpu and reference backends differ in the {name}: max |difference| {float((a - b).abs().max())}")

    loaded = sorted(name for name in sys.modules if name.split(".")[0] in REGISTRATION_PACKAGES)
    if loaded:
        sys.exit(f"importing and running xmorpher_kernels loaded modules of the registration extra: {loaded}")
    try:
        import xmorpher  # noqa: F401
    except ModuleNotFoundError as error:
        if "xmorpher-kernels[registration]" not in str(error):
            sys.exit(f"import xmorpher failed without naming the registration extra: {error}")
    else:
        sys.exit("import xmorpher worked without the registration extra")
    print(f"core install (torch {torch.__version__}, no registration extra): the op runs forward and backward "
          "(cpu = reference) without loading the extra's packages, and import xmorpher names the extra")
