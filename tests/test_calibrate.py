"""Calibration end to end on tiny random-init pipelines: record -> fit -> runtime, and every bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from calibrate.fit import FitSettings, fit_traces, run_fit
from calibrate.fitting import FitError, heldout_prompts
from calibrate.models import ModelLoadError, load_model
from calibrate.recipe import Recipe
from calibrate.record import record
from calibrate.traces import TRACE_SCHEMA, TraceFileError, TraceWriter, load_traces
from runtime import TeaCache, load_coefficients

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def compose_cfg(name, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def record_to(out, model="tiny_qwen_image", limit=8, seeds="[0]", extra=()):
    cfg = compose_cfg("record", [f"model={model}", f"limit={limit}", f"seeds={seeds}", f"out={out}", "device=cpu", *extra])
    return record(cfg)


def fit_to(traces, out, extra=()):
    return run_fit(compose_cfg("fit", [f"traces={traces}", f"out={out}", *extra]))


def run_module(module, *args, cwd):
    return subprocess.run(
        [sys.executable, "-m", module, *args, f"hydra.run.dir={cwd}/hydra"],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def qwen_calibration(tmp_path_factory):
    """Traces of 8 prompts x 2 seeds on tiny_qwen_image, and the file fitted from them."""
    folder = tmp_path_factory.mktemp("qwen")
    traces = record_to(folder / "t.h5", limit=8, seeds="[0,1]")
    return traces, fit_to(traces, folder / "c.json")


@pytest.mark.parametrize("model", ["tiny_qwen_image", "tiny_flux", "tiny_wan"])
def test_record_fit_apply(tmp_path, model):
    traces = record_to(tmp_path / "t.h5", model=model, limit=6)
    data = load_traces(traces)
    steps = data.recipe.num_inference_steps
    assert {t.branch for t in data.trajectories} == {"cond", "uncond"}
    assert len(data.trajectories) == 12
    for t in data.trajectories:
        assert t.data["step"].tolist() == list(range(steps))
        for field in ("x", "x_temb", "y", "y_residual"):
            assert np.isnan(t.data[field][0]), "no previous step at step 0"
            assert np.isfinite(t.data[field][1:]).all()

    path = fit_to(traces, tmp_path / "c.json")
    coefficients = load_coefficients(path)
    assert coefficients.provenance["kind"] == "calibrated"
    assert (tmp_path / "c.png").stat().st_size > 10_000

    cfg = compose_cfg("record", [f"model={model}"])
    loaded = load_model(cfg.model, "cpu", torch.float32)
    with TeaCache.from_coefficients(path).apply(loaded.pipe) as cache:
        loaded.generate("a lighthouse in fog", 3, Recipe.from_config(cfg))
    assert sum(s.skipped for s in cache.stats.values()) > 0
    assert sum(s.computed for s in cache.stats.values()) > 0


def test_recorded_x_is_what_the_runtime_sees(tmp_path):
    """The recorder and the runtime measure the same x on the same full-compute run (threshold 0)."""
    traces = load_traces(record_to(tmp_path / "t.h5", limit=3))
    cfg = compose_cfg("record", ["model=tiny_qwen_image"])
    loaded = load_model(cfg.model, "cpu", torch.float32)
    coefficients = load_coefficients(fit_to(tmp_path / "t.h5", tmp_path / "c.json"))
    first = traces.trajectories[0]
    with TeaCache.from_coefficients(coefficients, rel_l1_thresh=0.0).apply(loaded.pipe) as cache:
        loaded.generate(first.prompt, first.seed, Recipe.from_config(cfg))
    for t in [t for t in traces.trajectories if t.key == first.key]:
        runtime_x = [r.x for r in cache.stats[t.branch].trace]
        np.testing.assert_array_equal(np.array(runtime_x, dtype=np.float32), t.data["x"])


def test_reported_r2_recomputes_from_file_and_traces(qwen_calibration):
    """Headline R² on the decision steps (not step 0, warm-up or final steps), training = prompts and seeds
    both unseen by the held-out split, held out = both held out; all-step R² beside it."""
    traces_path, path = qwen_calibration
    c = load_coefficients(path)
    data = load_traces(traces_path)
    field = {"modulated_input": "x", "timestep_embedding": "x_temb"}[c.signal]
    heldout = set(c.fit["heldout_prompts"])
    assert heldout == heldout_prompts([t.prompt for t in data.trajectories], 0.25)
    assert c.fit["heldout_seeds"] == [1]  # seeds [0, 1]: the highest is held out
    warmup, final = c.defaults.warmup_steps, c.defaults.final_steps

    def r2(held, decision_only):
        xs, ys = [], []
        for t in data.trajectories:
            if held != (t.prompt in heldout and t.seed == 1) or (not held and (t.prompt in heldout or t.seed == 1)):
                continue
            n = len(t.data["y"])
            steps = np.arange(n)
            ok = np.isfinite(t.data[field]) & np.isfinite(t.data["y"])
            if decision_only:
                ok &= (steps >= max(1, warmup)) & (steps < n - final)
            xs.append(t.data[field][ok])
            ys.append(t.data["y"][ok])
        x, y = np.concatenate(xs).astype(float), np.concatenate(ys).astype(float)
        pred = np.maximum(np.polyval(c.coefficients, np.clip(x, *c.x_range)), 0)  # the runtime's evaluation
        return 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)

    assert c.fit["r2"] == pytest.approx(r2(False, True), rel=1e-5)
    assert c.fit["r2_heldout"] == pytest.approx(r2(True, True), rel=1e-5)
    assert c.fit["r2_all_steps"] == pytest.approx(r2(False, False), rel=1e-5)
    assert c.fit["r2_heldout_all_steps"] == pytest.approx(r2(True, False), rel=1e-5)
    assert c.fit["signals"][c.signal]["r2_heldout"] == pytest.approx(c.fit["r2_heldout"], rel=1e-5)
    assert c.fit["min_slope"] >= -1e-6 * max(abs(v) for v in c.coefficients)


def test_threshold_table_matches_the_runtime(qwen_calibration):
    traces_path, path = qwen_calibration
    c = load_coefficients(path)
    data = load_traces(traces_path)
    runs = sorted({(t.prompt, t.seed) for t in data.trajectories})
    cfg = compose_cfg("record", ["model=tiny_qwen_image"])
    loaded = load_model(cfg.model, "cpu", torch.float32)
    recipe = Recipe.from_config(cfg)
    rows = [r for r in c.thresholds if 0.3 <= r.computed_fraction <= 0.9]
    assert rows, "the table should span useful fractions"
    for row in rows[:: max(1, len(rows) // 3)]:
        with TeaCache.from_coefficients(path, rel_l1_thresh=row.rel_l1_thresh).apply(loaded.pipe) as cache:
            for prompt, seed in runs:
                loaded.generate(prompt, seed, recipe)
        stats = cache.stats.values()
        actual = sum(s.computed for s in stats) / sum(s.calls for s in stats)
        assert actual == pytest.approx(row.computed_fraction, abs=0.05), row


def test_rule_variants_are_calibrated_from_the_same_traces(qwen_calibration):
    """The fit writes each variant's data (dsigma step weights from the recorded timesteps; a content-
    independent schedule) and its own threshold table, and the runtime runs them as the table says."""
    traces_path, path = qwen_calibration
    c = load_coefficients(path)
    data = load_traces(traces_path)
    steps = c.recipe["num_inference_steps"]
    tau = np.median(np.stack([t.data["timestep"] for t in data.trajectories]), axis=0)
    d = np.abs(np.diff(tau))
    np.testing.assert_allclose(c.step_weights[:-1], d / d.mean(), atol=1e-4)
    assert set(c.rules) == {"teacache_dsigma", "teacache_joint", "teacache_drift"}
    cfg = compose_cfg("record", ["model=tiny_qwen_image"])
    loaded = load_model(cfg.model, "cpu", torch.float32)
    recipe = Recipe.from_config(cfg)
    runs = sorted({(t.prompt, t.seed) for t in data.trajectories})
    for rule in ("teacache_dsigma", "teacache_joint", "teacache_drift"):
        entry = c.rules[rule]
        row = next(r for r in entry["thresholds"] if r["rel_l1_thresh"] == entry["rel_l1_thresh"])
        with TeaCache.from_coefficients(path, rule=rule).apply(loaded.pipe) as cache:
            assert cache.rule.rule == rule and cache.rel_l1_thresh == entry["rel_l1_thresh"]
            for prompt, seed in runs:
                loaded.generate(prompt, seed, recipe)
        stats = cache.stats.values()
        assert sum(s.computed for s in stats) / sum(s.calls for s in stats) == pytest.approx(row["computed_fraction"], abs=0.05)
    # fixed_schedule: as many steps as the default threshold computes on average, whatever the content
    default_row = next(r for r in c.thresholds if r.rel_l1_thresh == c.defaults.rel_l1_thresh)
    assert len(c.schedule) == round(default_row.computed_fraction * steps)
    with TeaCache.from_coefficients(path, rule="fixed_schedule").apply(loaded.pipe) as cache:
        loaded.generate(*runs[0], recipe)
    assert [r.step for r in cache.stats["cond"].trace if r.computed] == sorted(set(c.schedule) | {0, steps - 1})


def test_lagged_changes_are_those_of_the_outputs_and_signals(tmp_path):
    """x_lag / y_lag column k: the change against the call k + 1 back, measured on the tensors themselves
    (the transformer's outputs, caught here by a forward hook); column 0 is x / y."""
    from calibrate.recorder import TraceRecorder
    from runtime.hooks import rel_l1

    cfg = compose_cfg("record", ["model=tiny_qwen_image"])
    loaded = load_model(cfg.model, "cpu", torch.float32)
    outputs = {}
    branch = {"name": None}

    def catch(module, args, output):
        outputs.setdefault(branch["name"], []).append(output[0].detach().clone())

    handle = loaded.transformer.register_forward_hook(catch)
    original = loaded.transformer.cache_context

    def named(name):
        branch["name"] = name
        return original(name)

    loaded.transformer.cache_context = named
    try:
        with TraceRecorder(loaded.pipe, lags=4) as recorder:
            branches = recorder.run(lambda: loaded.generate("a red bicycle", 5, Recipe.from_config(cfg)))
    finally:
        handle.remove()
        del loaded.transformer.cache_context
    for name, data in branches.items():
        steps = len(data["step"])
        assert data["x_lag"].shape == data["y_lag"].shape == (steps, 4)
        np.testing.assert_array_equal(data["x_lag"][:, 0], data["x"])
        np.testing.assert_array_equal(data["y_lag"][:, 0], data["y"])
        outs = outputs[name]
        for i in range(steps):
            for k in range(4):
                if i - k - 1 < 0:
                    assert np.isnan(data["y_lag"][i, k]) and np.isnan(data["x_lag"][i, k])
                else:
                    expected = rel_l1(outs[i], outs[i - k - 1]).item()
                    assert data["y_lag"][i, k] == pytest.approx(expected, rel=1e-5), (name, i, k)
        # the signal drifts: a longer span sees at least roughly a larger change
        assert np.nanmean(data["x_lag"][:, 3]) > np.nanmean(data["x_lag"][:, 0])


def test_drift_rule_is_fitted_on_the_lagged_pairs(qwen_calibration):
    """rules.teacache_drift: its own polynomial, R² recomputed from the traces' lagged pairs on the
    decision steps, max_lag the recorded lags; the runtime's view of it caps the skips there. A file
    fitted on traces without lags has no drift entry, and asking for the rule is refused by name."""
    import dataclasses

    from calibrate.fit import Points, Split
    from calibrate.fitting import PolyFit, r_squared
    from runtime import CoefficientsError

    traces_path, path = qwen_calibration
    c = load_coefficients(path)
    entry = c.rules["teacache_drift"]
    data = load_traces(traces_path)
    assert entry["max_lag"] == data.trajectories[0].data["x_lag"].shape[1] == 6
    assert list(entry["coefficients"]) != list(c.coefficients)
    settings = FitSettings()
    split = Split(frozenset(c.fit["heldout_prompts"]), frozenset(c.fit["heldout_seeds"]))
    points = Points.gather_lagged(data, split, settings, entry["max_lag"])
    fit = PolyFit(tuple(entry["coefficients"]), tuple(entry["x_range"]), "robust")
    for key, mask in (("r2", points.train), ("r2_heldout", points.heldout)):
        mask = mask & points.decision
        assert entry["fit"][key] == pytest.approx(r_squared(points.y[mask], fit.predict(points.x[mask])), abs=1e-5)
    view = c.for_rule("teacache_drift")
    assert view.coefficients == tuple(entry["coefficients"]) and view.defaults.max_consecutive_skips == 6
    capped = dataclasses.replace(c, defaults=c.defaults.with_overrides(max_consecutive_skips=2))
    assert capped.for_rule("teacache_drift").defaults.max_consecutive_skips == 2
    no_drift = dataclasses.replace(c, rules={k: v for k, v in c.rules.items() if k != "teacache_drift"})
    with pytest.raises(CoefficientsError, match="no teacache_drift polynomial"):
        TeaCache.from_coefficients(no_drift, rule="teacache_drift")


def test_speedup_picks_from_the_fitted_table(qwen_calibration):
    _, path = qwen_calibration
    c = load_coefficients(path)
    cache = TeaCache.from_coefficients(path, speedup=1.5)
    row = next(r for r in c.thresholds if r.rel_l1_thresh == cache.rel_l1_thresh)
    assert row.computed_fraction <= 1 / 1.5
    assert cache.rel_l1_thresh == c.defaults.rel_l1_thresh  # the default is chosen the same way


def test_kill_mid_recording_then_resume(tmp_path):
    out = tmp_path / "t.h5"
    args = ["model=tiny_qwen_image", "limit=40", "seeds=[0,1]", f"out={out}", "device=cpu", f"hydra.run.dir={tmp_path}/h"]
    proc = subprocess.Popen([sys.executable, "-m", "calibrate.record", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        finished = 0
        while finished < 6 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)  # waiting on another process: there is no event to wait on
            if out.exists():
                with h5py.File(out, "r") as handle:
                    finished = sum(bool(g.attrs.get("complete")) for g in handle["runs"].values()) // 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert 6 <= finished < 80, "the kill should land mid-run"

    before = load_traces(out)  # readable after SIGKILL
    kept = {t.name: t.data for t in before.trajectories}
    assert len(kept) >= 12 and len(kept) % 2 == 0

    done = subprocess.run([sys.executable, "-m", "calibrate.record", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = load_traces(out)
    names = [t.name for t in after.trajectories]
    assert len(names) == len(set(names)) == 160
    with h5py.File(out) as handle:
        assert len(handle["runs"]) == 160
    for t in after.trajectories:
        if t.name in kept:
            for field, values in kept[t.name].items():
                np.testing.assert_array_equal(t.data[field], values)


def test_two_shards_through_submitit_equal_one_run(tmp_path):
    single = record_to(tmp_path / "single.h5", limit=6, seeds="[0,1]")
    proc = subprocess.run(
        [sys.executable, "-m", "calibrate.record", "-m", "shard=0,1", "num_shards=2", "hydra/launcher=submitit_local",
         "model=tiny_qwen_image", "limit=6", "seeds=[0,1]", f"out={tmp_path}/sharded.h5", "device=cpu",
         f"hydra.sweep.dir={tmp_path}/sweep", "hydra.launcher.timeout_min=10"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(tmp_path.glob("sharded.shard-*-of-2.h5"))
    assert [p.name for p in shards] == ["sharded.shard-0-of-2.h5", "sharded.shard-1-of-2.h5"]
    assert all(len(load_traces(p).trajectories) == 12 for p in shards)

    a = json.loads(fit_to(single, tmp_path / "a.json").read_text())
    b = json.loads(fit_to(f"{tmp_path}/sharded.shard-*-of-2.h5", tmp_path / "b.json").read_text())
    for doc in (a, b):
        del doc["provenance"]
    assert a == b


def test_fit_method_plain_reproduces_polyfit(qwen_calibration):
    traces_path, _ = qwen_calibration
    data = load_traces(traces_path)
    coefficients, _ = fit_traces(data, FitSettings(method="plain", signal="modulated_input"))
    heldout = set(coefficients.fit["heldout_prompts"])
    xs, ys = [], []
    for t in sorted(data.trajectories, key=lambda t: t.name):
        if t.prompt not in heldout and t.seed not in coefficients.fit["heldout_seeds"]:
            xs.append(t.data["x"][1:-1])  # the decision steps: not step 0, not the forced final step
            ys.append(t.data["y"][1:-1])
    expected = np.polyfit(np.concatenate(xs).astype(float), np.concatenate(ys).astype(float), 4)
    np.testing.assert_allclose(coefficients.coefficients, expected, rtol=1e-9)


# ----------------------------------------------------------------------------------- bad input


def test_corrupt_file_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "t.h5"
    out.write_bytes(b"\x89HDF\r\n\x1a\n this is not really hdf5" * 10)
    before = out.read_bytes()
    with pytest.raises(TraceFileError, match=r"t\.h5 is not a readable HDF5 file.*left untouched"):
        record_to(out, limit=1)
    with pytest.raises(TraceFileError, match="not a readable HDF5 file"):
        fit_to(out, tmp_path / "c.json")
    assert out.read_bytes() == before


def test_empty_and_foreign_files(tmp_path):
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(TraceFileError, match="not a readable HDF5 file"):
        load_traces(empty)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle.create_dataset("weights", data=np.zeros(3))
    with pytest.raises(TraceFileError, match="not a TeaCache trace file"):
        load_traces(foreign)
    header_only = tmp_path / "header.h5"
    writer = TraceWriter(header_only, model="tiny_qwen_image", recipe=Recipe(8, 32, 32, guidance=4.0))
    writer.bind("QwenImageTransformer2DModel")
    with pytest.raises(TraceFileError, match="hold no finished trajectories"):
        load_traces(header_only)
    with h5py.File(header_only, "a") as handle:
        handle.attrs["schema"] = "teacache-traces/0"
    with pytest.raises(TraceFileError, match=f"schema 'teacache-traces/0'.*reads '{TRACE_SCHEMA}'"):
        load_traces(header_only)


def test_traces_of_another_model_are_refused(tmp_path, qwen_calibration):
    qwen_traces, _ = qwen_calibration
    flux = record_to(tmp_path / "flux.h5", model="tiny_flux", limit=2)
    before = qwen_traces.read_bytes()
    with pytest.raises(TraceFileError, match="holds traces of model 'tiny_qwen_image', not 'tiny_flux'"):
        record_to(qwen_traces, model="tiny_flux", limit=2)
    assert qwen_traces.read_bytes() == before
    with pytest.raises(TraceFileError, match="does not agree with"):
        load_traces([flux, qwen_traces])
    with pytest.raises(TraceFileError, match="another recipe"):
        record_to(flux, model="tiny_flux", limit=2, extra=["num_inference_steps=6"])


def test_all_nan_traces(tmp_path):
    """A real model whose output layer holds NaN records only non-finite y: the fit says so."""
    cfg = compose_cfg("record", ["model=tiny_qwen_image", "limit=3", f"out={tmp_path}/t.h5", "device=cpu"])
    loaded = load_model(cfg.model, "cpu", torch.float32)
    with torch.no_grad():
        loaded.pipe.transformer.proj_out.weight.fill_(float("nan"))
    import calibrate.record as record_module

    original = record_module.load_model
    record_module.load_model = lambda *a, **k: loaded
    try:
        record(cfg)
    finally:
        record_module.load_model = original
    data = load_traces(tmp_path / "t.h5")
    assert all(np.isnan(t.data["y"]).all() for t in data.trajectories)
    with pytest.raises(Exception, match="every point of .*t.h5 is non-finite"):
        fit_to(tmp_path / "t.h5", tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_lagged_datasets_are_checked_and_old_traces_fit_without_drift(tmp_path):
    """A lagged dataset of the wrong shape is refused by name (the file is left as it was); traces recorded
    with drift_lags=0 fit as before, with no drift entry."""
    traces = record_to(tmp_path / "t.h5", limit=4, extra=["drift_lags=0"])
    data = load_traces(traces)
    assert not any("x_lag" in t.data for t in data.trajectories)
    c = load_coefficients(fit_to(traces, tmp_path / "c.json"))
    assert "teacache_drift" not in c.rules and {"teacache_dsigma", "teacache_joint"} <= set(c.rules)
    steps = data.recipe.num_inference_steps
    with h5py.File(tmp_path / "t.h5", "a") as handle:
        name = sorted(handle["runs"])[0]
        handle["runs"][name].create_dataset("x_lag", data=np.zeros((steps - 1, 3), np.float32))
        handle["runs"][name].create_dataset("y_lag", data=np.zeros((steps - 1, 3), np.float32))
    with pytest.raises(TraceFileError, match="x_lag"):
        load_traces(tmp_path / "t.h5")
    writer = TraceWriter(tmp_path / "w.h5", model="tiny_qwen_image", recipe=data.recipe)
    t = data.trajectories[0]
    bad = {**t.data, "x_lag": np.zeros((steps, 2), np.float32), "y_lag": np.zeros((steps, 3), np.float32)}
    with pytest.raises(TraceFileError, match="x_lag and y_lag of different shapes"):
        writer.append("k", t.prompt, 0, t.seed, {"cond": bad})
    writer.close()


def test_unknown_model_name(tmp_path):
    proc = run_module("calibrate.record", "model=not_a_model", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'model/not_a_model'" in proc.stderr
    assert "tiny_qwen_image" in proc.stderr  # hydra lists the available ones


def test_missing_weights_give_one_clear_error(tmp_path):
    proc = run_module("calibrate.record", "model=qwen_image", "limit=1", cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the weights of model=qwen_image could not be loaded from 'Qwen/Qwen-Image'")
    assert "model.path=/local/dir" in last
    assert "Traceback" not in proc.stderr
    proc = run_module("calibrate.record", "model=flux", "model.path=/no/such/dir", "limit=1", cwd=tmp_path)
    assert proc.returncode == 2 and "/no/such/dir" in proc.stderr and "Traceback" not in proc.stderr


def test_nonsense_settings(tmp_path):
    from runtime import ConfigError

    with pytest.raises(ConfigError, match="seeds must be a non-empty list of integers"):
        record_to(tmp_path / "t.h5", seeds="[]")
    with pytest.raises(ConfigError, match="shard must be in"):
        record_to(tmp_path / "t.h5", extra=["shard=2", "num_shards=2"])
    with pytest.raises(ConfigError, match="num_inference_steps must be an integer >= 2"):
        record_to(tmp_path / "t.h5", extra=["num_inference_steps=1"])
    with pytest.raises(ModelLoadError, match="dtype='float8'"):
        record_to(tmp_path / "t.h5", extra=["dtype=float8"])
    assert not (tmp_path / "t.h5").exists()


def test_closed_loop_check_stores_realized_fractions(tmp_path, qwen_calibration):
    traces_path, _ = qwen_calibration
    out = fit_to(traces_path, tmp_path / "c.json", extra=["model=tiny_qwen_image", "closed_loop=2", "plot=false"])
    c = load_coefficients(out)
    realized = [r for r in c.thresholds if r.realized_fraction is not None]
    assert 1 <= len(realized) <= 8 and c.fit["closed_loop"]["pairs"] == 2
    diffs = [abs(r.realized_fraction - r.computed_fraction) for r in realized]
    assert c.fit["closed_loop"]["max_abs_diff"] == pytest.approx(max(diffs), abs=1e-4)
    assert max(diffs) <= 0.15  # the tiny model's trajectories barely react to skipping
    assert set(c.fit["closed_loop"]["rules"]) == {"teacache_dsigma", "teacache_joint", "teacache_drift"}
    for name, summary in c.fit["closed_loop"]["rules"].items():  # each variant's table, run with that variant
        rows = [r for r in c.rules[name]["thresholds"] if r.get("realized_fraction") is not None]
        assert len(rows) == summary["rows"] >= 1
        assert summary["max_abs_diff"] == pytest.approx(
            max(abs(r["realized_fraction"] - r["computed_fraction"]) for r in rows), abs=1e-4)
        assert summary["max_abs_diff"] <= 0.15
    with pytest.raises(FitError, match="closed_loop needs the traces' model"):
        fit_to(traces_path, tmp_path / "d.json", extra=["model=tiny_flux", "closed_loop=2", "plot=false"])
    with pytest.raises(FitError, match="closed_loop must be a number"):
        fit_to(traces_path, tmp_path / "e.json", extra=["closed_loop=-1"])


def test_search_pairs_are_training_prompts_at_seeds_of_their_own(qwen_calibration):
    """search_seed=N: the search's pairs are training prompts spread over the sorted ones (in turn when there are
    fewer than pairs), at seeds N, N+1, ...; without it, recorded training pairs; a seed range that reaches a
    recorded seed is refused, and so is a seed that is not a number >= 0."""
    from calibrate.fit import SearchSettings, training_pairs

    traces_path, coefficients_path = qwen_calibration
    traces, c = load_traces(traces_path), load_coefficients(coefficients_path)
    held_prompts, held_seeds = set(c.fit["heldout_prompts"]), set(c.fit["heldout_seeds"])
    recorded = training_pairs(traces, c, 3)
    assert len(recorded) == 3 and all(p not in held_prompts and s not in held_seeds for p, s in recorded)
    assert set(recorded) <= {(t.prompt, t.seed) for t in traces.trajectories}
    prompts = sorted({t.prompt for t in traces.trajectories} - held_prompts)
    own = training_pairs(traces, c, 3, seed=100)
    assert [s for _, s in own] == [100, 101, 102] and len({p for p, _ in own}) == 3 and {p for p, _ in own} <= set(prompts)
    many = training_pairs(traces, c, len(prompts) + 2, seed=100)
    assert [p for p, _ in many] == prompts + prompts[:2]
    with pytest.raises(FitError, match=r"search_seed=0 gives seeds 0\.\.2, which include the recorded seeds \[0, 1\]"):
        training_pairs(traces, c, 3, seed=0)
    with pytest.raises(FitError, match="search_seed must be an integer >= 0"):
        SearchSettings(pairs=2, seed=-1)


def test_searched_schedule_is_searched_on_training_pairs_and_runs_as_measured(qwen_calibration, tmp_path):
    """fit search=N: one schedule per budget (step 0 in each), searched on training prompt x seed pairs only;
    the runtime then computes exactly those steps (the file's warm-up and final steps do not apply), and its
    outputs on those pairs score what the search recorded (the search measured the runtime itself); the search
    never ends worse than the uniform schedule it starts beside."""
    from calibrate.models import output_array

    traces_path, _ = qwen_calibration
    path = fit_to(traces_path, tmp_path / "s.json",
                  ["model=tiny_qwen_image", "search=2", "search_budgets=[0.5,0.75]", "search_passes=1", "plot=false",
                   "search_forecasts=[reuse,output_corrected]", "search_seed=500"])
    c = load_coefficients(path)
    entry = c.rules["searched_schedule"]
    n = c.recipe["num_inference_steps"]
    assert entry["num_steps"] == n and [len(s) for s in entry["schedules"]] == [6, 4]
    assert all(0 in s for s in entry["schedules"])
    assert [r["rel_l1_thresh"] for r in entry["thresholds"]] == [0.25, 0.5]
    pairs = [(p["prompt"], p["seed"]) for p in entry["fit"]["pairs"]]
    assert len(pairs) == 2 and not {p for p, _ in pairs} & set(c.fit["heldout_prompts"])
    assert [s for _, s in pairs] == [500, 501]  # search_seed: a seed of its own per pair
    assert all(a >= b - 1e-9 for a, b in zip(entry["fit"]["psnr"], entry["fit"]["uniform_psnr"]))
    # one search per forecast; each row keeps the better one, and the runtime runs the row with it
    by_forecast = entry["fit"]["psnr_by_forecast"]
    assert set(by_forecast) == {"reuse", "output_corrected"}
    for i, forecast in enumerate(entry["forecasts"]):
        assert entry["fit"]["psnr"][i] == max(by_forecast["reuse"][i], by_forecast["output_corrected"][i])
        assert by_forecast[forecast][i] == entry["fit"]["psnr"][i]
        assert TeaCache.from_coefficients(path, rule="searched_schedule", rel_l1_thresh=entry["thresholds"][i]["rel_l1_thresh"]).rule.forecast == forecast

    cfg = compose_cfg("record", ["model=tiny_qwen_image"])
    loaded = load_model(cfg.model, "cpu", torch.float32)
    recipe = Recipe.from_config(cfg)
    fulls = [output_array(loaded.generate(p, s, recipe, output_type="np")).astype(np.float64) for p, s in pairs]
    for row, steps, psnr in zip(entry["thresholds"], entry["schedules"], entry["fit"]["psnr"]):
        with TeaCache.from_coefficients(path, rule="searched_schedule", rel_l1_thresh=row["rel_l1_thresh"]).apply(loaded.pipe) as cache:
            outs = [output_array(loaded.generate(p, s, recipe, output_type="np")).astype(np.float64) for p, s in pairs]
        for branch in ("cond", "uncond"):
            assert [r.step for r in cache.stats[branch].trace if r.computed] == steps
        mse = [max(float(np.mean((a - b) ** 2)), 1e-12) for a, b in zip(outs, fulls)]
        assert float(np.mean([-10 * np.log10(m) for m in mse])) == pytest.approx(psnr, abs=2e-3)
