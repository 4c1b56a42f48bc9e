"""``python -m calibrate.record model=<name>``: full-compute runs recorded to HDF5, per step and CFG branch.

Every prompt x seed of the (sharded) work list is one pipeline call at full compute; its branches are
written as trajectories as soon as it finishes, crash-safe. A rerun of the same command skips what the
file already holds. Scale out with hydra multirun over ``shard`` (joblib launcher for several GPUs on
one machine, submitit launcher for SLURM): one file per shard, fitted together by ``calibrate.fit``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from runtime.errors import ConfigError, TeaCacheError

from .cli import CONF_DIR, CONF_PATH, one_line_errors
from .parallel import parallel_settings
from .recipe import Recipe
from .traces import TraceWriter, run_key

log = logging.getLogger(__name__)


def shard_path(out: Path, shard: int, num_shards: int) -> Path:
    """``traces/m.h5`` for one shard, ``traces/m.shard-<i>-of-<n>.h5`` for shard i of n."""
    if num_shards == 1:
        return out
    return out.with_name(f"{out.stem}.shard-{shard}-of-{num_shards}{out.suffix}")


def prompt_texts(cfg: DictConfig, model_key: str = "prompt_set") -> list[str]:
    """The prompts of ``prompts=<set>``, or with ``prompts=auto`` those of the set the model config
    names under ``model_key`` (``prompt_set``, or ``sweep_prompt_set`` for the sweep), else ``default``."""
    if cfg.prompts.texts is not None:
        return list(cfg.prompts.texts)
    name = cfg.model.get(model_key) or cfg.model.get("prompt_set") or "default"
    path = CONF_DIR / "prompts" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"model {cfg.model.name} names prompt_set {name!r}, but {path} does not exist; add it or pass prompts=default.")
    return list(OmegaConf.load(path).texts)


def work_list(cfg: DictConfig) -> list[tuple[int, str, int]]:
    """``(prompt_index, prompt, seed)`` of this shard, in a fixed order."""
    seeds = list(cfg.seeds) if not isinstance(cfg.seeds, int) else [cfg.seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers, e.g. seeds=[0,1], got {cfg.seeds!r}.")
    num_shards, shard = cfg.num_shards, cfg.shard
    if not isinstance(num_shards, int) or num_shards < 1 or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise ConfigError(f"shard must be in [0, num_shards) and num_shards >= 1, got shard={shard} num_shards={num_shards}.")
    prompts = prompt_texts(cfg)
    lags = cfg.get("drift_lags", 0)
    if not isinstance(lags, int) or isinstance(lags, bool) or not 0 <= lags <= 64:
        raise ConfigError(f"drift_lags must be an integer from 0 (off) to 64, got {lags!r}; e.g. drift_lags=6, the default.")
    if cfg.limit is not None:
        if not isinstance(cfg.limit, int) or cfg.limit < 1:
            raise ConfigError(f"limit must be a positive integer or null, got {cfg.limit!r}.")
        prompts = prompts[: cfg.limit]
    work = [(i, prompt, seed) for i, prompt in enumerate(prompts) for seed in seeds]
    return work[shard::num_shards]


def record(cfg: DictConfig) -> Path:
    """Record this shard's work list into its trace file; returns the file's path."""
    recipe = Recipe.from_config(cfg)
    work = work_list(cfg)
    run = parallel_settings(cfg)
    out = shard_path(Path(cfg.out), cfg.shard, cfg.num_shards)
    if run is not None:
        return _record_context_parallel(cfg, recipe, work, run, out)
    # The writer checks that out= can be written, takes the file's writer lock (a second recorder on the
    # same file is refused) and refuses a foreign file, all before any loading; closing it releases the
    # lock and, if nothing was written, leaves the disk as it was.
    with TraceWriter(out, model=cfg.model.name, recipe=recipe) as writer:
        todo = _todo(work, writer, recipe, out)
        if not todo:
            return out
        from .models import resolve_device, resolve_dtype  # torch and diffusers load here, after the checks above

        model = load_model(cfg.model, resolve_device(cfg.device), resolve_dtype(cfg.dtype))
        _record_runs(cfg, model, recipe, todo, writer, out)
        log.info("%s holds %d runs of this shard", out, len(writer.done))
    return out


def _todo(work: list[tuple[int, str, int]], writer: TraceWriter, recipe: Recipe, out: Path) -> list[tuple[int, str, int]]:
    todo = [(i, p, s) for i, p, s in work if run_key(p, s, recipe) not in writer.done]
    if len(todo) < len(work):
        log.info("%s already holds %d of these %d runs; recording the other %d", out, len(work) - len(todo), len(work), len(todo))
    return todo


def _record_runs(cfg: DictConfig, model: Any, recipe: Recipe, todo: list, writer: TraceWriter | None, out: Path) -> None:
    """Run the work list at full compute; ``writer`` None: measure only (a context-parallel rank > 0)."""
    from .recorder import TraceRecorder

    if writer is not None:
        writer.bind(type(model.transformer).__name__, type(model.pipe).__name__)
    with TraceRecorder(model.pipe, lags=cfg.get("drift_lags", 0)) as recorder:  # every expert of the pipeline
        bar = tqdm(todo, desc=f"record {cfg.model.name} -> {out.name}", unit="run", dynamic_ncols=True, disable=writer is None)
        for prompt_index, prompt, seed in bar:
            branches = recorder.run(lambda: model.generate(prompt, seed, recipe))
            if writer is not None:
                writer.append(run_key(prompt, seed, recipe), prompt, prompt_index, seed, branches)


def _record_context_parallel(cfg: DictConfig, recipe: Recipe, work: list, run: Any, out: Path) -> Path:
    """Every rank records in lockstep; rank 0 alone owns the file (lock, resume, writes)."""
    from . import parallel
    from .models import resolve_device, resolve_dtype

    device = parallel.start(run, resolve_device(cfg.device))
    try:
        writer = None
        if run.writes:
            try:
                writer = TraceWriter(out, model=cfg.model.name, recipe=recipe)
                todo = _todo(work, writer, recipe, out)
            except TeaCacheError as exc:
                parallel.share(run, ConfigError(str(exc)))
                raise
            parallel.share(run, todo)
        else:
            todo = parallel.share(run, None)
        try:
            if todo:
                model = load_model(cfg.model, device, resolve_dtype(cfg.dtype))
                parallel.enable(model.transformer, run, device)
                _record_runs(cfg, model, recipe, todo, writer, out)
        finally:
            if writer is not None:
                writer.close()
    finally:
        parallel.finish()
    return out


def load_model(model_cfg: DictConfig, device: str, dtype: Any) -> Any:
    """:func:`calibrate.models.load_model`, imported on the first call (it brings torch and diffusers)."""
    from .models import load_model as load

    return load(model_cfg, device, dtype)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="record")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        path = record(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"traces: {path}")


if __name__ == "__main__":
    main()
