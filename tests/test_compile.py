"""TeaCache and the recorder under torch.compile: regional (fullgraph False and True), whole model, both orders.

Compiled with dynamo's ``eager`` backend: it traces exactly what inductor would (graph breaks,
fullgraph errors, guards, recompiles) without inductor's minutes of C++ codegen on CI's CPU. The
speed under inductor is measured by ``bench/compile_overhead.py``.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from calibrate.recorder import TraceRecorder
from calibrate.tiny import TINY_RECIPES, build_tiny_pipeline, tiny_prompt_embeds
from runtime import Coefficients, DecisionDefaults, TeaCache
from runtime.intercept import original_class

STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("qwen_image")


def forced_schedule(forecast="reuse"):
    """p(x) = 0 and a cap of 2 skips: computed, skipped, skipped, computed, ... whatever the inputs. With
    ``forecast`` "fixed_schedule:<forecast>", the fixed_schedule rule computing those steps (0, 3, 6 and the final
    one), whose skipped calls under an output forecast run nothing of the model."""
    rule, _, forecast = forecast.rpartition(":")
    if rule:
        defaults = DecisionDefaults(rel_l1_thresh=1.0, rule=rule, forecast=forecast)
    else:
        defaults = DecisionDefaults(rel_l1_thresh=1.0, max_consecutive_skips=2, forecast=forecast)
    return Coefficients(
        model="test_compile",
        transformer_class="QwenImageTransformer2DModel",
        signal="modulated_input",
        coefficients=(0.0,),
        x_range=None,
        defaults=defaults,
        provenance={"kind": "published", "source": "tests"},
        schedule=(0, 3, 6) if rule else None,
    )


def transformer_inputs(pipe):
    captured = {}
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: captured.setdefault("kwargs", k) and None, with_kwargs=True
    )
    kwargs = {**TINY_RECIPES["qwen_image"], **tiny_prompt_embeds(pipe, "qwen_image", "a red fox", negative_prompt="")}
    pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent")
    hook.remove()
    return captured["kwargs"]


def sample(model, inputs, calls=STEPS):
    """A sampling loop's transformer calls on a drifting input; returns the outputs."""
    outputs = []
    with torch.no_grad(), model.cache_context("cond"):
        for step in range(calls):
            hidden = inputs["hidden_states"] * (1.0 - 0.05 * step)
            outputs.append(model(**{**inputs, "hidden_states": hidden})[0])
    return outputs


def compile_model(transformer, how):
    """Returns the callable to run: the transformer itself (regional) or the compiled wrapper."""
    if how == "whole":
        return torch.compile(transformer, backend="eager")
    transformer.compile_repeated_blocks(fullgraph=how == "regional_fullgraph", backend="eager")
    return transformer


def uncompile(transformer):
    for module in transformer.modules():
        module._compiled_call_impl = None
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "how, order, forecast",
    [(how, order, "reuse") for how in ("regional", "regional_fullgraph", "whole") for order in ("apply_then_compile", "compile_then_apply")]
    + [("regional_fullgraph", "apply_then_compile", "output_linear"), ("whole", "compile_then_apply", "output_linear")]
    + [("regional_fullgraph", "apply_then_compile", "fixed_schedule:output_linear"), ("whole", "compile_then_apply", "fixed_schedule:output_linear")],
)
def test_compiled_teacache_decides_as_eager_and_remove_restores(pipe, how, order, forecast):
    """Also with an output forecast: its work on the transformer's output runs outside compiled regions too, and
    so does a schedule rule's skip of the whole call."""
    transformer = pipe.transformer
    inputs = transformer_inputs(pipe)
    eager_reference = sample(transformer, inputs)
    with TeaCache.from_coefficients(forced_schedule(forecast)).apply(transformer, num_inference_steps=STEPS) as cache:
        eager_cached = sample(transformer, inputs)
        eager_decisions = [(r.computed, r.reason) for r in cache.stats["cond"].trace]
    assert [c for c, _ in eager_decisions] == [True, False, False, True, False, False, True, True]

    torch._dynamo.reset()
    try:
        counters.clear()
        if order == "compile_then_apply":
            model = compile_model(transformer, how)
            cache = TeaCache.from_coefficients(forced_schedule(forecast)).apply(transformer, num_inference_steps=STEPS)
        else:
            cache = TeaCache.from_coefficients(forced_schedule(forecast)).apply(transformer, num_inference_steps=STEPS)
            model = compile_model(transformer, how)
        compiled_cached = sample(model, inputs)  # warm-up: compiles both the computed and the skipped path
        assert [(r.computed, r.reason) for r in cache.stats["cond"].trace] == eager_decisions
        for got, want in zip(compiled_cached, eager_cached):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        breaks = {reason.split("\n")[0] for reason in counters["graph_break"]}
        if how == "whole":  # the decision's host read is the one graph break
            assert all("torch.compiler.disable" in reason for reason in breaks), breaks
        else:  # the decision sits outside the compiled blocks
            assert not breaks, breaks

        cache.reset()
        counters.clear()
        sample(model, inputs)
        assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])

        cache.remove()
        assert all(original_class(m) is type(m) for m in transformer.modules())
        if how != "whole":
            blocks = transformer.transformer_blocks
            assert all(block._compiled_call_impl is not None for block in blocks)
        for got, want in zip(sample(model, inputs), eager_reference):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    finally:
        cache.remove()
        uncompile(transformer)


def test_recorder_on_a_regionally_compiled_transformer_records_what_eager_records(pipe):
    transformer = pipe.transformer
    kwargs = {**TINY_RECIPES["qwen_image"], **tiny_prompt_embeds(pipe, "qwen_image", "a red fox", negative_prompt=" ")}

    def record():
        with TraceRecorder(transformer) as recorder:
            return recorder.run(lambda: pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent"))

    eager = record()
    torch._dynamo.reset()
    counters.clear()
    try:
        transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
        compiled = record()
        assert not counters["graph_break"]
    finally:
        uncompile(transformer)
    assert sorted(compiled) == sorted(eager) == ["cond", "uncond"]
    for branch in eager:
        for field in ("x", "x_temb", "y", "y_residual"):
            torch.testing.assert_close(
                torch.from_numpy(compiled[branch][field]), torch.from_numpy(eager[branch][field]), rtol=1e-4, atol=1e-6, equal_nan=True
            )
