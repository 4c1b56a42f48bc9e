"""The trained video reference model (reference_video/): its data, its checker, its prompt encoder, clips that
follow held-out prompts, and record -> fit -> runtime on it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _landing import reestimated_targets
from hydra import compose, initialize_config_dir

from calibrate.fit import run_fit
from calibrate.models import ModelLoadError, load_model
from calibrate.record import record
from reference_video.checker import accuracy, check_clip, parse_prompt
from reference_video.data import HELDOUT_PAIRS, NUM_FRAMES, batches, render, sample_scene, scene_prompt
from reference_video.evaluate import attribute_rates, generate, prompt_set, shuffled
from reference_video.pipeline import RECIPE, VideoWeightsMissingError, load_video_pipeline, video_prompt_kwargs
from reference_video.prompt_encoder import MAX_LENGTH, ShapesTokenizer
from runtime import TeaCache

ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(name, overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def video_model():
    return load_video_pipeline()


def test_data_is_seeded_and_keeps_heldout_pairs_out_of_training():
    a, scenes_a = next(batches(5, 64))
    b, scenes_b = next(batches(5, 64))
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert a.shape == (64, NUM_FRAMES, 32, 32, 3) and (NUM_FRAMES - 1) % 4 == 0
    assert not {(s.color, s.shape) for sc in scenes_a for s in sc.shapes} & HELDOUT_PAIRS
    rng = np.random.default_rng(1)
    held = [sample_scene(rng, heldout=True) for _ in range(32)]
    assert all((sc.shapes[0].color, sc.shapes[0].shape) in HELDOUT_PAIRS for sc in held)
    assert {len(sc.shapes) for sc in scenes_a} == {1, 2}


def test_checker_on_real_clips_and_against_shuffled_prompts():
    clips, scenes = next(batches(11, 120, heldout=True))
    prompts = [scene_prompt(s) for s in scenes]
    assert accuracy(clips, prompts) >= 0.95
    assert accuracy(clips, shuffled(prompts)) <= 0.15


def test_checker_fails_each_wrong_attribute():
    rng = np.random.default_rng(3)
    scene = sample_scene(rng, max_shapes=1)
    while scene.shapes[0].motion not in ("moving right", "moving left"):
        scene = sample_scene(rng, max_shapes=1)
    clip, prompt = render(scene), scene_prompt(scene)
    s = scene.shapes[0]
    assert check_clip(clip, prompt).passed
    other_color = next(c for c in ("red", "green", "blue", "yellow") if c != s.color)
    other_shape = next(x for x in ("circle", "square", "triangle") if x != s.shape)
    other_motion = "moving left" if s.motion == "moving right" else "moving right"
    for wrong in (prompt.replace(s.color, other_color), prompt.replace(s.shape, other_shape),
                  prompt.replace(s.motion, other_motion), prompt.replace(s.motion, "staying still")):
        assert not check_clip(clip, wrong).passed, wrong
    assert not check_clip(np.zeros_like(clip), prompt).passed
    with pytest.raises(ValueError, match="names no object"):
        parse_prompt("a purple hexagon")


def test_tokenizer_drops_unknown_words_and_pads_to_a_fixed_length():
    tok = ShapesTokenizer()
    ids, mask = tok(["a red circle moving left", "", "the cat", "a red circle moving left on the moon"])
    assert ids.shape == mask.shape == (4, MAX_LENGTH)
    assert mask[1].sum() == mask[2].sum() == 1 and mask[0].sum() == 6  # BOS + five known words
    assert torch.equal(ids[0], ids[3]) and torch.equal(ids[1], ids[2])


def test_missing_weights_are_one_sentence(tmp_path):
    with pytest.raises(VideoWeightsMissingError, match="python -m reference_video.train"):
        load_video_pipeline(tmp_path)
    cfg = compose_cfg("record", ["model=reference_video", f"model.path={tmp_path}"])
    with pytest.raises(ModelLoadError, match="python -m reference_video.train"):
        load_model(cfg.model, "cpu", torch.float32)


def _tiny_training(tmp_path, name, **changes):
    """A trainer run small enough for the suite: a 1-layer transformer on a pool of 24 clips."""
    from reference_video.train import TrainConfig, train

    cfg = TrainConfig(seed=3, vae_steps=2, vae_batch_size=2, pool_size=24, steps=3, batch_size=4, num_layers=1,
                      ffn_dim=64, checkpoint_every=0, **changes)
    meta = train(cfg, tmp_path / name, tmp_path / f"{name}_logs")
    weights = {}
    for part in ("transformer", "prompt_encoder"):
        from safetensors.torch import load_file

        weights.update({f"{part}.{k}": v for k, v in load_file(next((tmp_path / name / part).glob("*.safetensors"))).items()})
    return meta, weights


def test_training_is_seeded_and_a_time_budget_sets_the_step_count(tmp_path):
    meta_a, a = _tiny_training(tmp_path, "a")
    _, b = _tiny_training(tmp_path, "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["config"]["steps"] == 3 and meta_a["trained_on"] == "2 CPU threads"
    meta_c, c = _tiny_training(tmp_path, "c", minutes=0.001)
    # 0.06 s: fewer steps than the rate probe, so the probe's end is the count, written to the config
    from reference_video.train import PROBE_STEPS

    assert meta_c["config"]["steps"] == max(PROBE_STEPS[1], 101)
    assert len(json.loads((tmp_path / "c_logs" / "loss.json").read_text())["transformer_flow_matching_mse"]) == 101


def test_training_options_are_checked_before_any_work(capsys):
    from reference_video.train import main

    with pytest.raises(SystemExit):
        main(["--minutes", "5", "--steps", "100"])
    assert "replaces --steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--minutes", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--device", "cuda"])
        assert "torch sees none here" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_a_gpu_saves_weights_the_cpu_pipeline_loads(tmp_path):
    meta, _ = _tiny_training(tmp_path, "gpu", device="cuda")
    assert meta["trained_on"] != "2 CPU threads"
    pipe, encoder = load_video_pipeline(tmp_path / "gpu")
    assert next(pipe.transformer.parameters()).device.type == "cpu"


def test_trained_model_draws_the_colours_heldout_prompts_name(video_model):
    """The shipped weights draw the named colours (measured on these 16 clips: every object's colour, against 0.60
    for shuffled prompts) and some whole clips pass (0.125, none shuffled); shapes and motions are mostly wrong."""
    pipe, encoder = video_model
    assert type(pipe).__name__ == "WanPipeline" and type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLWan"
    prompts = prompt_set("shapes_heldout")[:16]
    clips = generate(pipe, encoder, prompts, seed=7)
    assert clips.shape == (16, RECIPE["num_frames"], 32, 32, 3)
    rates, control = attribute_rates(clips, prompts), attribute_rates(clips, shuffled(prompts))
    assert rates["objects_present"] >= 0.85 and rates["objects_present"] >= control["objects_present"] + 0.25
    assert rates["clips_passing"] > control["clips_passing"]


def test_record_fit_and_runtime_on_the_video_model(video_model, tmp_path):
    traces = record(compose_cfg("record", ["model=reference_video", "limit=8", "seeds=[0,1]", "device=cpu",
                                           f"out={tmp_path}/v.h5"]))
    path = run_fit(compose_cfg("fit", ["model=reference_video", f"traces={traces}", f"out={tmp_path}/v.json",
                                       "plot=false"]))
    coefficients = json.loads(Path(path).read_text())
    assert coefficients["transformer_class"] == "WanTransformer3DModel" and coefficients["recipe"]["num_frames"] == 9
    assert coefficients["fit"]["prompts"] >= 4 and coefficients["thresholds"]
    pipe, encoder = video_model
    prompts = prompt_set("shapes_heldout")[:4]
    kwargs = {k: v for k, v in RECIPE.items() if k != "negative_prompt"}
    full = pipe(**video_prompt_kwargs(encoder, prompts, ""), **kwargs,
                generator=torch.Generator().manual_seed(7), output_type="np").frames
    with TeaCache.from_coefficients(path, speedup=1.5).apply(pipe) as cache:
        clips = pipe(**video_prompt_kwargs(encoder, prompts, ""), **kwargs,
                     generator=torch.Generator().manual_seed(7), output_type="np").frames
    fraction = sum(s.computed for s in cache.stats.values()) / sum(s.calls for s in cache.stats.values())
    assert fraction < 0.9
    assert np.isfinite(clips).all() and 0 < np.abs(clips - full).mean() < 0.1


# (diffusers' DEIS passes tensors to numpy, which warns on every step under numpy 2)
@pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.schedulers.scheduling_deis_multistep")
@pytest.mark.parametrize("sampler", ["unipc", "dpmsolver++", "dpmsolver++ singlestep", "deis"])
def test_output_corrected_lands_multistep_latents_on_the_reestimated_path(video_model, sampler, monkeypatch):
    """Wan's UniPC (and DPM-Solver++, multistep or singlestep, and DEIS, swapped in) keeps using past outputs, so the correction counts every gap so far.
    With CFG (two branches), after each computed step k the latent the pipeline hands the transformer at k+1 equals
    the one a fresh copy of the scheduler reaches from the same start when fed the target outputs: each branch's
    computed ones as the model computed them, the skipped ones on the line between the computed outputs either side,
    combined with the guidance scale. output_linear's latents are not there."""
    import copy

    from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

    from calibrate.schedule_search import ScheduleChange, forced_schedule
    from runtime.forecasts import sample_of

    pipe, encoder = video_model
    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    swapped = {"dpmsolver++": lambda: DPMSolverMultistepScheduler(**flow, algorithm_type="dpmsolver++"),
               "dpmsolver++ singlestep": lambda: DPMSolverSinglestepScheduler(**flow, algorithm_type="dpmsolver++"),
               "deis": lambda: DEISMultistepScheduler(**flow)}
    if sampler in swapped:
        monkeypatch.setattr(pipe, "scheduler", swapped[sampler]())
    transformer, scheduler = pipe.transformer, pipe.scheduler
    steps, guidance = RECIPE["num_inference_steps"], RECIPE["guidance_scale"]
    schedule = [0, 1, 4, 5, 9, 12, 13, steps - 1]  # a two-point gap, then one-output-free gaps of 2 to 5 steps
    kwargs = {k: v for k, v in RECIPE.items() if k != "negative_prompt"}
    gaps = {}
    for forecast in ("output_linear", "output_corrected"):
        raw, inputs = [], []
        model_forward = transformer.forward

        def recording(*args, **kw):
            inputs.append(kw["hidden_states"].detach().double().clone())
            out = model_forward(*args, **kw)
            raw.append(sample_of(out).detach().double().clone())
            return out

        transformer.forward = recording  # under the cache's hooks: what the model itself returned
        try:
            with forced_schedule(transformer, ScheduleChange(frozenset(schedule)), lambda: len(scheduler.timesteps), forecast, scheduler):
                pipe(**video_prompt_kwargs(encoder, "a big green circle moving left", RECIPE["negative_prompt"]), **kwargs,
                     generator=torch.Generator().manual_seed(3), output_type="latent")
        finally:
            transformer.__dict__.pop("forward", None)
        assert len(raw) == 2 * steps
        targets = reestimated_targets(raw, schedule, steps, guidance)
        replay = copy.deepcopy(scheduler)
        replay.set_timesteps(steps)
        latent, errors = inputs[0], []
        for step in range(steps - 1):
            latent = type(replay).step(replay, targets[step], replay.timesteps[step], latent, return_dict=False)[0]
            if step in schedule:
                errors.append(float((latent - inputs[2 * (step + 1)]).abs().max() / inputs[2 * (step + 1)].abs().max()))
        gaps[forecast] = errors
    # (1e-5: the float32 pipeline against this float64 replay with every step computed is off by 3e-7 with UniPC
    # and DPM-Solver, by 5.2e-6 with DEIS, which is where its corrected latents land)
    assert max(gaps["output_corrected"]) < 1e-5, gaps
    assert max(gaps["output_linear"]) > 1e-3, gaps
