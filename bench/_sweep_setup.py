"""What the benches that replay a sweep's held-out outputs share: the sweep config, its ``sweep.json``, the
recipe and the loaded model (on the CPU, float32); a file's searched schedules with their forecasts; and
schedules scored on outputs through the runtime."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class HeldOutSetup:
    cfg: Any  # the composed `sweep` config for the model
    sweep: dict  # sweep/<model>/sweep.json
    recipe: Any  # calibrate.recipe.Recipe
    model: Any  # calibrate.models.LoadedModel

    def outputs(self, limit: int) -> list[tuple[str, int]]:
        """The sweep's first ``limit`` held-out (prompt, seed) pairs."""
        return [(o["prompt"], o["seed"]) for o in self.sweep["outputs"]][:limit]

    def fresh_outputs(self, count: int, seed: int) -> list[tuple[str, int]]:
        """``count`` outputs the sweep does not report: its held-out prompts in turn, at seeds ``seed``,
        ``seed + 1``, ... (a validation set)."""
        prompts = list(dict.fromkeys(o["prompt"] for o in self.sweep["outputs"]))
        return [(prompts[j % len(prompts)], seed + j) for j in range(count)]


def paired_difference(a, b) -> tuple[float, float]:
    """Mean of ``a - b`` over paired outputs and its standard error (NaN with fewer than two outputs)."""
    import numpy as np

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def held_out_parser(doc: str, model: str = "reference", outputs: int = 8) -> argparse.ArgumentParser:
    """A bench's parser, described by its docstring's first line, with ``--model`` and ``--outputs`` (the sweep's
    first that many held-out outputs)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=model)
    parser.add_argument("--outputs", type=int, default=outputs, help="the sweep's first N held-out outputs")
    return parser


def searched_schedules(path: str | Path) -> list[tuple[frozenset, str]] | None:
    """The ``searched_schedule`` rows of a coefficients file, each with the forecast it was searched with
    (``reuse`` where the file names none: files before forecasts); None when the file has no such rule."""
    from runtime.coefficients import load_coefficients

    entry = load_coefficients(str(path)).rules.get("searched_schedule")
    if entry is None:
        return None
    forecasts = entry.get("forecasts") or ["reuse"] * len(entry["schedules"])
    return [(frozenset(steps), forecast) for steps, forecast in zip(entry["schedules"], forecasts)]


def schedule_psnrs(setup: HeldOutSetup, pairs: list[tuple[str, int]], schedules: list[tuple[frozenset, str]]):
    """PSNR (dB, capped at 100) against full compute, ``[pair, schedule]``: each (prompt, seed) generated with the
    runtime computing only the schedule's steps and skipping with the schedule's forecast
    (``calibrate.schedule_search.schedule_errors``, one context per forecast)."""
    import numpy as np

    from calibrate.metrics import psnr_of_mse
    from calibrate.schedule_search import schedule_errors

    out = np.zeros((len(pairs), len(schedules)))
    for forecast in sorted({f for _, f in schedules}):
        with schedule_errors(setup.model, setup.recipe, pairs, forecast) as mse:
            for j, (steps, f) in enumerate(schedules):
                if f == forecast:
                    out[:, j] = [psnr_of_mse(m) for m in mse(steps)]
    return out


def held_out_setup(model_name: str) -> HeldOutSetup:
    """Compose ``sweep`` with ``model=<model_name>``, read its ``sweep.json`` and load the model."""
    import torch
    from hydra import compose, initialize_config_dir

    from calibrate.models import load_model
    from calibrate.recipe import Recipe

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sweep", overrides=[f"model={model_name}"])
    path = ROOT / "sweep" / model_name / "sweep.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m calibrate.sweep model={model_name} ...` first "
                         "(the README's sweep commands).")
    sweep = json.loads(path.read_text())
    return HeldOutSetup(cfg, sweep, Recipe.from_config(cfg), load_model(cfg.model, "cpu", torch.float32))
