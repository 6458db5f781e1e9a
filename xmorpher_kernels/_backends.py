"""Backend registry and dispatcher of ``window_cross_attention``.

Each backend says whether it was built and which devices and dtypes it runs; ``backend="auto"``
walks them in order of preference (fastest first) and takes the first that can run the call. A
backend the user names either runs or raises, naming what it lacks and what would run instead;
there is never a silent switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _native, _triton
from ._checks import AttentionArgs
from .reference import reference_window_cross_attention


# A validated call bound to one backend: (query, key, value, rel_pos_bias, pad_key, pad_value) ->
# output. It holds the call's static options (geometry, scale, padding), never its tensors, so
# that ops.py can cache it per call signature.
Runner = Callable[..., torch.Tensor]


@dataclass
class Backend:
    """One implementation of the op.

    ``runner`` binds a validated call's static options into a Runner. ``unavailable`` returns why
    the backend is missing altogether (not built, no Triton, ...) or None; ``refuses`` returns why
    it cannot run one particular call (e.g. a head_dim limit) or None.
    """

    name: str
    devices: Tuple[str, ...]  # device types, or ("any",)
    dtypes: Tuple[torch.dtype, ...]
    runner: Callable[[AttentionArgs], Runner]
    unavailable: Callable[[], Optional[str]] = lambda: None
    refuses: Callable[[AttentionArgs], Optional[str]] = field(default=lambda args: None)
    # Devices on which backend="auto" may pick it (default: all of ``devices``); e.g. Triton's CPU
    # interpreter runs when named but is far too slow to be chosen automatically.
    auto_devices: Optional[Tuple[str, ...]] = None
    # Why backend="auto" should try the other fused backends first for this call (a slower path
    # of this one), or None. A demoted backend still comes before the reference.
    auto_demotion: Callable[[AttentionArgs], Optional[str]] = field(default=lambda args: None)

    def runs_on(self, device: str, auto: bool = False) -> bool:
        """Whether it takes tensors of this device type (when picked by "auto", if ``auto``)."""
        devices = self.auto_devices if auto and self.auto_devices is not None else self.devices
        return "any" in devices or device in devices

    def why_not(self, args: AttentionArgs) -> Optional[str]:
        """None when this backend can run the call, else the reason it cannot."""
        reason = self.unavailable()
        if reason is not None:
            return reason
        device = args.query.device.type
        if not self.runs_on(device):
            return f"it runs on {'/'.join(self.devices)} tensors, got {device}"
        if args.query.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"it supports dtypes {names}, got {str(args.query.dtype).replace('torch.', '')}"
        return self.refuses(args)


def op_runner(forward_op) -> Callable[[AttentionArgs], Runner]:
    """Runners of a forward op ``(query, key, value, window_size, search_size, scale,
    rel_pos_bias, pad_key, pad_value) -> (out, lse)``: padding="constant" means pad tensors are
    passed, a zero row (made once per call signature) for each the user left out."""

    def bind(args: AttentionArgs) -> Runner:
        window, search, scale = list(args.geometry.window), list(args.geometry.search), args.scale
        zeros = args.query.new_zeros((args.heads, args.head_dim)) if args.padding == "constant" else None

        def run(query, key, value, rel_pos_bias, pad_key, pad_value):
            if zeros is not None:
                pad_key = zeros if pad_key is None else pad_key
                pad_value = zeros if pad_value is None else pad_value
            return forward_op(query, key, value, window, search, scale, rel_pos_bias, pad_key, pad_value)[0]

        return run

    return bind


def reference_runner(args: AttentionArgs) -> Runner:
    geometry, scale, padding = args.geometry, args.scale, args.padding

    def run(query, key, value, rel_pos_bias, pad_key, pad_value):
        call = AttentionArgs(query, key, value, geometry, scale, rel_pos_bias, padding, pad_key, pad_value)
        return reference_window_cross_attention(call)

    return run


_REGISTRY: Dict[str, Backend] = {}
# Preference of backend="auto": fused GPU kernels, then the fused CPU kernels, then the reference.
AUTO_ORDER = ("cuda", "triton", "cpu", "reference")


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def backend_names() -> List[str]:
    return [name for name in AUTO_ORDER if name in _REGISTRY] + sorted(set(_REGISTRY) - set(AUTO_ORDER))


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    reason: Optional[str]  # why it is unavailable, when it is


def available_backends() -> Dict[str, BackendStatus]:
    """What was built: every backend with its devices and dtypes, or why it is missing."""
    statuses = {}
    for name in backend_names():
        backend = _REGISTRY[name]
        reason = backend.unavailable()
        statuses[name] = BackendStatus(name, reason is None, backend.devices, backend.dtypes, reason)
    return statuses


def select_backend(name: str, args: AttentionArgs) -> Backend:
    """The backend to run: the named one if it can, the first capable one for "auto"."""
    if not isinstance(name, str) or (name != "auto" and name not in _REGISTRY):
        raise ValueError(f"backend must be one of {('auto', *backend_names())}, got {name!r}")
    if name != "auto":
        backend = _REGISTRY[name]
        reason = backend.why_not(args)
        if reason is None:
            return backend
        capable = [n for n in backend_names() if _REGISTRY[n].why_not(args) is None]
        raise ValueError(
            f"backend {name!r} cannot run this call: {reason}. Backends that can: {', '.join(capable)}"
        )
    device = args.query.device.type
    for candidate in auto_candidates(args):
        backend = _REGISTRY[candidate]
        if backend.runs_on(device, auto=True) and backend.why_not(args) is None:
            return backend
    raise ValueError("no backend can run this call")  # unreachable: the reference runs everywhere


def auto_candidates(args: AttentionArgs) -> List[str]:
    """Backends in the order backend="auto" tries them for this call: AUTO_ORDER, except that a
    backend demoted for the call goes behind the other fused ones (the reference stays last)."""
    fused = [name for name in backend_names() if name != "reference"]
    ordered = sorted(fused, key=lambda name: _REGISTRY[name].auto_demotion(args) is not None)  # stable
    return ordered + (["reference"] if "reference" in _REGISTRY else [])


register_backend(
    Backend(
        name="reference",
        devices=("any",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        runner=reference_runner,
    )
)
register_backend(
    Backend(
        name="cpu",
        devices=("cpu",),
        dtypes=_native.CPU_DTYPES,
        runner=op_runner(_native.FORWARD_OP),
        unavailable=_native.cpu_unavailable,
    )
)
register_backend(
    Backend(
        name="cuda",
        devices=("cuda",),
        dtypes=_native.CUDA_DTYPES,
        runner=op_runner(_native.FORWARD_OP),
        unavailable=_native.cuda_unavailable,
        refuses=_native.cuda_refuses,
        auto_demotion=_native.cuda_auto_demotion,
    )
)
register_backend(
    Backend(
        name="triton",
        devices=_triton.TRITON_DEVICES,
        auto_devices=("cuda",),
        dtypes=_triton.TRITON_DTYPES,
        runner=op_runner(_triton.FORWARD_OP),
        unavailable=_triton.triton_unavailable,
        refuses=_triton.triton_refuses,
    )
)
