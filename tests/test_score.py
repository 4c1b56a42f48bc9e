"""Scoring a coefficients file against real traces of the trained reference model."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from calibrate.record import record
from calibrate.score import ScoreError, ScoreSettings, score
from calibrate.traces import load_traces
from runtime import DecisionDefaults, DecisionRule, load_coefficients, replay

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference_traces(tmp_path_factory):
    """3 prompts x 1 seed the reference fit never saw (seed 7), full compute, 25 steps, true CFG."""
    out = tmp_path_factory.mktemp("score") / "ref.h5"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("record", ["model=reference", "limit=3", "seeds=[7]", f"out={out}", "device=cpu"])
    return record(cfg)


def run_score(*args, cwd):
    return subprocess.run([sys.executable, "-m", "calibrate.score", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def decision_points(c, traces):
    """(x, y) on the steps where the rule decides, gathered independently of calibrate.score."""
    field = {"modulated_input": "x", "timestep_embedding": "x_temb"}[c.signal]
    xs, ys = [], []
    for t in traces.trajectories:
        n = len(t.data["y"])
        for step in range(n):
            if step == 0 or step < c.defaults.warmup_steps or step >= n - c.defaults.final_steps:
                continue
            x, y = float(t.data[field][step]), float(t.data["y"][step])
            if np.isfinite(x) and np.isfinite(y):
                xs.append(x)
                ys.append(y)
    return np.array(xs), np.array(ys)


def test_own_file_on_new_seed_is_ok_and_numbers_recompute(reference_traces):
    c = load_coefficients("reference").for_rule("teacache")  # what score scores: the upstream rule's view
    traces = load_traces(reference_traces)
    report = score(c, traces)
    x, y = decision_points(c, traces)
    assert report["decision_points"] == x.size == len(traces.trajectories) * (25 - 2)
    prediction = np.maximum(np.polyval(c.coefficients, np.clip(x, *c.x_range)), 0)
    assert report["r2_decision"] == pytest.approx(1 - np.sum((y - prediction) ** 2) / np.sum((y - y.mean()) ** 2), rel=1e-9)
    lo, hi = c.x_range
    assert report["share_outside_x_range"] == pytest.approx(np.mean((x < lo) | (x > hi)))
    # The replayed table is the runtime's own replay, at the file's thresholds.
    assert [r["rel_l1_thresh"] for r in report["thresholds"]] == [r.rel_l1_thresh for r in c.thresholds]
    rule = DecisionRule(c.coefficients, c.x_range, c.defaults.rel_l1_thresh, 1, 1)
    x_all = torch.tensor(np.stack([t.data["x"] for t in traces.trajectories]))
    assert report["computed_fraction_at_threshold"] == pytest.approx(replay(rule, x_all).double().mean().item(), abs=1e-4)
    fractions = [r["computed_fraction"] for r in report["thresholds"]]
    assert fractions[0] == 1.0 and all(a >= b for a, b in zip(fractions, fractions[1:]))
    assert report["recalibrate"] is False and report["summary"].startswith("ok: ")


def test_decision_steps_leave_out_warmup_and_final_steps(reference_traces):
    c = load_coefficients("reference")
    c = dataclasses.replace(c, defaults=DecisionDefaults(c.defaults.rel_l1_thresh, warmup_steps=4, final_steps=3), thresholds=())
    report = score(c, load_traces(reference_traces))
    assert report["decision_points"] == 6 * (25 - 4 - 3)


def test_published_file_is_told_to_recalibrate(reference_traces):
    report = score(load_coefficients("qwen_image"), load_traces(reference_traces))
    assert report["recalibrate"] is True
    assert report["r2_decision"] < 0.5 and report["r2_fresh_fit"] > report["r2_decision"] + 0.1
    assert report["share_outside_x_range"] is None  # published: no x range stated
    assert report["recipe_differs"]["num_inference_steps"] == [50, 25]
    assert report["summary"].startswith("recalibrate: ") and "R²" in report["summary"]


def test_x_outside_the_range_is_counted(reference_traces):
    c = load_coefficients("reference")
    narrow = dataclasses.replace(c, x_range=(0.04, 0.05))
    traces = load_traces(reference_traces)
    report = score(narrow, traces)
    x, _ = decision_points(narrow, traces)
    assert report["share_below_x_range"] == pytest.approx(np.mean(x < 0.04))
    assert report["share_above_x_range"] == pytest.approx(np.mean(x > 0.05))
    assert report["share_outside_x_range"] > 0.1 and any("outside the file's x_range" in r for r in report["reasons"])


def test_negative_and_decreasing_regions(reference_traces):
    c = load_coefficients("reference")
    # p(x) = -100 x^2 + 6 x: decreasing above x = 0.03, negative above x = 0.06, evaluated as is.
    bent = dataclasses.replace(c, coefficients=(-100.0, 6.0, 0.0), x_range=None, thresholds=(), fit=None,
                               provenance={"kind": "published", "source": "test"})
    traces = load_traces(reference_traces)
    report = score(bent, traces)
    x, _ = decision_points(bent, traces)
    [[neg_lo, neg_hi]] = report["negative_on"]
    [[dec_lo, dec_hi]] = report["decreasing_on"]
    assert neg_lo == pytest.approx(0.06, abs=1e-4) and neg_hi == pytest.approx(x.max())
    assert dec_lo == pytest.approx(0.03, abs=1e-4)
    assert report["share_negative"] == pytest.approx(np.mean(x > 0.06))
    assert report["share_decreasing"] == pytest.approx(np.mean(x > 0.03))
    assert any("negative or decreasing" in r for r in report["reasons"])


def test_other_transformer_class_is_refused(reference_traces):
    with pytest.raises(ScoreError, match="FluxTransformer2DModel.*QwenImageTransformer2DModel"):
        score(load_coefficients("flux"), load_traces(reference_traces))
    with pytest.raises(ScoreError, match="max_outside"):
        ScoreSettings(max_outside=2.0)


def test_cli_writes_png_and_json_and_ends_with_the_verdict(reference_traces, tmp_path):
    result = run_score("coefficients=qwen_image", f"traces={reference_traces}", f"out={tmp_path / 's.png'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("recalibrate: qwen_image")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["recalibrate"] is True and report["decision_points"] == 6 * 23
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.png"]  # no outputs/ or logs


@pytest.mark.parametrize(
    "args, expected",
    [
        (["coefficients=flux", "traces=TRACES"], "holds traces of a QwenImageTransformer2DModel"),
        (["coefficients=reference", "traces=missing.h5"], "trace file missing.h5 does not exist"),
        (["coefficients=nope", "traces=TRACES"], "no coefficients named 'nope'"),
        (["coefficients=bad.json", "traces=TRACES"], "is not valid JSON"),
        (["coefficients=reference", "traces=bad.json"], "is not a readable HDF5 file"),
        (["coefficients=reference"], "traces= is required"),
        (["coefficients=reference", "traces=TRACES", "out=x.jpg"], "must name a .png"),
    ],
)
def test_cli_bad_input_is_one_error_line(reference_traces, tmp_path, args, expected):
    (tmp_path / "bad.json").write_text("{oops")
    args = [a.replace("TRACES", str(reference_traces)) for a in args]
    result = run_score(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))
