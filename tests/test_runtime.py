"""The runtime on tiny random-init configs of the real diffusers pipelines (never mocks)."""

import copy

import numpy as np
import pytest
import torch

from calibrate.tiny import TINY_FAMILIES, TINY_RECIPES, build_tiny_pipeline, tiny_prompt_embeds
from runtime import (
    BlockCall,
    Coefficients,
    ConfigError,
    DecisionDefaults,
    TeaCache,
    TeaCacheError,
    UnsupportedModelError,
    adapter_for,
    rel_l1,
)
from runtime.intercept import intercept, original_class, release
from runtime.stats import CacheStats

CLASSES = {
    "qwen_image": "QwenImageTransformer2DModel",
    "flux": "FluxTransformer2DModel",
    "wan": "WanTransformer3DModel",
}
SIGNALS = ("modulated_input", "timestep_embedding")


@pytest.fixture(scope="session")
def pipes():
    return {family: build_tiny_pipeline(family) for family in TINY_FAMILIES}


def coefficients(family, signal="modulated_input", thresh=0.0, **defaults):
    """p(x) = x: the accumulator sums the raw signal change."""
    return Coefficients(
        model=f"test_{family}",
        transformer_class=CLASSES[family],
        signal=signal,
        coefficients=(1.0, 0.0),
        x_range=None,
        defaults=DecisionDefaults(rel_l1_thresh=thresh, **defaults),
        provenance={"kind": "published", "source": "tests"},
    )


def generate(pipe, family, prompt="a red fox in the snow", seed=0):
    kwargs = {**TINY_RECIPES[family], **tiny_prompt_embeds(pipe, family, prompt, negative_prompt="")}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="np")[0]


def last_block_compute_probe(pipe):
    """Counts, per branch, the calls in which the last block really computes.

    A forward hook on the last block's attention (which runs only when the block computes), and a
    pre-hook on the transformer that notes the call's position: the pipelines call "cond" then
    "uncond" at every step.
    """
    transformer = pipe.transformer
    last_block = adapter_for(transformer).blocks(transformer)[-1][1]
    attention = next(m for name, m in last_block.named_children() if name.startswith("attn"))
    calls, counts = [0], {"cond": 0, "uncond": 0}

    def on_call(module, args):
        calls[0] += 1

    def on_attention(module, args, output):
        counts["cond" if calls[0] % 2 == 1 else "uncond"] += 1

    handles = [transformer.register_forward_pre_hook(on_call), attention.register_forward_hook(on_attention)]
    return counts, handles


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_threshold_zero_is_bit_identical_and_remove_restores(pipes, family, signal):
    pipe = pipes[family]
    reference = generate(pipe, family)
    with TeaCache.from_coefficients(coefficients(family, signal), rel_l1_thresh=0.0).apply(pipe) as cache:
        cached = generate(pipe, family)
        steps = TINY_RECIPES[family]["num_inference_steps"]
        assert {b: (s.computed, s.skipped) for b, s in cache.stats.items()} == {
            "cond": (steps, 0),
            "uncond": (steps, 0),
        }
    assert torch.equal(torch.from_numpy(cached), torch.from_numpy(reference))
    after = generate(pipe, family)
    assert torch.equal(torch.from_numpy(after), torch.from_numpy(reference))
    for _, block in adapter_for(pipe.transformer).blocks(pipe.transformer):
        assert not hasattr(block, "_diffusers_hook"), "remove() must leave no registry behind"
        assert "forward" not in vars(block), "remove() must leave no forward wrapper behind"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_high_threshold_skips_and_stats_match_an_independent_count(pipes, family):
    pipe = pipes[family]
    steps = TINY_RECIPES[family]["num_inference_steps"]
    reference = generate(pipe, family)
    counts, handles = last_block_compute_probe(pipe)
    try:
        with TeaCache.from_coefficients(coefficients(family), rel_l1_thresh=0.5).apply(pipe) as cache:
            cached = generate(pipe, family)
            stats = cache.stats
    finally:
        for handle in handles:
            handle.remove()
    for branch in ("cond", "uncond"):
        assert stats[branch].computed == counts[branch]
        assert stats[branch].computed + stats[branch].skipped == steps
        assert stats[branch].computed < steps
        trace = stats[branch].trace
        assert [r.step for r in trace] == list(range(steps))
        assert trace[0].reason == "first" and trace[-1].reason == "final"
        assert trace[0].computed and trace[-1].computed
    assert not torch.equal(torch.from_numpy(cached), torch.from_numpy(reference))
    assert float(abs(cached - reference).max()) < 0.5  # a cached residual, not garbage


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cfg_branches_decide_independently(pipes, family, signal):
    """Each branch's x is its own signal against its own previous step.

    The block-0 inputs are captured by a plain torch pre-hook (which also fires on skipped calls),
    and the expected x is recomputed per branch. Had the branches shared state, the uncond x would
    be measured against the cond call just before it, which this test shows to differ.
    """
    pipe = pipes[family]
    transformer = pipe.transformer
    adapter = adapter_for(transformer)
    source = adapter.signal_source(transformer, signal)
    signals = []

    def probe(module, call_next, args, kwargs):
        # Outermost on its module, so it also sees the head block's skipped calls.
        if source.before:
            signals.append(source.read(BlockCall(module, args, kwargs), None).detach())
            return call_next(*args, **kwargs)
        output = call_next(*args, **kwargs)
        signals.append(source.read(BlockCall(module, (), {}), output).detach())
        return output

    with TeaCache.from_coefficients(coefficients(family, signal), rel_l1_thresh=0.5).apply(pipe) as cache:
        intercept(source.module, "test_probe", probe)
        try:
            generate(pipe, family)
        finally:
            release(source.module, "test_probe")
        stats = cache.stats
    per_branch = {"cond": signals[0::2], "uncond": signals[1::2]}
    for branch, seq in per_branch.items():
        expected = [float("nan")] + [rel_l1(seq[t], seq[t - 1]).item() for t in range(1, len(seq))]
        got = [r.x for r in stats[branch].trace]
        assert got == pytest.approx(expected, nan_ok=True, rel=1e-5)
    shared = [rel_l1(signals[i], signals[i - 1]).item() for i in range(1, len(signals), 2)]
    own = [r.x for r in stats["uncond"].trace]
    assert shared != pytest.approx(own, nan_ok=True, rel=1e-3)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_state_resets_between_generations(pipes, family):
    pipe = pipes[family]
    with TeaCache.from_coefficients(coefficients(family), rel_l1_thresh=0.5).apply(pipe) as cache:
        first = generate(pipe, family)
        first_trace = [(r.computed, r.reason) for r in cache.stats["cond"].trace]
        second = generate(pipe, family)
        stats = cache.stats["cond"]
    assert torch.equal(torch.from_numpy(first), torch.from_numpy(second))
    assert [(r.computed, r.reason) for r in stats.trace] == first_trace
    assert stats.calls == 2 * TINY_RECIPES[family]["num_inference_steps"]


def test_cap_on_consecutive_skips_in_a_pipeline(pipes):
    pipe = pipes["qwen_image"]
    cache = TeaCache.from_coefficients(coefficients("qwen_image"), rel_l1_thresh=10.0, max_consecutive_skips=2)
    with cache.apply(pipe):
        generate(pipe, "qwen_image")
    decisions = [r.computed for r in cache.stats["cond"].trace]
    assert decisions == [True, False, False, True, False, False, True, True]
    assert [r.reason for r in cache.stats["cond"].trace][3] == "max_skips"


def test_bare_transformer_without_a_context_has_one_state_and_counts_steps(pipes):
    pipe = pipes["flux"]
    transformer = pipe.transformer
    captured = {}
    hook = transformer.register_forward_pre_hook(
        lambda m, a, k: captured.setdefault("kwargs", k) and None, with_kwargs=True
    )
    generate(pipe, "flux")
    hook.remove()
    kwargs = captured["kwargs"]
    cache = TeaCache.from_coefficients(coefficients("flux"), rel_l1_thresh=10.0).apply(
        transformer, num_inference_steps=3
    )
    try:
        with torch.no_grad():  # a plain sampling loop, no cache context: one state, "default"
            outputs = [transformer(**kwargs)[0] for _ in range(3)]
        assert [r.reason for r in cache.stats["default"].trace] == ["first", "skipped", "final"]
        cache.reset()
        with torch.no_grad(), transformer.cache_context("cond"):
            outputs = [transformer(**kwargs)[0] for _ in range(3)]
        assert [r.reason for r in cache.stats["cond"].trace] == ["first", "skipped", "final"]
        # A skip on an unchanged input rebuilds the output from the residual (up to float rounding).
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
        cache.reset()
        with torch.no_grad(), transformer.cache_context("cond"):
            transformer(**kwargs)
        assert cache.stats["cond"].trace[-1].reason == "first"
    finally:
        cache.remove()


def test_coefficients_of_another_class_are_refused(pipes):
    cache = TeaCache.from_coefficients("qwen_image")
    with pytest.raises(UnsupportedModelError, match=r"qwen_image\.json holds coefficients for QwenImageTransformer2DModel, but apply\(\) got a FluxTransformer2DModel; use one made for it \(flux"):
        cache.apply(pipes["flux"])


def test_unsupported_transformer_is_refused():
    from diffusers import AuraFlowTransformer2DModel  # a class with no TeaCache adapter

    aura = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, out_channels=4, pos_embed_max_size=16,
    )
    doc = coefficients("flux").to_dict()
    doc["transformer_class"] = "AuraFlowTransformer2DModel"
    from runtime import coefficients_from_dict

    cache = TeaCache.from_coefficients(coefficients_from_dict(doc))
    with pytest.raises(
        UnsupportedModelError, match="no adapter for AuraFlowTransformer2DModel; supported transformer classes: .*FluxTransformer2DModel"
    ):
        cache.apply(aura)
    with pytest.raises(UnsupportedModelError, match="takes a diffusers pipeline"):
        cache.apply(object())


def test_double_apply_and_foreign_cache_are_refused(pipes):
    from diffusers import FirstBlockCacheConfig

    pipe = pipes["wan"]
    first = TeaCache.from_coefficients("wan2_1_t2v_1_3b").apply(pipe)
    try:
        with pytest.raises(TeaCacheError, match="already applied to this WanTransformer3DModel"):
            TeaCache.from_coefficients("wan2_1_t2v_1_3b").apply(pipe)
        with pytest.raises(TeaCacheError, match="this TeaCache is already applied"):
            first.apply(pipe)
    finally:
        first.remove()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    try:
        with pytest.raises(UnsupportedModelError, match="FirstBlockCacheConfig.*disable_cache"):
            TeaCache.from_coefficients("wan2_1_t2v_1_3b").apply(pipe)
    finally:
        pipe.transformer.disable_cache()


@pytest.mark.parametrize("name", ["qwen_image", "flux", "wan2_1_t2v_1_3b"])
def test_published_files_drive_their_pipelines(pipes, name):
    family = {"qwen_image": "qwen_image", "flux": "flux", "wan2_1_t2v_1_3b": "wan"}[name]
    pipe = pipes[family]
    with TeaCache.from_coefficients(name).apply(pipe) as cache:
        out = generate(pipe, family)
    assert out.shape == generate(pipe, family).shape
    assert set(cache.stats) == {"cond", "uncond"}


@pytest.mark.cuda
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_on_cuda(family):
    pipe = build_tiny_pipeline(family).to("cuda")
    reference = generate(pipe, family)
    with TeaCache.from_coefficients(coefficients(family), rel_l1_thresh=0.0).apply(pipe):
        assert (generate(pipe, family) == reference).all()
    with TeaCache.from_coefficients(coefficients(family), rel_l1_thresh=0.5).apply(pipe) as cache:
        generate(pipe, family)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        generate(pipe, family)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before, "no memory growth across generations"
    assert cache.stats["cond"].skipped > 0


def _transformer_kwargs(pipe, family, **recipe):
    captured = {}
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: captured.setdefault("kwargs", k) and None, with_kwargs=True
    )
    try:
        kwargs = {**TINY_RECIPES[family], **recipe, **tiny_prompt_embeds(pipe, family, "a boat", negative_prompt="")}
        pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    return captured["kwargs"]


def test_shape_change_and_nonfinite_signal_force_a_compute(pipes):
    pipe = pipes["flux"]
    transformer = pipe.transformer
    small = _transformer_kwargs(pipe, "flux")
    large = _transformer_kwargs(pipe, "flux", height=48, width=48)
    poisoned = {**small, "hidden_states": small["hidden_states"].clone()}
    poisoned["hidden_states"][0, 0, 0] = float("nan")
    with TeaCache.from_coefficients(coefficients("flux"), rel_l1_thresh=10.0).apply(
        transformer, num_inference_steps=100
    ) as cache:
        with torch.no_grad(), transformer.cache_context("cond"):
            for kwargs in (small, small, large, large, poisoned, small):
                transformer(**kwargs)
    reasons = [(r.reason, r.computed) for r in cache.stats["cond"].trace]
    assert reasons == [
        ("first", True),
        ("skipped", False),
        ("shape_change", True),
        ("skipped", False),
        ("shape_change", True),  # back to the small size: the residual is the large one's
        ("nonfinite", True),  # measured against the poisoned call's NaN signal
    ]


def test_adapter_may_name_the_modulated_input_module_and_block_layouts(pipes, monkeypatch):
    """The entry fields new families need (Z-Image reads its signal off `noise_refiner.0`; Lumina2's
    blocks are unknown to diffusers' registry), exercised on Flux by naming what the default finds."""
    import dataclasses

    from runtime import ADAPTERS

    pipe = pipes["flux"]

    def traces():
        with TeaCache.from_coefficients(coefficients("flux"), rel_l1_thresh=0.5).apply(pipe) as cache:
            out = generate(pipe, "flux")
        nan_free = lambda v: None if v != v else v  # noqa: E731  (NaN at step 0 never equals itself)
        return out, {b: [(nan_free(r.x), r.computed) for r in s.trace] for b, s in cache.stats.items()}

    default_out, default_trace = traces()
    explicit = dataclasses.replace(
        ADAPTERS["FluxTransformer2DModel"],
        modulated_input_module="transformer_blocks.0",
        layouts={"FluxTransformerBlock": (1, 0), "FluxSingleTransformerBlock": (1, 0)},
    )
    monkeypatch.setitem(ADAPTERS, "FluxTransformer2DModel", explicit)
    explicit_out, explicit_trace = traces()
    assert explicit_trace == default_trace
    assert torch.equal(torch.from_numpy(explicit_out), torch.from_numpy(default_out))

    broken = dataclasses.replace(explicit, modulated_input_module="no_such.module")
    monkeypatch.setitem(ADAPTERS, "FluxTransformer2DModel", broken)
    with pytest.raises(UnsupportedModelError, match="no submodule 'no_such.module' for the modulated input"):
        TeaCache.from_coefficients(coefficients("flux")).apply(pipe)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in pipe.transformer.modules())
    assert all(original_class(m) is type(m) for m in pipe.transformer.modules())


class _Stop(Exception):
    pass


@pytest.mark.parametrize("where", ["callback", "inside_stack"])
def test_a_generation_that_raises_leaves_no_state_behind(pipes, where):
    """A cancelled request (a callback that raises) or a fault inside the block stack: the next pipeline
    call equals a clean one, output and decisions. QwenImage passes no step index to the cache."""
    pipe = pipes["qwen_image"]
    kwargs = {**TINY_RECIPES["qwen_image"], **tiny_prompt_embeds(pipe, "qwen_image", "a red fox", negative_prompt="")}

    def run(**extra):
        return pipe(**kwargs, **extra, generator=torch.Generator().manual_seed(0), output_type="np")[0]

    with TeaCache.from_coefficients(coefficients("qwen_image"), rel_l1_thresh=0.5).apply(pipe) as cache:
        clean = run()
        clean_trace = [(r.step, r.computed, r.reason) for r in cache.stats["cond"].trace]
        assert any(not computed for _, computed, _ in clean_trace)  # the threshold really skips

        if where == "callback":
            def stop_at_step_3(pipeline, step, timestep, callback_kwargs):
                if step == 3:
                    raise _Stop
                return callback_kwargs

            with pytest.raises(_Stop):
                run(callback_on_step_end=stop_at_step_3)
        else:
            blocks = adapter_for(pipe.transformer).blocks(pipe.transformer)
            attention = blocks[1][1].attn
            calls = [0]

            def fail_on_the_third_computed_call(module, args, output):
                calls[0] += 1
                if calls[0] == 3:
                    raise _Stop

            handle = attention.register_forward_hook(fail_on_the_third_computed_call)
            try:
                with pytest.raises(_Stop):
                    run()
            finally:
                handle.remove()

        again = run()
        assert [(r.step, r.computed, r.reason) for r in cache.stats["cond"].trace] == clean_trace
    np.testing.assert_array_equal(again, clean)


@pytest.mark.parametrize("forecast", ["reuse", "output_linear", "output_corrected", "output_corrected_unipc"])
def test_one_host_read_per_transformer_call(pipes, monkeypatch, forecast):
    """Every way a tensor reaches the host is counted, with and without TeaCache: the cache adds one read
    per call (the decision and its numbers for `stats`), on computed and skipped calls alike, whatever the
    forecast (the Euler correction reads the scheduler's sigmas where they are, on the pipeline's device; with
    UniPC, the sampler's weights are probed once for the schedule, on the CPU, and found again for the second
    generation with no read)."""
    import dataclasses

    from runtime.hooks import TeaCacheConfig, apply_teacache, remove_teacache, reset_teacache

    pipe = pipes["flux"]
    transformer = pipe.transformer
    kwargs = _transformer_kwargs(pipe, "flux")
    reads = [0]
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kw):
            reads[0] += 1
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_per_call(calls):
        counts = []
        with torch.no_grad(), transformer.cache_context("cond"):
            for _ in range(calls):
                reads[0] = 0
                transformer(**kwargs)
                counts.append(reads[0])
        return counts

    baseline = reads_per_call(3)
    if forecast == "output_corrected_unipc":
        from diffusers import UniPCMultistepScheduler

        import runtime.forecasts

        forecast, scheduler = "output_corrected", UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        scheduler.set_timesteps(6)
        generations = 2
        probed, probe = [], runtime.forecasts.probe_weights
        monkeypatch.setattr(runtime.forecasts, "probe_weights", lambda *a: probed.append(1) or probe(*a))
    else:
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=1.0)
        generations = 1
    rule = dataclasses.replace(TeaCache.from_coefficients(coefficients("flux"), rel_l1_thresh=10.0).rule, forecast=forecast)
    stats = CacheStats()
    apply_teacache(transformer, TeaCacheConfig(rule, "modulated_input", stats, 6, scheduler=scheduler))
    try:
        for _ in range(generations):
            reset_teacache(transformer)  # what a pipeline's cache context does between generations
            cached = reads_per_call(6)
    finally:
        remove_teacache(transformer)
    assert [r.computed for r in stats.branches["cond"].trace][-6:] == [True, False, False, False, False, True]
    assert cached == [baseline[0] + 1] * 6, (baseline, cached)
    if generations == 2:
        assert len(probed) == 1


def test_rule_variants_run_in_the_pipeline_as_replay_says(pipes):
    """Each variant in a real pipeline (tiny QwenImage, true CFG): the runtime's decisions equal the
    offline replay on the x the runtime measured; teacache_joint gives both branches the cond decision."""
    import dataclasses

    from runtime import DecisionRule, replay

    pipe = pipes["qwen_image"]
    base = coefficients("qwen_image", thresh=0.12)
    steps = TINY_RECIPES["qwen_image"]["num_inference_steps"]
    variants = {
        "teacache_dsigma": dict(step_weights=tuple(1.6 - 0.15 * i for i in range(steps))),
        "fixed_schedule": dict(schedule=(0, 3, 5)),
        # the searched schedule of the threshold's skipped fraction, the last step skipped as it says
        "searched_schedule": dict(rules={"searched_schedule": {
            "rel_l1_thresh": round(1 - 3 / steps, 4), "num_steps": steps, "schedules": [[0, 2, 3]],
            "thresholds": [{"rel_l1_thresh": round(1 - 3 / steps, 4), "computed_fraction": round(3 / steps, 4)}]}}),
    }
    for rule, data in variants.items():
        c = dataclasses.replace(base, defaults=base.defaults.with_overrides(rule=rule), **data)
        with TeaCache.from_coefficients(c).apply(pipe) as cache:
            generate(pipe, "qwen_image")
            stats = cache.stats
        computed = {b: [r.computed for r in s.trace] for b, s in stats.items()}
        x = {b: torch.tensor([[r.x for r in s.trace]]) for b, s in stats.items()}
        seen = c.for_rule(rule)  # the file as the rule sees it (searched_schedule: its entry's threshold)
        expected_rule = DecisionRule.of(seen, seen.defaults)
        for branch in ("cond", "uncond"):
            assert computed[branch] == replay(expected_rule, x[branch])[0].tolist(), (rule, branch)
        if rule == "fixed_schedule":
            assert [i for i, done in enumerate(computed["cond"]) if done] == [0, 3, 5, steps - 1]
        if rule == "searched_schedule":
            assert [i for i, done in enumerate(computed["cond"]) if done] == [0, 2, 3]
            # step indices mean other steps at another step count: refused by name, not run silently
            with TeaCache.from_coefficients(c).apply(pipe), pytest.raises(ConfigError, match=f"searched for {steps} steps"):
                pipe(**{**TINY_RECIPES["qwen_image"], "num_inference_steps": steps + 2,
                        **tiny_prompt_embeds(pipe, "qwen_image", "a fox", negative_prompt="")}, output_type="np")


def test_joint_rule_makes_every_branch_follow_the_first(pipes):
    """cond calls see an unchanged input (x = 0: they skip), uncond calls a new random one each step (x
    large: on their own they compute); under teacache_joint the uncond calls follow the cond decision."""
    import dataclasses

    pipe = pipes["flux"]
    transformer = pipe.transformer
    kwargs = _transformer_kwargs(pipe, "flux")

    def run(rule):
        c = coefficients("flux", thresh=0.5)
        c = dataclasses.replace(c, defaults=c.defaults.with_overrides(rule=rule))
        with TeaCache.from_coefficients(c).apply(transformer, num_inference_steps=6) as cache:
            with torch.no_grad():
                for step in range(6):
                    with transformer.cache_context("cond"):
                        transformer(**kwargs)
                    with transformer.cache_context("uncond"):
                        noise = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(step))
                        transformer(**{**kwargs, "hidden_states": kwargs["hidden_states"] + noise})
        return {b: [r.computed for r in s.trace] for b, s in cache.stats.items()}

    own = run("teacache")
    assert own["cond"] == [True, False, False, False, False, True]
    assert own["uncond"] == [True] * 6
    joint = run("teacache_joint")
    assert joint["cond"] == joint["uncond"] == own["cond"]


def test_drift_rule_measures_against_the_last_computed_call(pipes):
    """Inputs alternate between h and h + e. Summed per-step changes (teacache) grow by one change a per
    step and force a compute every few steps; the change since the last computed call (teacache_drift)
    is a or exactly 0, so it skips every step the schedule lets it."""
    import dataclasses

    pipe = pipes["flux"]
    transformer = pipe.transformer
    kwargs = _transformer_kwargs(pipe, "flux")
    bump = 0.05 * torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(3))

    def run(c):
        with TeaCache.from_coefficients(c).apply(transformer, num_inference_steps=8) as cache:
            with torch.no_grad():
                for step in range(8):
                    with transformer.cache_context("cond"):
                        transformer(**{**kwargs, "hidden_states": kwargs["hidden_states"] + (step % 2) * bump})
        return cache.stats["cond"].trace

    a = run(coefficients("flux", thresh=0.0))[1].x
    base = coefficients("flux", thresh=2.5 * a)
    summed = run(base)
    assert [r.computed for r in summed] == [True, False, False, True, False, False, True, True]
    entry = {"rel_l1_thresh": 2.5 * a, "coefficients": [1.0, 0.0], "x_range": [0.0, 10.0], "max_lag": 8}
    drift = dataclasses.replace(base, rules={"teacache_drift": entry}, defaults=base.defaults.with_overrides(rule="teacache_drift"))
    trace = run(drift)
    assert [r.computed for r in trace] == [True] + [False] * 6 + [True]
    assert [r.x for r in trace[2:7:2]] == [0.0, 0.0, 0.0]  # the input of the last computed call again
    assert all(r.x == pytest.approx(a, rel=1e-5) for r in trace[1:7:2])


def test_output_forecasts_keep_the_container_the_model_returns():
    """The output forecasts read and replace the output tensor in whatever a transformer returns: a tuple (its
    other items kept), a Transformer2DModelOutput, a list of per-item tensors (Z-Image); anything else is refused
    with the fix."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from runtime.forecasts import sample_of, with_sample

    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(with_sample((a, "extra"), b)[0], b) and with_sample((a, "extra"), b)[1] == "extra"
    replaced = with_sample(Transformer2DModelOutput(sample=a), b)
    assert isinstance(replaced, Transformer2DModelOutput) and torch.equal(replaced.sample, b)
    per_item = ([a[0], a[1]],)
    assert torch.equal(sample_of(per_item), a)
    back = with_sample(per_item, b)[0]
    assert isinstance(back, list) and len(back) == 2 and torch.equal(back[1], b[1])
    for bad in ({"sample": a}, ([torch.zeros(2), torch.zeros(3)],)):
        with pytest.raises(TeaCacheError, match="output forecasts need the transformer's output tensor.*use forecast=reuse"):
            sample_of(bad)
