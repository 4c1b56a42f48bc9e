"""ControlNet residuals under TeaCache: refused where they would count twice, exact where they cannot.

Flux, QwenImage and SD3 add a ControlNet's residuals to the hidden states between blocks, in their own
forward. On a skipped call the blocks pass through but the forward still adds this call's residuals on
top of a cached residual that already holds the computed call's: they would count twice. The expected
output is computed by hand: two calls with identical inputs must give identical outputs, whether the
second is computed or skipped. Each ControlNet is a tiny real diffusers ControlNet model whose
zero-initialised output projections are re-drawn (a trained one's are not zero), so its residuals are
not zero.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffusers
from calibrate.tiny import build_tiny_pipeline, build_tiny_transformer, tiny_latents, tiny_transformer_kwargs
from runtime import Coefficients, DecisionDefaults, TeaCache, UnsupportedModelError, adapter_for
from runtime import controlnet

FAMILIES = ("flux", "qwen_image", "sd3")


def coefficients(transformer, thresh):
    return Coefficients(
        model="test_controlnet",
        transformer_class=type(transformer).__name__,
        signal="modulated_input",
        coefficients=(1.0, 0.0),
        x_range=None,
        defaults=DecisionDefaults(rel_l1_thresh=thresh),
        provenance={"kind": "published", "source": "tests"},
    )


def _redraw_zero_projections(model: nn.Module, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.3)
    return model.eval()


def _grid_ids(height, width):
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def _controlnet(family):
    """A tiny real ControlNet of ``family`` (seeded), matching calibrate.tiny's transformer sizes."""
    torch.manual_seed(1)
    if family == "flux":
        model = diffusers.FluxControlNetModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
    elif family == "qwen_image":
        model = diffusers.QwenImageControlNetModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
        )
    else:
        model = diffusers.SD3ControlNetModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=16,
        )
    return _redraw_zero_projections(model, seed=2)


def _transformer(family):
    return build_tiny_transformer("sd3") if family == "sd3" else build_tiny_pipeline(family).transformer


def _inputs(family):
    """Transformer kwargs and the ControlNet's residuals for them, as the family's ControlNet pipeline passes."""
    gen = torch.Generator().manual_seed(0)
    if family == "sd3":
        kwargs = tiny_transformer_kwargs("sd3", tiny_latents("sd3"), 0.5)
        cond = torch.randn(1, 4, 16, 16, generator=gen)
    elif family == "flux":
        kwargs = dict(hidden_states=torch.randn(1, 64, 16, generator=gen),
                      encoder_hidden_states=torch.randn(1, 8, 16, generator=gen),
                      pooled_projections=torch.randn(1, 8, generator=gen), timestep=torch.tensor([0.5]),
                      img_ids=_grid_ids(8, 8), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
                      return_dict=False)
        cond = torch.randn(1, 64, 16, generator=gen)
    else:
        kwargs = dict(hidden_states=torch.randn(1, 64, 16, generator=gen),
                      encoder_hidden_states=torch.randn(1, 8, 16, generator=gen),
                      encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=torch.tensor([0.5]),
                      img_shapes=[(1, 8, 8)], return_dict=False)
        cond = torch.randn(1, 64, 16, generator=gen)
    with torch.no_grad():
        samples = _controlnet(family)(controlnet_cond=cond, conditioning_scale=1.0, **kwargs)
    if family == "flux":
        return kwargs, {"controlnet_block_samples": samples[0], "controlnet_single_block_samples": samples[1]}
    if family == "qwen_image":
        return kwargs, {"controlnet_block_samples": samples[0]}
    return kwargs, {"block_controlnet_hidden_states": samples[0]}


def _call(transformer, kwargs):
    with torch.no_grad(), transformer.cache_context("cond") if hasattr(transformer, "cache_context") else _null():
        return transformer(**kwargs)[0]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("family", FAMILIES)
def test_the_residuals_change_the_output(family):
    """The residuals are not zero: without them the computed output differs (else the tests below prove nothing)."""
    transformer = _transformer(family)
    kwargs, control = _inputs(family)
    assert (_call(transformer, {**kwargs, **control}) - _call(transformer, kwargs)).abs().max() > 1e-3



@pytest.mark.parametrize("family", FAMILIES)
def test_teacache_never_returns_a_skipped_call_with_the_residuals_counted_twice(family):
    """Identical inputs twice: the skipped second call must equal the computed first, or be refused."""
    transformer = _transformer(family)
    kwargs, control = _inputs(family)
    cache = TeaCache.from_coefficients(coefficients(transformer, 10.0)).apply(transformer, num_inference_steps=8)
    try:
        first = _call(transformer, {**kwargs, **control})
        second = _call(transformer, {**kwargs, **control})
    except UnsupportedModelError as exc:
        assert "ControlNet" in str(exc)
        return
    finally:
        cache.remove()
    # Today the second call is skipped and adds the residuals a second time.
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_guard_refuses_a_call_with_residuals_before_any_state_changes(family):
    transformer = _transformer(family)
    kwargs, control = _inputs(family)
    reference = _call(transformer, kwargs)
    cache = TeaCache.from_coefficients(coefficients(transformer, 10.0)).apply(transformer, num_inference_steps=8)
    controlnet.guard(transformer)
    controlnet.guard(transformer)  # idempotent, so apply_teacache may call it too
    branch = "cond" if hasattr(transformer, "cache_context") else "default"
    try:
        first = _call(transformer, kwargs)  # no residuals: runs as without the guard
        with pytest.raises(UnsupportedModelError) as refused:
            _call(transformer, {**kwargs, **control})
        positional_none = {**kwargs, **{name: None for name in control}}
        second = _call(transformer, positional_none)  # None residuals are no residuals
        trace = cache.stats[branch].trace
    finally:
        controlnet.unguard(transformer)
        cache.remove()
    message = str(refused.value)
    assert type(transformer).__name__ in message and "ControlNet" in message and "cache.remove()" in message
    assert message.count(". ") == 0 and message.endswith(".")
    assert torch.equal(first, reference)
    # The refused call left no trace: the next call is the second of the generation, skipped (x = 0),
    # against the first call's residual, and gives the first call's output.
    assert [(r.step, r.computed) for r in trace] == [(0, True), (1, False)]
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)
    assert not controlnet.intercept.has_interceptor(transformer, controlnet.CONTROL)
    assert type(transformer) is getattr(diffusers, type(transformer).__name__)


def _controlnet_pipeline(family):
    base = build_tiny_pipeline(family if family != "sd3" else "sd3")
    components = {k: v for k, v in base.components.items()}
    cls = {"flux": diffusers.FluxControlNetPipeline, "qwen_image": diffusers.QwenImageControlNetPipeline,
           "sd3": diffusers.StableDiffusion3ControlNetPipeline}[family]
    if family == "sd3":
        components.update(image_encoder=None, feature_extractor=None)
    return cls(**components, controlnet=_controlnet(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_controlnet_pipeline_is_refused_in_one_sentence(family):
    pipe = _controlnet_pipeline(family)
    with pytest.raises(UnsupportedModelError) as refused:
        controlnet.refuse_controlnet_pipeline(pipe)
    message = str(refused.value)
    assert message.startswith(f"{type(pipe).__name__} has a ControlNet")
    assert message.count(". ") == 0 and message.endswith("without a ControlNet.")
    controlnet.refuse_controlnet_pipeline(build_tiny_pipeline(family))  # no ControlNet: nothing to refuse



def test_apply_refuses_a_controlnet_pipeline_and_registers_nothing():
    pipe = _controlnet_pipeline("flux")
    with pytest.raises(UnsupportedModelError, match="has a ControlNet"):
        TeaCache.from_coefficients(coefficients(pipe.transformer, 0.1)).apply(pipe)
    assert not hasattr(pipe.transformer, "_diffusers_hook") or pipe.transformer._diffusers_hook.get_hook("teacache") is None


@pytest.mark.parametrize("empty", [None, [], {}])
def test_empty_residuals_are_not_refused(empty):
    transformer = build_tiny_transformer("z_image")
    adapter = adapter_for(transformer)
    assert adapter.control_arguments == ("controlnet_block_samples",)
    assert controlnet.control_residuals_given(adapter, transformer, (), {"controlnet_block_samples": empty}) == []
    assert controlnet.control_residuals_given(adapter, transformer, (), {"controlnet_block_samples": {0: 1}}) == [
        "controlnet_block_samples"
    ]


def test_cosmos_residuals_go_into_the_blocks_and_are_cached_with_them():
    """Cosmos hands residuals into its blocks: a skipped call skips them too, no double count, no refusal."""
    import diffusers as d
    from calibrate.tiny import _tiny_config

    class_name, config = _tiny_config("cosmos")
    torch.manual_seed(0)
    transformer = getattr(d, class_name)(**config, controlnet_block_every_n=1).eval()
    kwargs = tiny_transformer_kwargs("cosmos", tiny_latents("cosmos"), 0.5)
    gen = torch.Generator().manual_seed(3)
    residuals = [torch.randn(1, 32, 32, generator=gen) for _ in transformer.transformer_blocks]
    with_control = {**kwargs, "block_controlnet_hidden_states": residuals}
    with torch.no_grad():
        plain = transformer(**kwargs)[0]
        reference = transformer(**with_control)[0]
    assert (reference - plain).abs().max() > 1e-3
    cache = TeaCache.from_coefficients(coefficients(transformer, 10.0)).apply(transformer, num_inference_steps=8)
    controlnet.guard(transformer)  # nothing to guard for Cosmos
    try:
        assert not controlnet.intercept.has_interceptor(transformer, controlnet.CONTROL)
        with torch.no_grad():
            outputs = [transformer(**with_control)[0] for _ in range(2)]
        trace = cache.stats["default"].trace
    finally:
        cache.remove()
    assert [r.computed for r in trace] == [True, False]
    assert torch.equal(outputs[0], reference)
    torch.testing.assert_close(outputs[1], reference, rtol=1e-5, atol=1e-5)
