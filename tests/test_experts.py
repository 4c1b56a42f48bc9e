"""Wan2.2's two experts (`transformer` above the boundary, `transformer_2` below): one coefficients file
with a polynomial per expert, per-expert traces, per-expert fits, and a runtime that caches both."""

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _landing import reestimated_targets
from hydra import compose, initialize_config_dir

from calibrate.fit import run_fit
from calibrate.record import record
from calibrate.score import ScoreError, run_score
from calibrate.sweep import run_sweep
from calibrate.tiny import TINY_RECIPES, build_tiny_pipeline, tiny_prompt_embeds
from calibrate.traces import load_traces
from runtime import Coefficients, DecisionDefaults, TeaCache, load_coefficients
from runtime.errors import CoefficientsError, ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("wan22")


def generate(pipe, prompt="a red fox"):
    kwargs = {**TINY_RECIPES["wan22"], **tiny_prompt_embeds(pipe, "wan22", prompt, negative_prompt="")}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent")[0]


def two_polynomials(first, second, thresh=1.0):
    return Coefficients(
        model="test_wan22", transformer_class="WanTransformer3DModel", signal="modulated_input",
        coefficients=first, x_range=None, defaults=DecisionDefaults(rel_l1_thresh=thresh),
        provenance={"kind": "published", "source": "tests"},
        experts={"transformer_2": {"coefficients": list(second), "x_range": None}},
    )


def test_each_expert_decides_by_its_own_polynomial(pipe, caplog):
    """p = 0 on the high-noise expert (skips all it may), p = 100 on the low-noise one (never skips)."""
    with caplog.at_level(logging.WARNING), TeaCache.from_coefficients(two_polynomials((0.0,), (100.0,))).apply(pipe) as cache:
        generate(pipe)
        stats = cache.stats
    assert "uncached" not in caplog.text
    assert sorted(stats) == ["transformer/cond", "transformer/uncond", "transformer_2/cond", "transformer_2/uncond"]
    # 8 steps, boundary 0.875: the first expert runs 3 steps, the second 5; each forces its own last step.
    for branch in ("cond", "uncond"):
        assert [r.reason for r in stats[f"transformer/{branch}"].trace] == ["first", "skipped", "final"]
        assert [r.reason for r in stats[f"transformer_2/{branch}"].trace] == ["first", "threshold", "threshold", "threshold", "final"]
    # Swapped polynomials swap the behaviour: each expert follows its own.
    with TeaCache.from_coefficients(two_polynomials((100.0,), (0.0,))).apply(pipe) as cache:
        generate(pipe)
        swapped = cache.stats
    assert swapped["transformer/cond"].skipped == 0 and swapped["transformer_2/cond"].skipped == 3


def test_threshold_zero_and_remove_are_bit_identical_on_both_experts(pipe):
    reference = generate(pipe)
    with TeaCache.from_coefficients(two_polynomials((1.0, 0.0), (1.0, 0.0)), rel_l1_thresh=0.0).apply(pipe):
        cached = generate(pipe)
    assert torch.equal(cached, reference)
    assert torch.equal(generate(pipe), reference)


def test_a_one_polynomial_file_caches_both_experts_and_says_so(pipe, caplog):
    single = Coefficients(
        model="t", transformer_class="WanTransformer3DModel", signal="modulated_input", coefficients=(0.0,),
        x_range=None, defaults=DecisionDefaults(rel_l1_thresh=1.0), provenance={"kind": "published", "source": "t"},
    )
    with caplog.at_level(logging.WARNING), TeaCache.from_coefficients(single).apply(pipe) as cache:
        generate(pipe)
    assert "holds one polynomial, but the pipeline has 2 experts" in caplog.text
    assert cache.stats["transformer_2/cond"].skipped > 0 and cache.stats["transformer/cond"].skipped > 0
    with pytest.raises(CoefficientsError, match="no polynomial for expert 'transformer_2'"):
        single.for_expert("transformer_2")


def test_record_fit_and_serve_a_two_expert_pipeline(tmp_path, pipe):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("record", ["model=tiny_wan22", "limit=6", "seeds=[0,1]", "num_inference_steps=16",
                                 f"out={tmp_path / 't.h5'}", "device=cpu"])
        traces_path = record(cfg)
        out = run_fit(compose("fit", [f"traces={traces_path}", f"out={tmp_path / 'c.json'}", "plot=false", "degree=2"]))
    with h5py.File(traces_path) as handle:
        assert handle.attrs["pipeline_class"] == "WanPipeline"
        labels = {str(g.attrs["branch"]) for g in handle["runs"].values()}
    assert labels == {"cond", "uncond", "transformer_2.cond", "transformer_2.uncond"}
    traces = load_traces(traces_path)
    assert traces.experts == ["transformer", "transformer_2"]
    first = {len(t.data["x"]) for t in traces.trajectories if t.expert == "transformer"}
    second = {len(t.data["x"]) for t in traces.trajectories if t.expert == "transformer_2"}
    assert len(first) == len(second) == 1 and first.pop() + second.pop() == 16

    coefficients = load_coefficients(out)
    assert coefficients.expert_names == ("transformer", "transformer_2")
    assert coefficients.recipe["pipeline"] == "WanPipeline"
    second = coefficients.for_expert("transformer_2")
    assert second.coefficients != coefficients.coefficients and second.thresholds and second.fit["r2"] is not None
    # Each expert's x range is the range of its own x.
    field = {"modulated_input": "x", "timestep_embedding": "x_temb"}[coefficients.signal]
    x2 = np.concatenate([t.data[field] for t in traces.trajectories if t.expert == "transformer_2"])
    assert second.x_range[1] <= float(np.nanmax(x2)) + 1e-6
    with TeaCache.from_coefficients(out, speedup=1.2).apply(pipe) as cache:
        generate(pipe)
    assert {key.split("/")[0] for key in cache.stats} == {"transformer", "transformer_2"}
    # the drift rule is calibrated for one transformer only: no entry, and asking for it is refused by name
    assert "teacache_drift" not in coefficients.rules and "teacache_joint" in coefficients.rules
    with pytest.raises(CoefficientsError, match="teacache_drift"):
        TeaCache.from_coefficients(out, rule="teacache_drift")
    # the score reads one expert at a time, against that expert's own polynomial
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        with pytest.raises(ScoreError, match="2 experts .*score one at a time: expert=transformer or expert=transformer_2"):
            run_score(compose("score", [f"coefficients={out}", f"traces={traces_path}", "plot=false", f"out={tmp_path / 'a.png'}"]))
        reports = {name: run_score(compose("score", [f"coefficients={out}", f"traces={traces_path}", "plot=false",
                                                     f"out={tmp_path / 'b.png'}", f"expert={name}"]))
                   for name in ("transformer", "transformer_2")}
    for name, report in reports.items():
        own = coefficients.for_expert(name)
        assert report["expert"] == name and report["trajectories"] == len(traces.of_expert(name).trajectories)
        assert report["x_range"] == list(own.x_range)  # the expert's own polynomial (the two ranges differ)
    assert reports["transformer"]["x_range"] != reports["transformer_2"]["x_range"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        with pytest.raises(ConfigError, match=r"holds polynomials for 2 experts .* the sweep hooks one transformer"):
            run_sweep(compose("sweep", ["model=tiny_wan22", f"coefficients={out}", "limit=1", "methods=[uniform]", f"out={tmp_path / 's'}"]))
    # the fixed schedule counts one transformer's steps (from the first expert's traces): refused by name
    with pytest.raises(ConfigError, match="rule fixed_schedule .* 2 experts .*rule='searched_schedule'"):
        TeaCache.from_coefficients(out, rule="fixed_schedule").apply(pipe)
    assert not hasattr(pipe.transformer, "_diffusers_hook") or pipe.transformer._diffusers_hook.get_hook("teacache") is None


def test_a_file_fitted_through_another_pipeline_warns(caplog):
    edit = Coefficients(
        model="t", transformer_class="QwenImageTransformer2DModel", signal="modulated_input", coefficients=(0.0,),
        x_range=None, defaults=DecisionDefaults(rel_l1_thresh=1.0), provenance={"kind": "published", "source": "t"},
        recipe={"pipeline": "QwenImageEditPipeline"},
    )
    qwen = build_tiny_pipeline("qwen_image")
    with caplog.at_level(logging.WARNING), TeaCache.from_coefficients(edit).apply(qwen):
        pass
    assert "was fitted through a QwenImageEditPipeline, but is applied to a QwenImagePipeline" in caplog.text


def test_qwen_image_edit_records_fits_and_serves_through_the_edit_pipeline(tmp_path, caplog):
    """The edit pipeline concatenates the input image's latents to the sequence; its file says so, and
    the runtime warns when that file is applied to the text-to-image pipeline."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("record", ["model=tiny_qwen_image_edit", "limit=4", "seeds=[0]", f"out={tmp_path / 't.h5'}", "device=cpu"])
        traces_path = record(cfg)
        out = run_fit(compose("fit", [f"traces={traces_path}", f"out={tmp_path / 'c.json'}", "plot=false", "heldout_fraction=0.5"]))
    coefficients = load_coefficients(out)
    assert coefficients.recipe["pipeline"] == "QwenImageEditPipeline"
    edit = build_tiny_pipeline("qwen_image_edit")
    kwargs = {**TINY_RECIPES["qwen_image_edit"], **tiny_prompt_embeds(edit, "qwen_image_edit", "make it red", negative_prompt="")}
    reference = edit(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent")[0]
    with caplog.at_level(logging.WARNING), TeaCache.from_coefficients(out, rel_l1_thresh=0.0).apply(edit) as cache:
        cached = edit(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent")[0]
    assert "fitted through" not in caplog.text
    assert torch.equal(cached, reference) and cache.stats["cond"].computed == 8


def test_an_edit_hub_config_needs_its_input_images_before_loading(tmp_path):
    from calibrate.models import ModelLoadError, load_model

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("record", ["model=qwen_image_edit"])
    with pytest.raises(ModelLoadError, match="needs an input image per prompt; pass model.edit_images="):
        load_model(cfg.model, "cpu", torch.float32)
    cfg.model.edit_images = str(tmp_path)
    with pytest.raises(ModelLoadError, match="holds no png, jpg or webp images"):
        load_model(cfg.model, "cpu", torch.float32)


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_output_corrected_lands_the_latents_through_both_experts(pipe, sampler, monkeypatch):
    """The experts share each branch's output history. The high-noise expert skips its last two steps (a gap across
    the switch, closed by the low-noise expert's first call), the low-noise one every other step; with Wan's UniPC
    (swapped in) the steps after the switch still weigh outputs from before it. After every computed step the
    latent the pipeline hands the next call equals the one a fresh scheduler reaches when fed the target outputs:
    computed ones as the experts computed them, skipped ones on the line between the computed ones either side,
    CFG-combined. output_linear's latents are not there."""
    import copy

    from diffusers import UniPCMultistepScheduler

    if sampler == "unipc":
        monkeypatch.setattr(pipe, "scheduler", UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    experts = (pipe.transformer, pipe.transformer_2)
    recipe = TINY_RECIPES["wan22"]
    steps, guidance = recipe["num_inference_steps"], recipe["guidance_scale"]
    # p = 0 on the high-noise expert (it skips all but its first step), 0.6 against 1.0 on the low-noise one (every other)
    coefficients = two_polynomials((0.0,), (0.6,))
    gaps = {}
    for forecast in ("output_linear", "output_corrected"):
        raw, inputs = [], []
        for transformer in experts:
            def recording(*args, _forward=transformer.forward, **kw):
                inputs.append(kw["hidden_states"].detach().double().clone())
                out = _forward(*args, **kw)
                raw.append(out[0].detach().double().clone())
                return out

            transformer.forward = recording  # under the cache's hooks: what the model itself returned
        try:
            with TeaCache.from_coefficients(coefficients, forecast=forecast, final_steps=0).apply(pipe) as cache:
                final = generate(pipe)
        finally:
            for transformer in experts:
                transformer.__dict__.pop("forward", None)
        stats = cache.stats
        computed = [r.computed for r in stats["transformer/cond"].trace] + [r.computed for r in stats["transformer_2/cond"].trace]
        assert computed == [r.computed for r in stats["transformer/uncond"].trace + stats["transformer_2/uncond"].trace]
        schedule = [s for s, c in enumerate(computed) if c]
        high = len(stats["transformer/cond"].trace)
        assert len(raw) == 2 * steps and 1 <= high < steps - 3 and schedule[:2] == [0, high]  # a gap across the switch
        targets = reestimated_targets(raw, schedule, steps, guidance)  # (past the last computed step: not checked)
        replay = copy.deepcopy(pipe.scheduler)
        replay.set_timesteps(steps)
        latent, errors = inputs[0], []
        for step in range(steps):
            latent = type(replay).step(replay, targets[step], replay.timesteps[step], latent, return_dict=False)[0]
            if step in schedule:
                after = inputs[2 * (step + 1)] if step + 1 < steps else final.double()
                errors.append(float((latent - after).abs().max() / after.abs().max()))
        gaps[forecast] = errors[:-1] if schedule[-1] < steps - 1 else errors
    assert max(gaps["output_corrected"]) < 1e-5, gaps
    assert max(gaps["output_linear"]) > 1e-3, gaps


def test_a_shared_history_extrapolates_only_through_one_experts_outputs():
    """Past the switch the forecast holds the new expert's first output until that expert has computed two (the
    experts' outputs need not line up); within an expert it is the line through its last two. A new generation
    (step 0) starts each branch afresh."""
    from runtime.forecasts import BranchHistories

    histories = BranchHistories()
    v = {s: torch.full((2,), float(s * s)) for s in range(8)}  # a curved path: any line through two points misses it
    history = histories.at("cond", 0)
    history.computed(0, v[0], None, "transformer")
    history.computed(1, v[1], None, "transformer")
    assert torch.equal(history.forecast(2, None), v[1] + (v[1] - v[0]))
    assert histories.at("cond", 3) is history and histories.at("uncond", 3) is not history
    history.computed(3, v[3], None, "transformer_2")
    assert torch.equal(history.forecast(4, None), v[3])  # not the line through step 1's output
    history.computed(5, v[5], None, "transformer_2")
    assert torch.equal(history.forecast(6, None), v[5] + (v[5] - v[3]) * 0.5)
    assert histories.at("cond", 0) is not history and histories.at("cond", 0).outputs == []


def test_a_searched_schedule_spans_both_experts(tmp_path, pipe):
    """calibrate.fit search=N on a two-expert pipeline searches schedules over the generation's steps, each holding
    step 0 and the second expert's first step (it has nothing cached before); the runtime computes exactly those
    steps across the two experts, and the closed loop realizes the table's fractions."""
    from calibrate.schedule_search import fixed_steps

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        traces_path = record(compose("record", ["model=tiny_wan22", "limit=4", "seeds=[0,1]", f"out={tmp_path / 't.h5'}", "device=cpu"]))
        out = run_fit(compose("fit", [
            f"traces={traces_path}", f"out={tmp_path / 'c.json'}", "plot=false", "model=tiny_wan22", "degree=2",
            "search=1", "search_budgets=[0.3,0.6]", "search_forecasts=[output_corrected]", "closed_loop=1",
        ]))
    steps = TINY_RECIPES["wan22"]["num_inference_steps"]
    fixed = fixed_steps(pipe, steps)
    assert len(fixed) == 2 and 0 < max(fixed) < steps  # the switch falls inside the generation
    coefficients = load_coefficients(out)
    entry = coefficients.rules["searched_schedule"]
    assert [len(s) for s in entry["schedules"]] == [5, 2] and all(fixed <= set(s) for s in entry["schedules"])
    assert all(row["realized_fraction"] == row["computed_fraction"] for row in entry["thresholds"])
    for schedule, row in zip(entry["schedules"], entry["thresholds"]):
        with TeaCache.from_coefficients(out, rule="searched_schedule", rel_l1_thresh=row["rel_l1_thresh"]).apply(pipe) as cache:
            generate(pipe)
        for branch in ("cond", "uncond"):
            trace = cache.stats[f"transformer/{branch}"].trace + cache.stats[f"transformer_2/{branch}"].trace
            assert [s for s, r in enumerate(trace) if r.computed] == sorted(schedule)


def test_a_forced_schedule_counts_the_generations_steps_across_both_experts(pipe):
    """What the fit's search generates under: the schedule's steps are the generation's, the second expert's first
    step (3 here) among them, and both CFG branches of a step compute or skip together. A call computed its block
    stack when the first block's attention ran."""
    from calibrate.schedule_search import ScheduleChange, fixed_steps, forced_schedule

    schedule = frozenset({0, 2, 3, 5, 7})
    assert fixed_steps(pipe, TINY_RECIPES["wan22"]["num_inference_steps"]) == {0, 3}
    calls, computed = [], set()
    experts = [pipe.transformer, pipe.transformer_2]
    handles = [h for t in experts for h in (
        t.register_forward_pre_hook(lambda module, args: calls.append(len(calls))),
        t.blocks[0].attn1.register_forward_hook(lambda module, args, out: computed.add(len(calls) - 1)),
    )]
    try:
        with forced_schedule(experts, ScheduleChange(schedule), lambda: len(pipe.scheduler.timesteps), "output_corrected", pipe.scheduler):
            generate(pipe)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 2 * TINY_RECIPES["wan22"]["num_inference_steps"]
    assert computed == {2 * s + b for s in schedule for b in (0, 1)}
