"""Every family without an offline diffusers pipeline: `calibrate.record model=tiny_<family>` then
`calibrate.fit`, end to end, and the fitted file drives the runtime, through a sampling loop around the
real tiny transformer (calibrate.tiny.TinyTransformerLoop)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from calibrate.fit import run_fit
from calibrate.models import load_model
from calibrate.recipe import Recipe
from calibrate.record import record
from calibrate.tiny import TINY_LOOP_FAMILIES
from calibrate.traces import load_traces
from runtime import TeaCache, load_coefficients

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("family", TINY_LOOP_FAMILIES)
def test_record_fit_and_serve(tmp_path, family):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("record", [f"model=tiny_{family}", "limit=4", "seeds=[0]", f"out={tmp_path / 't.h5'}", "device=cpu"])
        traces_path = record(cfg)
        out = run_fit(compose("fit", [f"traces={traces_path}", f"out={tmp_path / 'c.json'}", "plot=false", "heldout_fraction=0.5"]))
    traces = load_traces(traces_path)
    model = load_model(cfg.model, "cpu", torch.float32)
    has_context = hasattr(model.transformer, "cache_context")
    assert {t.branch for t in traces.trajectories} == ({"cond", "uncond"} if has_context else {"default"})
    coefficients = load_coefficients(out)
    assert coefficients.transformer_class == type(model.transformer).__name__ and coefficients.x_range is not None

    recipe = Recipe.from_config(cfg)
    reference = model.generate("a red fox", 0, recipe)[0]
    with TeaCache.from_coefficients(out, rel_l1_thresh=0.0).apply(model.pipe) as cache:
        zero = model.generate("a red fox", 0, recipe)[0]
    assert torch.equal(zero, reference)
    branches = ("cond", "uncond") if has_context else ("default",)
    assert [cache.stats[b].computed for b in branches] == [recipe.num_inference_steps] * len(branches)
    with TeaCache.from_coefficients(out, rel_l1_thresh=10.0).apply(model.pipe) as cache:
        model.generate("a red fox", 0, recipe)
    assert all(cache.stats[b].skipped > 0 for b in branches)
