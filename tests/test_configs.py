"""Every conf/model/*.yaml: composes with conf/record.yaml, names what exists, and fails to load offline in one sentence.

Hub configs name a diffusers pipeline class and a hub id; without the weights on disk (HF_HUB_OFFLINE=1, set in
conftest.py) loading raises calibrate.models.ModelLoadError, one sentence naming the model and the fix, and the
record command prints it as ``error: ...`` with exit status 2, not a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class

from calibrate.models import ModelLoadError, load_model
from calibrate.recipe import Recipe
from calibrate.tiny import TINY_PIPELINES

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
HUB = [name for name in MODELS if (CONF / "model" / f"{name}.yaml").read_text().count("\nsource: hub") == 1]
# One image and one video family with two experts: loading offline must fail fast and in one sentence.
OFFLINE_LOAD = ("flux2_dev", "wan2_2_t2v_a14b")


def compose_record(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("record", overrides=[f"model={name}"])


def test_there_is_a_hub_config_per_supported_family():
    from runtime import supported_classes

    annotations = []
    for name in HUB:
        cls = get_class(compose_record(name).model.pipeline)
        annotations.append(str(cls.__init__.__annotations__.get("transformer")))  # e.g. "WanTransformer3DModel | None"
    missing = [c for c in supported_classes() if not any(re.search(rf"\b{c}\b", a) for a in annotations)]
    assert not missing, f"no conf/model/<name>.yaml loads a pipeline of {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_model_config_composes_and_names_what_exists(name):
    cfg = compose_record(name)
    model = cfg.model
    assert model.name == name
    recipe = Recipe.from_config(cfg)  # the recipe validates (positive sizes, frames, guidance)
    assert recipe.num_inference_steps > 0
    assert model.dtype in ("float32", "bfloat16", "float16")
    assert isinstance(model.guidance_kwarg, str)
    if model.source == "hub":
        cls = get_class(model.pipeline)
        assert cls.__module__.startswith("diffusers.")
        assert "/" in model.path  # a hub id (owner/name)
        import inspect

        parameters = inspect.signature(cls.__call__).parameters
        if recipe.guidance is not None:
            assert model.guidance_kwarg in parameters, f"{cls.__name__} takes no {model.guidance_kwarg}"
        if recipe.num_frames is not None:
            assert "num_frames" in parameters
        if recipe.negative_prompt is not None:
            assert "negative_prompt" in parameters
    elif model.source == "tiny":
        assert model.family in TINY_PIPELINES


@pytest.mark.parametrize("name", OFFLINE_LOAD)
def test_loading_a_hub_config_without_weights_is_one_sentence(name):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    cfg = compose_record(name)
    with pytest.raises(ModelLoadError) as missing:
        load_model(cfg.model, "cpu", torch.bfloat16)
    message = str(missing.value)
    assert message.startswith(f"the weights of model={name} could not be loaded from {cfg.model.path!r}")
    assert "model.path=/local/dir" in message and "\n" not in message


def test_record_prints_the_missing_weights_sentence_and_exits_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "calibrate.record", f"model={OFFLINE_LOAD[0]}", f"out={tmp_path / 'x.h5'}",
         f"hydra.run.dir={tmp_path}", "device=cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"error: the weights of model={OFFLINE_LOAD[0]} could not be loaded" in result.stderr
    assert not (tmp_path / "x.h5").exists()
