"""XMorpher (Shi et al., MICCAI 2022): dual U-shaped transformer for deformable registration.

Two branches with shared weights, one for the moving and one for the fixed volume, each a
U-net of window transformer blocks; at every block the branches exchange information through a
cross attention transformer (CAT) block applied in both directions with the same parameters.
Attention is ``xmorpher_kernels.window_cross_attention`` (base window 2, searching window 6).
``fusion="concat"`` is the paper's no-cross ablation: one branch that sees the moving and fixed
volumes concatenated along channels, every block attending within it.

Layout (``fusion="cross"``): the two branches travel stacked along the batch axis,
``[moving; fixed]`` of size 2B, so that one call of each layer serves both, and a fusion step is
one block call whose context is the same tensor with its halves swapped (both streams updated
simultaneously, from the previous values of both). Tokens are channels-last ``(N, D, H, W, C)``.

Sizes: any input size. The patch embedding zero-pads the volume at the far end up to a
multiple of the patch size, each merging step zero-pads an odd token grid by one, each
expanding step crops its output to the skip connection's size, and the head crops the flow to
the input size. Attention runs on the true token grid, partial windows handled by the op's
masking. Nothing is resampled.

Differences from the authors' code (github Solemoon/XMorpher), on purpose:
* batch > 1 works (theirs refuses it in the window area partition);
* all 27 sub-windows of the searching window take part (theirs writes sub-window 21 twice and
  leaves 20 at zero);
* keys outside the volume are masked out of the softmax by default (``border="mask"``); theirs
  zero-pads the features, which after projection become the k/v biases. ``border=
  "zeros-before-projection"`` reproduces that, with gradients reaching the biases;
* the key/value stream is layer-normalised as well as the query stream, by the block's one
  attention LayerNorm (the paper's figure shows LN before both projections; their code
  normalises only the query stream);
* the decoder crops to the skip size instead of trilinearly resampling when sizes disagree;
* their fusion loop refers to an undefined name; here both directions are computed from the
  same inputs and assigned together, as the paper describes;
* the unused skip projection of their deepest decoder stage is not created;
* the flow convolution starts near zero (N(0, 1e-5) weights, zero bias) so training starts at
  the identity; the warp lives in ``xmorpher.framework`` (voxel-centred, no half-voxel shift).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from xmorpher_kernels import window_cross_attention

from .framework import integrate_velocity

__all__ = [
    "XMorpherConfig",
    "XMorpher",
    "CrossAttentionBlock",
    "Mlp",
    "DropPath",
    "PatchEmbed",
    "PatchMerging",
    "PatchExpanding",
    "TransformerStage",
    "TransformerUNet",
    "FlowHead",
    "BORDER_MODES",
    "FUSION_MODES",
]

BORDER_MODES = ("mask", "zeros-before-projection")
FUSION_MODES = ("cross", "concat")


@dataclass(frozen=True)
class XMorpherConfig:
    """Hyper-parameters of XMorpher; the defaults are the paper's configuration (~15 M parameters).

    Attributes:
        in_chans: channels of each input volume.
        patch_size: edge of the cubic patch embedding (tokens are 1/patch_size of the volume).
        embed_dim: channels of the first stage; stage i has ``embed_dim * 2**i``.
        depths: fusion steps (CAT block applications in both directions) per encoder stage; the
            decoder mirrors them.
        num_heads: attention heads per stage (head_dim = stage channels / heads, 16 in the paper).
        window_size: base window edge, in tokens.
        search_size: searching window edge, in tokens (3 x window in the paper).
        mlp_ratio: hidden width of the block MLP relative to the stage channels.
        qkv_bias: biases in the query and key/value projections.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over the encoder blocks;
            the decoder stage i reuses the rates of encoder stage i.
        rel_pos_bias: learn a relative position bias per block.
        border: ``"mask"`` drops keys outside the volume from the softmax; ``"zeros-before-
            projection"`` gives them the key/value of a zero feature (the projection biases).
        head_channels: channels between the head's transposed convolution and the flow convolution.
        diffeomorphic: read the head's output as a stationary velocity field and integrate it by
            scaling and squaring.
        integration_steps: squaring steps of the diffeomorphic mode.
        fusion: how the moving and fixed volumes meet. ``"cross"``: two streams with shared
            weights exchanging information through CAT blocks (XMorpher). ``"concat"``: one stream
            of the pair concatenated along channels, self attention only (the paper's no-cross
            ablation; same parameter names, the embedding sees ``2 * in_chans`` channels and the
            head ``embed_dim`` instead of ``2 * embed_dim``).
    """

    in_chans: int = 1
    patch_size: int = 4
    embed_dim: int = 48
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 2
    search_size: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.2
    rel_pos_bias: bool = False
    border: str = "mask"
    head_channels: int = 24
    diffeomorphic: bool = False
    integration_steps: int = 7
    fusion: str = "cross"

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"depths and num_heads need one entry per stage, got {self.depths} and {self.num_heads}")
        for stage, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**stage
            if heads < 1 or dim % heads:
                raise ValueError(f"stage {stage}: {dim} channels do not split into {heads} heads")
        if self.border not in BORDER_MODES:
            raise ValueError(f"border must be one of {BORDER_MODES}, got {self.border!r}")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        if self.search_size < self.window_size or self.window_size < 1:
            raise ValueError(f"need 1 <= window_size <= search_size, got {self.window_size} and {self.search_size}")
        if self.patch_size < 1 or self.in_chans < 1 or self.embed_dim < 1:
            raise ValueError("patch_size, in_chans and embed_dim must be positive")

    def stage_dims(self) -> List[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    def drop_path_rates(self) -> List[List[float]]:
        """Per stage, the stochastic depth rate of each block (linear over all encoder blocks)."""
        count = sum(self.depths)
        rates = [self.drop_path_rate * i / max(count - 1, 1) for i in range(count)]
        bounds = [sum(self.depths[:i]) for i in range(len(self.depths) + 1)]
        return [rates[bounds[i] : bounds[i + 1]] for i in range(len(self.depths))]


def resolve_config(config_type: type, config: Optional[object], overrides: dict) -> object:
    """``config`` (default: the type's defaults) with ``overrides`` replacing fields by name."""
    config = config_type() if config is None else config
    if not isinstance(config, config_type):
        raise TypeError(f"config must be a {config_type.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples while training."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Mlp(nn.Module):
    """Two-layer MLP of the transformer block."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttentionBlock(nn.Module):
    """The CAT block: queries from ``x`` (base windows), keys and values from ``context``.

    ``x + proj(W-MCA(LN(x), LN(context)))``, then ``+ MLP(LN(.))``, both residual branches under
    stochastic depth. One LayerNorm serves both inputs (the paper puts "a LayerNorm before each
    W-MCA"), which lets :meth:`exchange` normalise and project the two streams once and swap
    the projected keys and values instead of re-normalising a swapped copy. With ``context is x``
    it is a plain window self-attention block (``fusion="concat"``).

    Args:
        dim: token channels.
        num_heads: attention heads (``dim`` must divide evenly).
        window_size, search_size: base and searching window edges, in tokens.
        mlp_ratio: MLP hidden width relative to ``dim``.
        qkv_bias: biases in the q and k/v projections (with ``border="zeros-before-projection"``
            they are the key and value of the padding).
        drop_path: stochastic depth rate of both residual branches.
        rel_pos_bias: learn a ``(heads, s+w-1, s+w-1, s+w-1)`` relative position bias.
        border: ``"mask"`` or ``"zeros-before-projection"`` (see :class:`XMorpherConfig`).
        attention_backend: backend of ``window_cross_attention`` ("auto", "cpu", "reference", ...).
        norm_layer, act_layer: normalisation and activation classes.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int = 2,
        search_size: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        rel_pos_bias: bool = False,
        border: str = "mask",
        attention_backend: str = "auto",
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} does not split into {num_heads} heads")
        if border not in BORDER_MODES:
            raise ValueError(f"border must be one of {BORDER_MODES}, got {border!r}")
        self.dim, self.num_heads = dim, num_heads
        self.window_size, self.search_size = window_size, search_size
        self.border = border
        self.attention_backend = attention_backend
        self.norm_attn = norm_layer(dim)
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key_value = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        extent = search_size + window_size - 1
        self.rel_pos_bias = (
            nn.Parameter(torch.zeros(num_heads, extent, extent, extent).normal_(std=0.02)) if rel_pos_bias else None
        )
        self.drop_path = DropPath(drop_path)
        self.norm_mlp = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)

    def _attend(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        """W-MCA on projected tokens: query (N, D, H, W, C), key_value (N, D, H, W, 2C) -> (N, D, H, W, C)."""
        heads, head_dim = self.num_heads, self.dim // self.num_heads
        key, value = key_value.chunk(2, dim=-1)
        pad_key = pad_value = None
        padding = "mask"
        if self.border == "zeros-before-projection":
            padding = "constant"
            bias = self.key_value.bias
            if bias is not None:
                pad_key, pad_value = bias.to(query.dtype).view(2, heads, head_dim).unbind(0)
        # Under autocast the projections come out in half precision while parameters stay fp32;
        # the op wants one dtype (the casts are differentiable, so gradients reach the parameters).
        rel_pos_bias = None if self.rel_pos_bias is None else self.rel_pos_bias.to(query.dtype)
        out = window_cross_attention(
            query.unflatten(-1, (heads, head_dim)),
            key.unflatten(-1, (heads, head_dim)),
            value.unflatten(-1, (heads, head_dim)),
            self.window_size,
            self.search_size,
            rel_pos_bias=rel_pos_bias,
            padding=padding,
            pad_key=pad_key,
            pad_value=pad_value,
            backend=self.attention_backend,
        )
        return self.proj(out.flatten(-2))

    def _residuals(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(attention)
        return x + self.drop_path(self.mlp(self.norm_mlp(x)))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Update ``x`` (N, D, H, W, C) with attention to ``context`` of the same shape."""
        if x.shape != context.shape:
            raise ValueError(f"x and context differ in shape: {tuple(x.shape)} vs {tuple(context.shape)}")
        normed = self.norm_attn(x)
        normed_context = normed if context is x else self.norm_attn(context)
        return self._residuals(x, self._attend(self.query(normed), self.key_value(normed_context)))

    def exchange(self, streams: torch.Tensor) -> torch.Tensor:
        """One fusion step on two streams stacked along the batch, ``[a; b]`` (2B, D, H, W, C).

        Returns ``[block(a, b); block(b, a)]``: both directions with the same parameters, each
        from the previous values of both streams.
        """
        if streams.shape[0] % 2:
            raise ValueError(f"exchange needs two streams stacked along the batch, got batch {streams.shape[0]}")
        normed = self.norm_attn(streams)
        swapped_key_value = self.key_value(normed).roll(streams.shape[0] // 2, dims=0)
        return self._residuals(streams, self._attend(self.query(normed), swapped_key_value))


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 4, 1, 2, 3)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 4, 1)


def _pad_to_multiple(volume: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (N, C, D, H, W) volume at the far end of each axis to a multiple of ``multiple``."""
    pads: List[int] = []
    for size in reversed(volume.shape[2:]):
        pads += [0, -size % multiple]
    return F.pad(volume, pads) if any(pads) else volume


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch``^3 patches to ``dim``-channel tokens: (N, C, D, H, W) -> (N, d, h, w, dim).

    The volume is zero-padded to a multiple of the patch, so ``d = ceil(D / patch)``.
    """

    def __init__(self, in_chans: int, dim: int, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return _channels_last(self.proj(_pad_to_multiple(volume, self.patch)))


class PatchMerging(nn.Module):
    """Halve the token grid, double the channels: strided 2x2x2 convolution then norm.

    An odd grid is zero-padded by one token first, so ``(d, h, w) -> ceil(/2)``.
    """

    def __init__(self, dim: int, norm_layer: Type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.reduction = nn.Conv3d(dim, 2 * dim, kernel_size=2, stride=2)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_channels_last(self.reduction(_pad_to_multiple(_channels_first(x), 2))))


class PatchExpanding(nn.Module):
    """Double the token grid, halve the channels: 2x2x2 transposed convolution, crop to ``size``, norm."""

    def __init__(self, dim: int, norm_layer: Type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.expansion = nn.ConvTranspose3d(dim, dim // 2, kernel_size=2, stride=2)
        self.norm = norm_layer(dim // 2)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = _channels_last(self.expansion(_channels_first(x)))
        return self.norm(x[:, : size[0], : size[1], : size[2]])


class TransformerStage(nn.Module):
    """A sequence of blocks at one resolution.

    With ``cross=True`` the input holds the two streams stacked along the batch, ``[a; b]``; every
    block updates ``a`` from ``(a, b)`` and ``b`` from ``(b, a)`` in one call (shared parameters,
    simultaneous update). With ``cross=False`` every block is self attention.
    """

    def __init__(self, blocks: Sequence[CrossAttentionBlock], cross: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.cross = cross

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block.exchange(x) if self.cross else block(x, x)
        return x


class TransformerUNet(nn.Module):
    """The U-shaped body on tokens: encoder stages with merging, decoder stages with expanding,
    skip connections concatenated then projected back (a linear layer). (N, d, h, w, C) in and out.

    Args:
        config: stage layout, windows, MLP, stochastic depth, border, and fusion: ``"cross"``
            attends across the two streams stacked along the batch, ``"concat"`` within one stream
            (see :class:`XMorpherConfig`).
        attention_backend: backend of ``window_cross_attention``.
        norm_layer, act_layer: normalisation and activation classes.
    """

    def __init__(
        self,
        config: XMorpherConfig,
        *,
        attention_backend: str = "auto",
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        dims, rates = config.stage_dims(), config.drop_path_rates()
        last = len(dims) - 1

        def stage(i: int) -> TransformerStage:
            blocks = [
                CrossAttentionBlock(
                    dims[i],
                    config.num_heads[i],
                    window_size=config.window_size,
                    search_size=config.search_size,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    drop_path=rate,
                    rel_pos_bias=config.rel_pos_bias,
                    border=config.border,
                    attention_backend=attention_backend,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                )
                for rate in rates[i]
            ]
            return TransformerStage(blocks, cross=config.fusion == "cross")

        self.encoder = nn.ModuleList(stage(i) for i in range(len(dims)))
        self.merging = nn.ModuleList(PatchMerging(dims[i], norm_layer) for i in range(last))
        self.bottleneck_norm = norm_layer(dims[last])
        # Decoder modules are indexed by the resolution they work at (stage i), like the encoder's.
        self.decoder = nn.ModuleList(stage(i) for i in range(len(dims)))
        self.expanding = nn.ModuleList(PatchExpanding(dims[i + 1], norm_layer) for i in range(last))
        self.skip_proj = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if i < len(self.merging):
                skips.append(x)
                x = self.merging[i](x)
        x = self.decoder[-1](self.bottleneck_norm(x))
        for i in reversed(range(len(skips))):
            skip = skips[i]
            x = self.expanding[i](x, skip.shape[1:4])
            x = self.skip_proj[i](torch.cat([x, skip], dim=-1))
            x = self.decoder[i](x)
        return x


class FlowHead(nn.Module):
    """Tokens (N, d, h, w, C) to a full-resolution field (N, 3, D, H, W).

    Norm, a ``patch``-strided transposed convolution back to voxels, crop to the input size, and a
    3x3x3 convolution to 3 channels whose weights start near zero (N(0, 1e-5), zero bias), so the
    untrained network predicts an almost-zero field.
    """

    def __init__(self, dim: int, hidden: int = 24, patch: int = 4, norm_layer: Type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(dim)
        self.unpatch = nn.ConvTranspose3d(dim, hidden, kernel_size=patch, stride=patch)
        self.flow = nn.Conv3d(hidden, 3, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, tokens: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = self.unpatch(_channels_first(self.norm(tokens)))
        return self.flow(x[:, :, : size[0], : size[1], : size[2]])


def init_transformer_weights(module: nn.Module) -> None:
    """Swin-style initialisation: truncated-normal(0.02) linear weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_pair(moving: torch.Tensor, fixed: torch.Tensor, in_chans: int) -> None:
    """Raise unless moving and fixed are (B, in_chans, D, H, W) of one shape, dtype and device."""
    if moving.dim() != 5 or moving.shape != fixed.shape or moving.shape[1] != in_chans:
        raise ValueError(
            f"expected moving and fixed of one shape (B, {in_chans}, D, H, W), got {tuple(moving.shape)} and {tuple(fixed.shape)}"
        )
    if moving.dtype != fixed.dtype or moving.device != fixed.device:
        raise ValueError("moving and fixed must share dtype and device")


class XMorpher(nn.Module):
    """XMorpher: ``model(moving, fixed)`` -> displacement ``(B, 3, D, H, W)`` in voxels.

    Inputs are ``(B, in_chans, D, H, W)`` of any size. The displacement maps fixed-space voxels
    into the moving volume: ``xmorpher.framework.warp(moving, flow)`` is aligned with ``fixed``.
    ``XMorpherConfig.fusion`` chooses XMorpher itself or its no-cross ablation.

    Args:
        config: hyper-parameters; default the paper's (:class:`XMorpherConfig`).
        attention_backend: backend of ``window_cross_attention`` in every block.
        norm_layer, act_layer: normalisation and activation classes.
        **overrides: fields of ``config`` to replace, e.g. ``XMorpher(embed_dim=24, depths=(1, 1))``.
    """

    def __init__(
        self,
        config: Optional[XMorpherConfig] = None,
        *,
        attention_backend: str = "auto",
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        **overrides: object,
    ) -> None:
        super().__init__()
        self.config: XMorpherConfig = resolve_config(XMorpherConfig, config, overrides)
        c = self.config
        # "cross" embeds each volume on its own and the head reads both streams' channels;
        # "concat" embeds the channel-concatenated pair and the head reads its one stream
        cross = c.fusion == "cross"
        self.patch_embed = PatchEmbed(c.in_chans if cross else 2 * c.in_chans, c.embed_dim, c.patch_size)
        self.body = TransformerUNet(c, attention_backend=attention_backend, norm_layer=norm_layer, act_layer=act_layer)
        self.head = FlowHead(2 * c.embed_dim if cross else c.embed_dim, c.head_channels, c.patch_size, norm_layer)
        self.body.apply(init_transformer_weights)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_pair(moving, fixed, self.config.in_chans)
        if self.config.fusion == "cross":
            batch = moving.shape[0]
            streams = self.body(self.patch_embed(torch.cat([moving, fixed], dim=0)))
            tokens = torch.cat([streams[:batch], streams[batch:]], dim=-1)
        else:
            tokens = self.body(self.patch_embed(torch.cat([moving, fixed], dim=1)))
        flow = self.head(tokens, moving.shape[2:])
        if self.config.diffeomorphic:
            flow = integrate_velocity(flow, self.config.integration_steps)
        return flow
