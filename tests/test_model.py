"""Tests of the registration networks: the paper's configuration, forward and backward of every
model at odd sizes, the CAT block against the reference backend, and its border modes, the
registry of model variants."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from xmorpher import (
    CrossAttentionBlock,
    VoxelMorph,
    XMorpher,
    XMorpherConfig,
    XMorpherNoCross,
    build_model,
    diffusion_loss,
    integrate_velocity,
    model_names,
    ncc_loss,
    warp,
)

# Small transformer configuration: all four stages, one fusion step each.
TINY = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), head_channels=4)
TINY_VOXELMORPH = dict(encoder_channels=(4, 8, 8, 8), decoder_channels=(8, 8, 8, 8, 8, 4, 4))


def _tiny(name: str, **overrides):
    return build_model(name, **(TINY_VOXELMORPH if name == "voxelmorph" else TINY), **overrides)


def _amplify_flow(model, factor: float = 1e4) -> None:
    """Scale the near-zero initial flow convolution so that outputs are far from zero."""
    flow_conv = model.flow if isinstance(model, VoxelMorph) else model.head.flow
    with torch.no_grad():
        flow_conv.weight.mul_(factor)


def _forward_backward(model, moving, fixed):
    flow = model(moving, fixed)
    loss = ncc_loss(fixed, warp(moving, flow)) + diffusion_loss(flow)
    loss.backward()
    return flow


def _check_gradients(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


def test_paper_configuration_and_parameter_count():
    model = XMorpher()
    c = model.config
    assert (c.patch_size, c.embed_dim, c.depths, c.num_heads) == (4, 48, (2, 2, 6, 2), (3, 6, 12, 24))
    assert (c.window_size, c.search_size, c.mlp_ratio, c.drop_path_rate) == (2, 6, 4.0, 0.2)
    assert [d // h for d, h in zip(c.stage_dims(), c.num_heads)] == [16, 16, 16, 16]
    blocks = [m for m in model.modules() if isinstance(m, CrossAttentionBlock)]
    assert len(blocks) == 2 * sum(c.depths)
    assert max(b.drop_path.rate for b in blocks) == pytest.approx(0.2)
    counts = {name: sum(p.numel() for p in build_model(name).parameters()) for name in model_names()}
    print("parameters:", counts)
    assert 14.5e6 < counts["xmorpher"] < 15.5e6
    assert counts["voxelmorph"] < 0.5e6


def test_paper_configuration_forward_backward_odd_size():
    torch.manual_seed(0)
    model = XMorpher(attention_backend="cpu").train()
    moving, fixed = torch.rand(2, 1, 45, 38, 29), torch.rand(2, 1, 45, 38, 29)
    flow = _forward_backward(model, moving, fixed)
    assert flow.shape == (2, 3, 45, 38, 29)
    assert flow.abs().max() < 1e-2  # the head starts near the identity
    _check_gradients(model)


@pytest.mark.parametrize("name", ["xmorpher", "xmorpher-nocross", "voxelmorph"])
@pytest.mark.parametrize("size", [(72, 64, 56), (37, 22, 19)])
def test_every_model_forward_backward_odd_sizes(name, size):
    torch.manual_seed(0)
    model = _tiny(name).train()
    moving, fixed = torch.rand(2, 1, *size), torch.rand(2, 1, *size)
    flow = _forward_backward(model, moving, fixed)
    assert flow.shape == (2, 3, *size)
    assert torch.isfinite(flow).all()
    _check_gradients(model)


@pytest.mark.parametrize("name", ["xmorpher", "xmorpher-nocross", "voxelmorph"])
def test_batch_items_are_independent(name):
    """Each pair's flow is the same alone or in a batch (catches streams mixed across the batch)."""
    torch.manual_seed(0)
    model = _tiny(name).eval()
    moving, fixed = torch.rand(3, 1, 13, 10, 9), torch.rand(3, 1, 13, 10, 9)
    _amplify_flow(model)
    with torch.no_grad():
        batched = model(moving, fixed)
        single = torch.cat([model(moving[i : i + 1], fixed[i : i + 1]) for i in range(3)])
    assert batched.abs().mean() > 1e-3
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_moving_and_fixed_play_different_roles():
    torch.manual_seed(0)
    model = _tiny("xmorpher").eval()
    a, b = torch.rand(1, 1, 12, 12, 12), torch.rand(1, 1, 12, 12, 12)
    with torch.no_grad():
        assert not torch.allclose(model(a, b), model(b, a))


def test_exchange_is_both_directions_with_shared_parameters(generator):
    block = CrossAttentionBlock(16, 2, attention_backend="reference").double()
    a = torch.randn(2, 5, 4, 3, 16, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 5, 4, 3, 16, generator=generator, dtype=torch.float64)
    out = block.exchange(torch.cat([a, b]))
    torch.testing.assert_close(out, torch.cat([block(a, b), block(b, a)]))


@pytest.mark.parametrize("border", ["mask", "zeros-before-projection"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cat_block_cpu_backend_equals_reference(border, dtype, generator):
    torch.manual_seed(0)
    reference = CrossAttentionBlock(32, 2, rel_pos_bias=True, border=border, attention_backend="reference").to(dtype)
    fused = CrossAttentionBlock(32, 2, rel_pos_bias=True, border=border, attention_backend="cpu").to(dtype)
    fused.load_state_dict(reference.state_dict())
    with torch.no_grad():  # non-zero biases, so that the padding's key and value are not zero
        for module in (reference, fused):
            module.key_value.bias.copy_(torch.linspace(-1, 1, 64, dtype=dtype))
    x = torch.randn(2, 5, 7, 3, 32, generator=generator, dtype=dtype)
    context = torch.randn(2, 5, 7, 3, 32, generator=generator, dtype=dtype)
    outputs, grads = [], []
    for block in (reference, fused):
        xi, ci = x.clone().requires_grad_(), context.clone().requires_grad_()
        out = block(xi, ci)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([xi.grad, ci.grad] + [p.grad for p in block.parameters()])
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs[1], outputs[0], **tol)
    for fused_grad, reference_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused_grad, reference_grad, **tol)


@pytest.mark.parametrize("border", ["mask", "zeros-before-projection"])
def test_cat_block_under_autocast(border, generator):
    """Mixed precision: half-precision projections with fp32 bias parameters reach the op in one
    dtype, and gradients still reach those fp32 parameters."""
    block = CrossAttentionBlock(32, 2, rel_pos_bias=True, border=border, attention_backend="auto")
    x = torch.randn(2, 4, 5, 3, 32, generator=generator)
    context = torch.randn(2, 4, 5, 3, 32, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, context)
    assert torch.isfinite(out.float()).all()
    out.float().square().sum().backward()
    assert block.rel_pos_bias.grad is not None and block.rel_pos_bias.grad.dtype == torch.float32
    assert torch.isfinite(block.rel_pos_bias.grad).all() and block.rel_pos_bias.grad.abs().sum() > 0
    if border == "zeros-before-projection":
        assert block.key_value.bias.grad.abs().sum() > 0


def test_zeros_before_projection_equals_zero_padding_the_features(generator):
    """``border="zeros-before-projection"`` is the original design: zero-pad the (normalised)
    features, then project. Check against doing exactly that on a larger volume."""
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 2, border="zeros-before-projection", attention_backend="reference").double()
    with torch.no_grad():
        block.key_value.bias.normal_()
    x = torch.randn(1, 5, 3, 4, 16, generator=generator, dtype=torch.float64)
    context = torch.randn(1, 5, 3, 4, 16, generator=generator, dtype=torch.float64)
    out = block(x, context)
    grad_bias = torch.autograd.grad(out.square().sum(), block.key_value.bias)[0]
    assert grad_bias.abs().sum() > 0

    # Zero tokens normalise to the LayerNorm bias, zero here, so they project to the k/v bias.
    # Pad by a whole window (2) in front, keeping the windows aligned, and by 4 behind, so
    # that every key box of the original windows lies inside the padded volume.
    padded = CrossAttentionBlock(16, 2, border="mask", attention_backend="reference").double()
    padded.load_state_dict(block.state_dict())
    pad = (0, 0, 2, 4, 2, 4, 2, 4)
    out_padded = padded(F.pad(x, pad), F.pad(context, pad))[:, 2:7, 2:5, 2:6]
    torch.testing.assert_close(out, out_padded)
    grad_bias_padded = torch.autograd.grad(out_padded.square().sum(), padded.key_value.bias)[0]
    torch.testing.assert_close(grad_bias, grad_bias_padded)


def test_mask_border_differs_from_zero_padding(generator):
    block = CrossAttentionBlock(16, 2, attention_backend="reference").double()
    other = CrossAttentionBlock(16, 2, border="zeros-before-projection", attention_backend="reference").double()
    other.load_state_dict(block.state_dict())
    x = torch.randn(1, 4, 4, 4, 16, generator=generator, dtype=torch.float64)
    assert not torch.allclose(block(x, x), other(x, x))


@pytest.mark.parametrize("name", ["xmorpher", "voxelmorph"])
def test_diffeomorphic_mode_integrates_the_output(name):
    torch.manual_seed(0)
    model = _tiny(name, diffeomorphic=True).eval()
    plain = _tiny(name).eval()
    moving, fixed = torch.rand(1, 1, 12, 10, 9), torch.rand(1, 1, 12, 10, 9)
    _amplify_flow(model)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(moving, fixed), integrate_velocity(plain(moving, fixed), 7))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["xmorpher", "xmorpher-nocross", "voxelmorph"])
def test_other_dtypes(name, dtype):
    model = _tiny(name).to(dtype)
    moving = torch.rand(1, 1, 11, 9, 10, dtype=dtype)
    flow = model(moving, moving.clone())
    assert flow.dtype == dtype and torch.isfinite(flow).all()


def test_multichannel_inputs_and_overrides():
    config = XMorpherConfig(in_chans=2, **TINY)
    for model in (XMorpher(config), XMorpherNoCross(config), VoxelMorph(in_chans=2, **TINY_VOXELMORPH)):
        assert model(torch.rand(1, 2, 9, 9, 9), torch.rand(1, 2, 9, 9, 9)).shape == (1, 3, 9, 9, 9)
    assert XMorpher(config, embed_dim=16).config.embed_dim == 16


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_model("transmorph"),
        lambda: XMorpherConfig(embed_dim=8, num_heads=(3, 6, 12, 24)),
        lambda: XMorpherConfig(border="reflect"),
        lambda: XMorpherConfig(fusion="late"),
        lambda: XMorpherConfig(window_size=4, search_size=2),
        lambda: _tiny("xmorpher")(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9)),
        lambda: _tiny("xmorpher")(torch.rand(1, 2, 8, 8, 8), torch.rand(1, 2, 8, 8, 8)),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_nocross_ablation_is_xmorpher_with_concat_fusion():
    ablation, xmorpher = _tiny("xmorpher-nocross"), _tiny("xmorpher")
    assert type(ablation) is XMorpher and ablation.config == dataclasses.replace(xmorpher.config, fusion="concat")
    assert XMorpherNoCross(XMorpherConfig(**TINY)).config == ablation.config  # the variant's field over a given config
    stages = [*ablation.body.encoder, *ablation.body.decoder]
    assert not any(stage.cross for stage in stages) and all(stage.cross for stage in [*xmorpher.body.encoder, *xmorpher.body.decoder])
    # the same parameter names (checkpoints of the former class load); the embedding sees the pair's
    # channels and the head one stream's
    shapes, cross_shapes = ({k: v.shape for k, v in m.state_dict().items()} for m in (ablation, xmorpher))
    assert shapes.keys() == cross_shapes.keys()
    assert {k for k in shapes if shapes[k] != cross_shapes[k]} == {
        "patch_embed.proj.weight", "head.norm.weight", "head.norm.bias", "head.unpatch.weight"}
    assert shapes["patch_embed.proj.weight"][1] == 2 and shapes["head.norm.weight"] == (TINY["embed_dim"],)


def test_one_registry_names_the_models_everywhere():
    from xmorpher.cli import _parser
    from xmorpher.config import ModelConfig, load_config, option_table
    from xmorpher.errors import XMorpherError
    from xmorpher.factory import MODELS

    assert model_names() == list(MODELS) and {"xmorpher", "xmorpher-nocross", "voxelmorph"} <= set(MODELS)
    assert [f.name for f in dataclasses.fields(ModelConfig)] == ["name", "attention_backend", *map(option_table, MODELS)]
    for name, variant in MODELS.items():
        assert _parser().parse_args(["train", "--out", "run", "--model", name]).model == name
        assert load_config(None, [f"model.name={name}"]).model.options() == {}
        assert isinstance(_tiny(name), variant.model)
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--out", "run", "--model", "transmorph"])
    with pytest.raises(XMorpherError, match="xmorpher-nocross"):
        load_config(None, ["model.name=transmorph"])
