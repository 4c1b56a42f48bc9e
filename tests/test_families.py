"""Every adapter family on a tiny random-init config of its real diffusers transformer class.

A bare sampling loop drives each transformer step by step, as its pipeline would (with
``cache_context("cond")`` where the class has ``CacheMixin``, without where it has none), and checks
what the runtime and the recorder do with it: threshold 0 and ``.remove()`` are bit-identical to no
cache, a high threshold computes fewer calls of the last block (counted on its attention), a skipped
call with unchanged inputs returns the computed output, the adapter's modulated input is the
tensor the first modulated block's attention receives, and the recorder's x is the runtime's x.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from calibrate.models import load_model
from calibrate.recipe import Recipe
from calibrate.recorder import TraceRecorder
from calibrate.tiny import (
    TINY_TRANSFORMERS,
    build_tiny_transformer,
    tiny_latents,
    tiny_transformer_class,
    tiny_transformer_kwargs,
)
from runtime import BlockCall, Coefficients, DecisionDefaults, TeaCache, adapter_for
from runtime.adapters import BlockLayout

STEPS = 6
ATTENTION_NAMES = ("attn", "attn1", "attention")


@pytest.fixture(scope="module")
def transformers():
    return {}


def transformer_of(transformers, family):
    if family not in transformers:
        transformers[family] = build_tiny_transformer(family)
    return transformers[family]


def coefficients(family, thresh=0.0):
    """p(x) = x: the accumulator sums the raw signal change."""
    return Coefficients(
        model=f"test_{family}",
        transformer_class=tiny_transformer_class(family),
        signal="modulated_input",
        coefficients=(1.0, 0.0),
        x_range=None,
        defaults=DecisionDefaults(rel_l1_thresh=thresh),
        provenance={"kind": "published", "source": "tests"},
    )


def has_cache_context(transformer):
    return hasattr(transformer, "cache_context")


def branch_of(transformer):
    return "cond" if has_cache_context(transformer) else "default"


def output_tensor(output):
    sample = output[0]
    return torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample


@torch.no_grad()
def sample(transformer, family, steps=STEPS):
    """A plain Euler loop over sigma 1 -> 0; returns every step's transformer output."""
    latents = tiny_latents(family)
    outputs = []
    for step in range(steps):
        sigma = 1.0 - step / steps
        context = transformer.cache_context("cond") if has_cache_context(transformer) else contextlib.nullcontext()
        with context:
            output = transformer(**tiny_transformer_kwargs(family, latents, sigma))
        if family == "z_image":
            assert isinstance(output[0], list)  # a list of per-sample tensors passes through unchanged
        velocity = output_tensor(output)
        outputs.append(velocity)
        latents = latents - velocity / steps
    return outputs


def first_attention(module):
    for name, child in module.named_modules():
        if name.split(".")[-1] in ATTENTION_NAMES:
            return child
    raise AssertionError(f"no attention module in {type(module).__name__}")


def assert_all_equal(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def references(transformers):
    return {}


def reference_of(transformers, references, family):
    if family not in references:
        references[family] = sample(transformer_of(transformers, family), family)
    return references[family]


@pytest.mark.parametrize("family", TINY_TRANSFORMERS)
def test_threshold_zero_is_bit_identical_and_remove_restores(transformers, references, family):
    transformer = transformer_of(transformers, family)
    reference = reference_of(transformers, references, family)
    cache = TeaCache.from_coefficients(coefficients(family, 0.0)).apply(transformer, num_inference_steps=STEPS)
    try:
        cached = sample(transformer, family)
        stats = cache.stats[branch_of(transformer)]
    finally:
        cache.remove()
    assert_all_equal(cached, reference)
    assert (stats.computed, stats.skipped) == (STEPS, 0)
    assert_all_equal(sample(transformer, family), reference)


@pytest.mark.parametrize("family", TINY_TRANSFORMERS)
def test_high_threshold_computes_fewer_calls_of_the_last_block(transformers, references, family):
    transformer = transformer_of(transformers, family)
    reference = reference_of(transformers, references, family)
    last_block = adapter_for(transformer).blocks(transformer)[-1][1]
    computed = [0]
    handle = first_attention(last_block).register_forward_hook(lambda *_: computed.__setitem__(0, computed[0] + 1))
    cache = TeaCache.from_coefficients(coefficients(family, 10.0)).apply(transformer, num_inference_steps=STEPS)
    try:
        cached = sample(transformer, family)
        stats = cache.stats[branch_of(transformer)]
    finally:
        cache.remove()
        handle.remove()
    assert stats.computed == computed[0]
    assert stats.computed + stats.skipped == STEPS
    assert computed[0] < STEPS
    assert [r.computed for r in stats.trace][0] and [r.computed for r in stats.trace][-1]
    # A skipped call changes the output, a computed one after it is the model's own again.
    skipped_steps = [r.step for r in stats.trace if not r.computed]
    assert not torch.equal(cached[skipped_steps[0]], reference[skipped_steps[0]])


@pytest.mark.parametrize("forecast", ["reuse", "output_linear"])
@pytest.mark.parametrize("family", TINY_TRANSFORMERS)
def test_a_skipped_call_with_unchanged_inputs_returns_the_computed_output(transformers, family, forecast):
    """The cached residual spans exactly the skipped blocks, on the image tokens the model keeps.

    Two calls with the same inputs: the first computes, the second (x = 0) is skipped and must give
    the computed output up to the rounding of ``input + (output - input)``. A residual taken on the
    wrong tokens of a joint stream, or a block left out of the span, breaks this. With ``output_linear``
    (one computed output: nothing to extrapolate) the skipped call returns that output itself, in the
    container the model returns.
    """
    transformer = transformer_of(transformers, family)
    kwargs = tiny_transformer_kwargs(family, tiny_latents(family), 0.5)
    cache = TeaCache.from_coefficients(coefficients(family, 10.0), forecast=forecast).apply(transformer, num_inference_steps=STEPS)
    try:
        with torch.no_grad():
            outputs = []
            for _ in range(2):
                context = transformer.cache_context("cond") if has_cache_context(transformer) else contextlib.nullcontext()
                with context:
                    outputs.append(output_tensor(transformer(**kwargs)))
        trace = cache.stats[branch_of(transformer)].trace
    finally:
        cache.remove()
    assert [r.computed for r in trace] == [True, False]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    if forecast == "output_linear":
        assert torch.equal(outputs[1], outputs[0])


@pytest.mark.parametrize("family", TINY_TRANSFORMERS)
def test_modulated_input_is_what_the_first_attention_receives(transformers, family):
    transformer = transformer_of(transformers, family)
    adapter = adapter_for(transformer)
    source = adapter.signal_source(transformer, "modulated_input")
    computed, received = [], []

    def on_block(module, args, kwargs):
        computed.append(adapter.modulated_input(BlockCall(module, args, kwargs)))

    def on_attention(module, args, kwargs):
        received.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handles = [
        source.module.register_forward_pre_hook(on_block, with_kwargs=True),
        first_attention(source.module).register_forward_pre_hook(on_attention, with_kwargs=True),
    ]
    try:
        sample(transformer, family, steps=2)
    finally:
        for handle in handles:
            handle.remove()
    assert len(computed) == len(received) == 2
    for mine, theirs in zip(computed, received):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine.to(theirs.dtype), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY_TRANSFORMERS)
def test_recorded_x_is_what_the_runtime_sees(transformers, family):
    transformer = transformer_of(transformers, family)
    branch = branch_of(transformer)

    def run():
        sample(transformer, family)
        transformer._diffusers_hook.reset_stateful_hooks()  # what a pipeline does when its call ends

    with TraceRecorder(transformer) as recorder:
        traces = recorder.run(run)
    assert list(traces) == [branch]
    recorded = traces[branch]
    cache = TeaCache.from_coefficients(coefficients(family, 0.0)).apply(transformer, num_inference_steps=STEPS)
    try:
        sample(transformer, family)
        runtime_x = [r.x for r in cache.stats[branch].trace]
    finally:
        cache.remove()
    torch.testing.assert_close(torch.tensor(runtime_x, dtype=torch.float32), torch.from_numpy(recorded["x"]), equal_nan=True, rtol=0, atol=0)
    # The stack residual is measured on the image tokens: finite from the second step on.
    assert torch.isfinite(torch.from_numpy(recorded["y_residual"][1:])).all()


@pytest.mark.parametrize(
    "image_tokens, expected",
    [("first", [[1.0], [2.0]]), ("last", [[2.0], [3.0]]), ("all", None)],
)
def test_block_layout_takes_the_residual_on_the_image_tokens(image_tokens, expected):
    joint = torch.arange(1.0, 4.0).reshape(1, 3, 1)  # three tokens of width 1
    if expected is None:
        stack_input = torch.zeros(1, 3, 1)
        assert torch.equal(BlockLayout(0, None, image_tokens).residual(joint, stack_input), joint)
        return
    stack_input = torch.zeros(1, 2, 1)
    assert torch.equal(BlockLayout(0, None, image_tokens).residual(joint, stack_input), torch.tensor([expected]))


def compose_model(name):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("record", overrides=[f"model={name}"])


@pytest.mark.parametrize("family", ("sd3", "chroma", "z_image"))  # the pipelines without a cache context
def test_tiny_pipeline_configs_record_what_the_runtime_sees(family):
    """conf/model/tiny_<family>.yaml builds its real pipeline offline; recorder x == runtime x there."""
    cfg = compose_model(f"tiny_{family}")
    loaded = load_model(cfg.model, "cpu", torch.float32)
    recipe = Recipe.from_config(cfg)
    transformer = loaded.pipe.transformer
    assert type(transformer).__name__ == tiny_transformer_class(family)
    reference = loaded.generate("a red fox", 0, recipe)
    with TraceRecorder(transformer) as recorder:
        traces = recorder.run(lambda: loaded.generate("a red fox", 0, recipe))
    assert set(traces) == {"default"}
    assert len(traces["default"]["x"]) == recipe.num_inference_steps
    with TeaCache.from_coefficients(coefficients(family, 0.0), rel_l1_thresh=0.0).apply(loaded.pipe) as cache:
        cached = loaded.generate("a red fox", 0, recipe)
    assert torch.equal(_images(cached), _images(reference))
    runtime_x = torch.tensor([r.x for r in cache.stats["default"].trace], dtype=torch.float32)
    torch.testing.assert_close(runtime_x, torch.from_numpy(traces["default"]["x"]), equal_nan=True, rtol=0, atol=0)


def _images(output):
    images = output[0]
    return torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images


# ------------------------------------------------- pipelines that run CFG outside any cache context


def test_sequential_cfg_without_context_names_the_pipelines_that_share_one_state():
    import diffusers

    from runtime.adapters import sequential_cfg_without_context

    def flagged(name):
        cls = getattr(diffusers, name)
        return sequential_cfg_without_context(cls.__new__(cls))

    # cond and uncond (or skip-layer) calls one after the other, no cache_context, in diffusers 0.42.1
    for name in ("ChromaPipeline", "ChromaImg2ImgPipeline", "Lumina2Pipeline", "Cosmos2TextToImagePipeline",
                 "FluxKontextPipeline", "StableDiffusion3Pipeline"):
        assert flagged(name), name
    # each branch in its own cache_context, or CFG batched into one call; a bare transformer
    assert not sequential_cfg_without_context(build_tiny_transformer("chroma"))
    for name in ("FluxPipeline", "QwenImagePipeline", "WanPipeline", "ZImagePipeline", "CogView4Pipeline",
                 "HunyuanVideoPipeline", "HiDreamImagePipeline", "SanaPipeline"):
        assert not flagged(name), name


def test_chroma_cfg_branches_each_compare_with_their_own_previous_signal():
    """ChromaPipeline with CFG: the runtime's x per branch equals rel_l1 of that branch's own signal.

    The signals are read, without any cache, at the first block's call (cond then uncond each step);
    the expected x of a branch is the relative L1 change between its consecutive signals.
    """
    from calibrate.tiny import build_tiny_pipeline, tiny_prompt_embeds
    from runtime import rel_l1

    steps = 4
    pipe = build_tiny_pipeline("chroma")
    kwargs = dict(tiny_prompt_embeds(pipe, "chroma", "a red fox", ""), height=32, width=32,
                  num_inference_steps=steps, guidance_scale=4.0, output_type="latent")
    transformer = pipe.transformer
    adapter = adapter_for(transformer)
    head = adapter.blocks(transformer)[0][1]
    signals = []
    handle = head.register_forward_pre_hook(
        lambda module, args, kw: signals.append(adapter.modulated_input(BlockCall(module, args, kw))), with_kwargs=True
    )
    try:
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(signals) == 2 * steps  # cond, uncond per step
    expected = []
    for branch_signals in (signals[0::2], signals[1::2]):
        xs = [float("nan")] + [rel_l1(b, a).item() for a, b in zip(branch_signals, branch_signals[1:])]
        expected.append(xs)

    with TeaCache.from_coefficients(coefficients("chroma", 0.0)).apply(pipe) as cache:
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        got = [[r.x for r in stats.trace] for stats in cache.stats.values()]
    assert len(got) == 2, f"one state per CFG branch expected, got {len(got)}"
    key = lambda xs: [x if x == x else -1.0 for x in xs]  # noqa: E731 (nan sorts first)
    for mine, theirs in zip(sorted(got, key=key), sorted(expected, key=key)):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), equal_nan=True, rtol=1e-6, atol=0)
