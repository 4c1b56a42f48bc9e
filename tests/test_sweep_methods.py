"""The sweep's schedule methods, TaylorSeer and the perceptual score, on the trained reference model (few steps).

- a forced schedule computes exactly the requested steps, in both CFG branches (probe on the last block's attention);
- the schedule search never returns a schedule worse than the uniform one it starts from, and the errors it
  reports are those of real generations under its schedules;
- TaylorSeer's rows exist, its identity setting (cache_interval=1) equals full compute, and the compute probe
  does not count its predicted attention calls as computed;
- the perceptual score of full against full is perfect agreement and zero distance;
- settings of the new methods are refused before anything loads.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from calibrate.metrics import Perceptual
from calibrate.models import load_model
from calibrate.plots import pareto_front
from calibrate.recipe import Recipe
from calibrate.schedule_search import (
    ScheduleChange,
    computed_steps,
    forced_schedule,
    local_search,
    search_schedules,
    uniform_schedule,
)
from calibrate.sweep import ComputeProbe, run_sweep
from runtime import ConfigError
from runtime.adapters import adapter_for

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
RECIPE = Recipe(num_inference_steps=STEPS, height=32, width=32, guidance=4.0, negative_prompt="")
PROMPT, SEED = "a three written by hand", 1000


def compose_cfg(name, overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def model():
    return load_model(compose_cfg("sweep").model, "cpu", torch.float32)


def generate(model):
    return np.asarray(model.generate(PROMPT, SEED, RECIPE, output_type="np").images[0], np.float64)


def computed_calls(transformer):
    """Per branch, the call indices in which the last block's attention ran (cond then uncond at every step)."""
    last = adapter_for(transformer).blocks(transformer)[-1][1]
    attention = next(m for name, m in last.named_children() if name.startswith("attn"))
    calls, computed = [0], {"cond": [], "uncond": []}

    def on_call(module, args):
        calls[0] += 1

    def on_attention(module, args, output):
        computed["cond" if calls[0] % 2 == 1 else "uncond"].append((calls[0] - 1) // 2)

    handles = [transformer.register_forward_pre_hook(on_call), attention.register_forward_hook(on_attention)]
    return computed, handles


@pytest.mark.parametrize("schedule", [{0, 3, 4, 7}, {0, 1, 2, 5}, {0}])
def test_forced_schedule_computes_exactly_the_requested_steps(model, schedule):
    full = generate(model)
    scheduler = model.pipe.scheduler
    with forced_schedule(model.transformer, ScheduleChange(frozenset(schedule)), lambda: len(scheduler.timesteps)):
        computed, handles = computed_calls(model.transformer)
        try:
            image = generate(model)
        finally:
            for handle in handles:
                handle.remove()
    assert computed == {"cond": sorted(schedule), "uncond": sorted(schedule)}
    assert np.abs(image - full).max() > 0  # skipping changed the output
    assert np.array_equal(generate(model), full)  # removed: full compute again


def test_linear_forecast_extrapolates_the_last_two_computed_residuals(model):
    """forecast="linear": a skipped call adds r_a + (r_a - r_b) (k - a) / (a - b), r_a and r_b the branch's last two
    computed residuals (stack output - stack input) at steps a > b; with one residual so far, r_a itself. Checked
    against the stack's real input (img_in's output) and output (norm_out's input) per call, in both branches."""
    transformer, scheduler = model.transformer, model.pipe.scheduler
    schedule = {0, 2, 5}
    seen = []  # per call: (stack input, stack output)
    handles = [
        transformer.img_in.register_forward_hook(lambda m, a, out: seen.append([out.detach().clone()])),
        transformer.norm_out.register_forward_pre_hook(lambda m, a: seen[-1].append(a[0].detach().clone())),
    ]
    try:
        with forced_schedule(transformer, ScheduleChange(frozenset(schedule)), lambda: len(scheduler.timesteps), "linear"):
            generate(model)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 2 * STEPS
    for branch in (0, 1):  # cond, uncond calls alternate
        residuals = {}
        for step in range(STEPS):
            h, out = seen[2 * step + branch]
            if step in schedule:
                residuals[step] = out - h
                continue
            done = sorted(residuals)
            if len(done) == 1:
                expected = residuals[done[-1]]
            else:
                b, a = done[-2], done[-1]
                expected = residuals[a] + (residuals[a] - residuals[b]) * (step - a) / (a - b)
            torch.testing.assert_close(out - h, expected, rtol=1e-4, atol=1e-5)


def test_linear_forecast_is_reuse_until_two_residuals_exist(model):
    scheduler = model.pipe.scheduler
    images = {}
    for forecast in ("reuse", "linear"):
        for schedule in ({0}, {0, 3}):
            with forced_schedule(model.transformer, ScheduleChange(frozenset(schedule)), lambda: len(scheduler.timesteps), forecast):
                images[(forecast, len(schedule))] = generate(model)
    assert np.array_equal(images[("reuse", 1)], images[("linear", 1)])  # one residual only: nothing to extrapolate
    assert not np.array_equal(images[("reuse", 2)], images[("linear", 2)])  # steps 4-7 extrapolate from 0 and 3


def test_uniform_schedule_and_budgets():
    assert uniform_schedule(25, 8) == {0, 3, 7, 10, 14, 17, 21, 24}
    assert uniform_schedule(8, 1) == {0} and uniform_schedule(8, 8) == set(range(8))
    assert [computed_steps(f, 25) for f in (0.3, 0.4, 0.5, 0.6, 0.7)] == [8, 10, 13, 15, 18]
    with pytest.raises(ConfigError, match="computed fraction in"):
        computed_steps(1.5, 25)


def test_search_is_never_worse_than_uniform_and_reports_real_errors(model):
    full = generate(model)
    current = {"steps": frozenset()}
    scheduler = model.pipe.scheduler

    def error(steps):
        current["steps"] = steps
        return float(np.mean((generate(model) - full) ** 2))

    with forced_schedule(model.transformer, ScheduleChange(lambda: current["steps"]), lambda: len(scheduler.timesteps)):
        results, cost = search_schedules(error, STEPS, [3, 5], passes=1, radius=1, greedy=True)
        for computed, result in results.items():
            assert len(result.steps) == computed and 0 in result.steps
            assert result.error <= result.uniform_error
            assert result.uniform_error == error(uniform_schedule(STEPS, computed))  # deterministic, re-generated
            assert result.error == error(result.steps)
        # at this budget the moves find a better schedule than uniform on this output
        assert min(r.error / r.uniform_error for r in results.values()) < 1.0
    assert 0 < cost.evaluations == sum(cost.per_budget.values())


def test_local_search_accepts_only_improvements():
    """On an error with a known optimum: every accepted move lowers it, and the start is kept when no move helps."""
    target = frozenset({0, 5, 9, 14})

    def error(steps):
        return float(sum(min(abs(s - t) for t in target) for s in steps))

    start = uniform_schedule(15, 4)  # {0, 5, 9, 14}: already the optimum
    assert local_search(error, start, 15, passes=3, radius=2) == (start, 0.0)
    moved, value = local_search(error, frozenset({0, 3, 11, 14}), 15, passes=3, radius=2)
    assert value < error(frozenset({0, 3, 11, 14})) and 0 in moved and len(moved) == 4


def test_taylorseer_probe_counts_predicted_attention_as_skipped(model):
    from diffusers import TaylorSeerCacheConfig

    full = generate(model)
    for interval, expected in ((1, 2 * STEPS), (3, None)):
        model.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=interval, taylor_factors_dtype=torch.float32))
        probe = ComputeProbe(model.transformer)
        try:
            image = generate(model)
        finally:
            probe.remove()
            model.transformer.disable_cache()
        assert probe.calls == 2 * STEPS
        if expected is not None:  # cache_interval=1: every step computed, bit-identical to full compute
            assert probe.computed == expected and np.array_equal(image, full)
        else:
            assert probe.computed < 2 * STEPS and not np.array_equal(image, full)


def test_taylorseer_identifiers_reach_wan_attention():
    """diffusers' default TaylorSeer patterns hook no module of Wan (attn1/attn2 under re.fullmatch), so it computes
    every step; the sweep's identifiers hook every block's attention, and the probe sees predicted calls."""
    from diffusers import TaylorSeerCacheConfig

    from calibrate.sweep import taylorseer_identifiers

    wan = load_model(compose_cfg("sweep", ["model=reference_video"]).model, "cpu", torch.float32)
    recipe = Recipe(num_inference_steps=8, height=32, width=32, num_frames=9, guidance=5.0, negative_prompt="")
    computed = {}
    for name, identifiers in (("default", None), ("sweep", taylorseer_identifiers(wan.transformer))):
        wan.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=3, cache_identifiers=identifiers, taylor_factors_dtype=torch.float32))
        probe = ComputeProbe(wan.transformer)
        try:
            wan.generate("a red circle moving right", 1000, recipe, output_type="np")
        finally:
            probe.remove()
            wan.transformer.disable_cache()
        computed[name] = (probe.computed, probe.calls)
    assert computed["default"] == (16, 16)
    assert computed["sweep"][1] == 16 and computed["sweep"][0] < 16


def test_perceptual_score_of_full_against_full_is_perfect():
    judge = Perceptual("reference")
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 3)).astype(np.float32)
    assert judge(image, image.copy(), "a three") == (True, 0.0)
    agrees, distance = judge(np.clip(image + 0.3 * rng.standard_normal(image.shape), 0, 1), image, "a three")
    assert 0 < distance <= 2**0.5
    assert Perceptual("tiny").available is False and Perceptual("tiny")(image, image, "x") == (None, None)


def test_pareto_front_is_sorted_and_non_dominated():
    points = [(2.0, 30.0), (1.0, 50.0), (1.5, 40.0), (1.6, 35.0), (2.5, 20.0), (1.4, 45.0), (1.2, 44.0)]
    assert pareto_front(points) == [(1.0, 50.0), (1.4, 45.0), (1.5, 40.0), (1.6, 35.0), (2.0, 30.0), (2.5, 20.0)]


def test_target_check_interpolates_the_rule_against_peers_and_bound():
    """Hand-made rows: the rule is 1.5 dB above FirstBlockCache at every fraction, 0.5 dB above MagCache (so the
    target is not met), 3 dB under the search from 0.3 to 0.5; fractions outside a curve's range are left out."""
    from calibrate.sweep import Row, target_check

    def row(method, fraction, psnr, speedup):
        return Row(method, fraction, fraction, speedup, psnr, 1.0, None, None, None, 4, 0.1)

    line = lambda a, f: 20.0 + 30.0 * f + a  # noqa: E731  PSNR rising with the computed fraction
    rows = [row("teacache", f, line(0.0, f), 2 - f) for f in (0.25, 0.45, 0.75)]  # speedup linear in f too
    rows += [row("first_block_cache", f, line(-1.5, f), 2 - f) for f in (0.2, 0.8)]
    rows += [row("mag_cache", f, line(-0.5, f), 2 - f) for f in (0.4, 0.6)]
    rows += [row("schedule_search", f, line(3.0, f), 2 - f) for f in (0.3, 0.5)]
    report = target_check(rows, "teacache")
    fbc, mag = report["computed_fraction"]["first_block_cache"], report["computed_fraction"]["mag_cache"]
    assert fbc["at"] == [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7] and set(fbc["margin_db"]) == {1.5}
    assert mag["at"] == [0.4, 0.45, 0.5, 0.55, 0.6] and set(mag["margin_db"]) == {0.5}
    search = report["computed_fraction"]["schedule_search"]
    assert search["at"] == [0.3, 0.35, 0.4, 0.45, 0.5] and set(search["gap_db"]) == {3.0}
    assert "schedule_search" not in report["wall_speedup"] and report["wall_speedup"]["first_block_cache"]["margin_db"]
    assert report["met"] is False
    better = [r if r.method != "teacache" else Row(**{**r.__dict__, "psnr": r.psnr + 1.0}) for r in rows
              if r.method != "schedule_search"]
    assert target_check(better, "teacache")["met"] is True  # 1.5 dB over MagCache, 2.5 over FirstBlockCache
    assert target_check(rows, "teacache_drift") is None  # no rows of that rule


def test_sweep_rows_for_the_new_methods(tmp_path):
    cfg = compose_cfg(
        "sweep",
        [
            "limit=1", "repeats=1", "methods=[taylorseer,uniform,schedule_search]", "thresholds.taylorseer=[1,3]",
            "budgets=[0.5]", "schedule_search.passes=1", f"num_inference_steps={STEPS}", f"out={tmp_path}/sweep", "device=cpu",
        ],
    )
    out = run_sweep(cfg)
    document = json.loads((out / "sweep.json").read_text())
    rows = {(r["method"], r["setting"]): r for r in document["rows"]}
    assert set(rows) == {("full", None), ("taylorseer", 1.0), ("taylorseer", 3.0), ("uniform", 0.5), ("schedule_search", 0.5)}
    keys = {"psnr", "ssim", "lpips", "agreement", "feature_distance", "computed_fraction", "wall_speedup"}
    assert all(keys <= set(r) for r in rows.values())
    full = rows[("full", None)]
    assert full["agreement"] == 1.0 and full["feature_distance"] == 0.0
    identity = rows[("taylorseer", 1.0)]
    assert identity["max_abs_diff"] == 0.0 and identity["computed_fraction"] == 1.0 and identity["psnr"] is None
    assert rows[("taylorseer", 3.0)]["computed_fraction"] < 1.0
    for method in ("uniform", "schedule_search"):
        assert rows[(method, 0.5)]["computed_fraction"] == 0.5  # 4 of 8 steps
    assert rows[("schedule_search", 0.5)]["psnr"] >= rows[("uniform", 0.5)]["psnr"]
    search = document["schedule_search"]
    assert search["evaluations"] > 0 and search["per_output"][0]["budgets"][0]["computed_steps"] == 4
    # one search per forecast, the better kept; the row is generated with the kept schedule and its forecast
    budget = search["per_output"][0]["budgets"][0]
    assert set(budget["psnr_by_forecast"]) == set(search["settings"]["forecasts"]) == {"reuse", "linear", "output_linear", "output_corrected"}
    assert budget["psnr"] == max(budget["psnr_by_forecast"].values()) == budget["psnr_by_forecast"][budget["forecast"]]
    assert rows[("schedule_search", 0.5)]["psnr"] == pytest.approx(budget["psnr"], abs=2e-3)
    assert (out / "pareto.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["methods=[uniform]", "budgets=[0.3,1.5]"], "not a computed fraction"),
        (["methods=[schedule_search]", "schedule_search.passes=-1"], "schedule_search.passes must be an integer >= 0"),
        (["methods=[schedule_search]", "schedule_search.radius=0"], "schedule_search.radius must be an integer >= 1"),
        (["methods=[uniform,tayloseer]"], "unknown method 'tayloseer'"),
        (["methods=[schedule_search]", "schedule_search.forecasts=[reuse,cubic]"], "schedule_search.forecasts must be auto or list"),
        (["methods=[taylorseer]", "taylorseer.factors_dtype=float8"], "taylorseer.factors_dtype='float8' is not"),
        (["methods=[taylorseer]", "thresholds.taylorseer=[0,2]"], "cache intervals, integers >= 1"),
    ],
)
def test_bad_settings_of_the_new_methods_are_refused_before_loading(tmp_path, monkeypatch, overrides, message):
    import calibrate.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(calibrate.models, "load_model", no_load)
    cfg = compose_cfg("sweep", [*overrides, f"out={tmp_path}/s", "device=cpu"])
    with pytest.raises(ConfigError, match=message):
        run_sweep(cfg)


def forecast_run(model, schedule, forecast):
    """Per call (cond and uncond alternate): the model's own output (proj_out's) and what the transformer returned,
    under a forced schedule and ``forecast``; and the scheduler's sigmas."""
    transformer, scheduler = model.transformer, model.pipe.scheduler
    raw, returned = [], []
    handles = [
        transformer.proj_out.register_forward_hook(lambda m, a, out: raw.append(out.detach().clone())),
        transformer.register_forward_hook(lambda m, a, out: returned.append(out[0].detach().clone())),
    ]
    try:
        with forced_schedule(transformer, ScheduleChange(frozenset(schedule)), lambda: len(scheduler.timesteps), forecast, scheduler):
            generate(model)
    finally:
        for handle in handles:
            handle.remove()
    assert len(raw) == len(returned) == 2 * STEPS
    return raw, returned, scheduler.sigmas.double()


@pytest.mark.parametrize("forecast", ["output_linear", "output_corrected"])
def test_output_forecasts_against_a_plain_reference(model, forecast):
    """A skipped call returns v_a + (v_a - v_b) (k - a) / (a - b), v_a and v_b the branch's last two computed
    outputs (v_a alone until two exist); a computed call returns its own output, and under output_corrected, after
    skipped steps a+1..k-1, v_k + sum_j dsigma_j (v~_j - v^_j) / dsigma_k with v~_j = v_a + (v_k - v_a)(j - a)/(k - a),
    v^_j what step j returned, dsigma_j = sigma_{j+1} - sigma_j (the Euler step the latent then takes)."""
    schedule = {0, 3, 4, 7}
    raw, returned, sigma = forecast_run(model, schedule, forecast)
    for branch in (0, 1):
        computed, used = [], {}
        for step in range(STEPS):
            i = 2 * step + branch
            if step not in schedule:
                (b, v_b), (a, v_a) = computed[-2:] if len(computed) > 1 else (computed[-1], computed[-1])
                expected = v_a if a == b else v_a + (v_a - v_b) * (step - a) / (a - b)
                used[step] = expected
            else:
                v = raw[i]
                expected = v
                if forecast == "output_corrected" and computed and computed[-1][0] < step - 1:
                    a, v_a = computed[-1]
                    shift = sum((sigma[j + 1] - sigma[j]).item() * (v_a + (v - v_a) * (j - a) / (step - a) - used[j])
                                for j in range(a + 1, step))
                    expected = v + shift / (sigma[step + 1] - sigma[step]).item()
                computed.append((step, v))
            torch.testing.assert_close(returned[i], expected, rtol=1e-4, atol=1e-5)
    # the correction changed what the computed calls after a skip returned; output_linear left them alone
    changed = not torch.equal(returned[2 * 3], raw[2 * 3])
    assert changed == (forecast == "output_corrected")


def test_output_corrected_lands_the_euler_latent_on_the_reestimated_path(model):
    """Its point: after computed step k the latent is where the re-estimated outputs would have taken it. With no
    CFG (one branch) the pipeline's latent after step 4 under {0, 4} equals x_0 + dsigma_0 v_0 + sum_{j=1..3}
    dsigma_j v~_j + dsigma_4 v_4, v~ on the line from v_0 to v_4; output_linear's does not."""
    recipe = Recipe(num_inference_steps=STEPS, height=32, width=32, guidance=1.0, negative_prompt="")
    transformer, scheduler = model.transformer, model.pipe.scheduler
    latents = {}
    for forecast in ("output_linear", "output_corrected"):
        raw, inputs = [], []
        handles = [
            transformer.proj_out.register_forward_hook(lambda m, a, out: raw.append(out.detach().double())),
            transformer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"].detach().double()), with_kwargs=True),
        ]
        try:
            with forced_schedule(transformer, ScheduleChange(frozenset({0, 4, 5, 6, 7})), lambda: len(scheduler.timesteps), forecast, scheduler):
                model.generate(PROMPT, SEED, recipe, output_type="np")
        finally:
            for handle in handles:
                handle.remove()
        sigma = scheduler.sigmas.double()
        v0, v4 = raw[0], raw[4]
        expected = inputs[0] + (sigma[1] - sigma[0]) * v0
        expected = expected + sum((sigma[j + 1] - sigma[j]) * (v0 + (v4 - v0) * j / 4) for j in range(1, 4))
        expected = expected + (sigma[5] - sigma[4]) * v4
        latents[forecast] = (inputs[5], expected)
    torch.testing.assert_close(*latents["output_corrected"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(*latents["output_linear"], rtol=1e-4, atol=1e-4)


def test_output_corrected_needs_a_sampler_it_lands(model):
    from runtime import TeaCache
    from runtime.forecasts import forecasts_for

    every = ("reuse", "linear", "output_linear", "output_corrected")
    assert forecasts_for(model.pipe.scheduler) == every
    assert "output_corrected" not in forecasts_for(None)
    # the fit's and the sweep's searches: auto is every forecast the sampler runs; naming one it cannot is refused
    from diffusers import (
        DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, SASolverScheduler, UniPCMultistepScheduler,
    )

    from calibrate.schedule_search import resolve_forecasts

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    for multistep in (unipc, DPMSolverMultistepScheduler(), DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                      DPMSolverSinglestepScheduler(), DEISMultistepScheduler()):
        assert resolve_forecasts("auto", multistep, "search_forecasts") == every
    for other in (UniPCMultistepScheduler(thresholding=True), DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
                  DPMSolverMultistepScheduler(variance_type="learned_range"), DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver++"),
                  DEISMultistepScheduler(thresholding=True), SASolverScheduler()):
        assert resolve_forecasts("auto", other, "search_forecasts") == ("reuse", "linear", "output_linear")
        with pytest.raises(ConfigError, match=f"search_forecasts names output_corrected.*{type(other).__name__}; drop it"):
            resolve_forecasts(["reuse", "output_corrected"], other, "search_forecasts")
    with pytest.raises(ConfigError, match="forecast output_corrected .* bare transformer.*use forecast=output_linear"):
        TeaCache.from_coefficients("reference", rule="teacache", forecast="output_corrected").apply(model.transformer)
    assert not hasattr(model.transformer, "_diffusers_hook") or model.transformer._diffusers_hook.get_hook("teacache") is None
    with TeaCache.from_coefficients("reference", rule="teacache", forecast="output_corrected", rel_l1_thresh=0.3).apply(model.pipe) as cache:
        generate(model)
    assert 0 < cache.stats["cond"].skipped < STEPS


def test_probed_sampler_weights_are_the_euler_steps_and_a_random_sampler_is_refused():
    """probe_weights on Euler gives its closed form, W[k, i] = sigma_{i+1} - sigma_i for i <= k (0 above), and w0 = 1;
    a sampler whose step is not linear in the model output (Euler with stochastic sampling) is refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from runtime.errors import TeaCacheError
    from runtime.forecasts import probe_weights

    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(7)
    w0, weights = probe_weights(euler, 0)
    steps = euler.sigmas.double().diff()
    expected = torch.tril(steps.repeat(7, 1))
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w0, torch.ones(7, dtype=torch.float64))
    stochastic = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    stochastic.set_timesteps(7)
    with pytest.raises(TeaCacheError, match="linear in the model output.*FlowMatchEulerDiscreteScheduler.*output_linear"):
        probe_weights(stochastic, 0)


@pytest.mark.parametrize("forecast", ["output_linear", "output_corrected"])
def test_a_schedule_rule_under_an_output_forecast_runs_nothing_of_a_skipped_call(model, forecast):
    """fixed_schedule with an output forecast needs neither the signal nor the stack on a skipped call, so the
    runtime skips the whole call: the model's head (proj_out) runs at the computed calls only, and the image is
    bit for bit the one the forced schedule gives (which runs the embeddings and head and then replaces the
    output); the skipped calls are recorded as skipped, with no x."""
    from runtime import DecisionRule
    from runtime.hooks import TeaCacheConfig, apply_teacache, remove_teacache
    from runtime.stats import CacheStats

    transformer, scheduler = model.transformer, model.pipe.scheduler
    schedule = frozenset({0, 3, 4, 7})
    heads = [0]
    handle = transformer.proj_out.register_forward_pre_hook(lambda *_: heads.__setitem__(0, heads[0] + 1))
    try:
        with forced_schedule(transformer, ScheduleChange(schedule), lambda: len(scheduler.timesteps), forecast, scheduler):
            forced = generate(model)
        forced_heads, heads[0] = heads[0], 0
        rule = DecisionRule((1.0, 0.0), None, rel_l1_thresh=0.5, warmup_steps=1, final_steps=0, max_consecutive_skips=None,
                            rule="fixed_schedule", schedule=schedule, forecast=forecast)
        stats = CacheStats()
        apply_teacache(transformer, TeaCacheConfig(rule, "modulated_input", stats, lambda: len(scheduler.timesteps), scheduler=scheduler))
        try:
            fast = generate(model)
        finally:
            remove_teacache(transformer)
    finally:
        handle.remove()
    assert forced_heads == 2 * STEPS and heads[0] == 2 * len(schedule)
    np.testing.assert_array_equal(fast, forced)
    for branch in ("cond", "uncond"):
        trace = stats.branches[branch].trace
        assert [r.step for r in trace if r.computed] == sorted(schedule)
        assert all(math.isnan(r.x) for r in trace if not r.computed)
