"""xmorpher_kernels: fused 3D window cross attention (the op of XMorpher) for PyTorch.

``window_cross_attention`` is one autograd op with a plain PyTorch reference and fused CPU C++,
Triton and CUDA C++ backends; ``available_backends()`` says which were built.
"""

from ._backends import available_backends
from ._geometry import WindowGeometry
from .ops import window_cross_attention

__all__ = ["window_cross_attention", "available_backends", "WindowGeometry"]
__version__ = "0.1.0"
