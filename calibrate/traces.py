"""The trace file: HDF5, one group per trajectory (prompt x seed x CFG branch), written crash-safe.

Layout (``schema = "teacache-traces/1"``)::

    /                   attrs: schema, model, transformer_class, created, versions (JSON), and the recipe:
                               num_inference_steps, height, width, num_frames, guidance, negative_prompt
    /runs/<key>_<branch>       attrs: prompt, prompt_index, seed, branch, the recipe again, complete
        step        int32   [steps]   call index within the branch (0 = first step)
        timestep    float32 [steps]   the timestep as the transformer receives it
        x           float32 [steps]   rel-L1 change of the first block's modulated input (NaN at step 0)
        x_temb      float32 [steps]   rel-L1 change of the timestep embedding (NaN at step 0)
        y           float32 [steps]   rel-L1 change of the transformer output (NaN at step 0)
        y_residual  float32 [steps]   rel-L1 change of the block-stack residual (NaN at step 0)

rel-L1(a, b) = mean|a - b| / mean|b| against the previous call of the same branch. A missing recipe
number is stored as NaN and a missing negative prompt is left out. ``<key>`` hashes the prompt, seed
and recipe, so a rerun knows what the file already holds. The datasets are small (one value per
step) and stored contiguous: chunking and compression would cost more than they save.

Every append writes a copy of the file beside it and renames it into place, so at any moment the
file on disk is a complete, readable HDF5 file holding every finished trajectory, even after SIGKILL.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from runtime.errors import TeaCacheError

from .recipe import Recipe

TRACE_SCHEMA = "teacache-traces/1"
DATASETS = ("step", "timestep", "x", "x_temb", "y", "y_residual")


class TraceFileError(TeaCacheError):
    """A trace file that cannot be used: unreadable, foreign, of another model or recipe, or empty."""


def run_key(prompt: str, seed: int, recipe: Recipe) -> str:
    """A stable id of one pipeline call: the same prompt, seed and recipe give the same key."""
    payload = json.dumps([prompt, int(seed), recipe.to_attrs()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("teacache-calibrate", "torch", "diffusers", "h5py", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _open_for_reading(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        reason = str(exc).split("(", 1)[-1].rstrip(")") if "(" in str(exc) else str(exc)
        raise TraceFileError(
            f"{path} is not a readable HDF5 file ({reason}); it may be corrupt or of another format. It was left "
            "untouched: record into another out=, or move it away."
        ) from None


def _check_header(handle: h5py.File, path: Path) -> None:
    schema = handle.attrs.get("schema")
    if schema is None:
        raise TraceFileError(
            f"{path} is an HDF5 file but not a TeaCache trace file (no 'schema' attribute at its root); "
            "pass a file written by `python -m calibrate.record`."
        )
    if schema != TRACE_SCHEMA:
        raise TraceFileError(
            f"{path} has schema {schema!r}, but this tool reads {TRACE_SCHEMA!r}; re-record it with this version."
        )


class TraceWriter:
    """Appends finished pipeline calls to a trace file; refuses files of another model, schema or recipe."""

    def __init__(self, path: str | os.PathLike[str], *, model: str, recipe: Recipe) -> None:
        self.path = Path(path)
        self.model = model
        self.recipe = recipe
        self.done: set[str] = set()
        if self.path.exists():
            with _open_for_reading(self.path) as handle:
                _check_header(handle, self.path)
                if handle.attrs.get("model") != model:
                    raise TraceFileError(
                        f"{self.path} holds traces of model {handle.attrs.get('model')!r}, not {model!r}; "
                        "record into another out= (nothing was written)."
                    )
                theirs = Recipe.from_attrs(handle.attrs)
                if theirs != recipe:
                    raise TraceFileError(
                        f"{self.path} holds traces of another recipe ({theirs}) than this run's ({recipe}); "
                        "coefficients are tied to their recipe, so record into another out= (nothing was written)."
                    )
                self.done = {
                    group.attrs["key"] for group in handle.get("runs", {}).values() if group.attrs.get("complete")
                }

    def bind(self, transformer_class: str) -> None:
        """Create the file if it does not exist; check the transformer class if it does."""
        if self.path.exists():
            with _open_for_reading(self.path) as handle:
                theirs = handle.attrs.get("transformer_class")
            if theirs != transformer_class:
                raise TraceFileError(
                    f"{self.path} holds traces of a {theirs}, but this model is a {transformer_class}; record "
                    "into another out= (nothing was written)."
                )
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._replace(lambda handle: self._write_header(handle, transformer_class), start_from_existing=False)

    def _write_header(self, handle: h5py.File, transformer_class: str) -> None:
        handle.attrs["schema"] = TRACE_SCHEMA
        handle.attrs["model"] = self.model
        handle.attrs["transformer_class"] = transformer_class
        handle.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        handle.attrs["versions"] = json.dumps(library_versions())
        for name, value in self.recipe.to_attrs().items():
            handle.attrs[name] = value
        handle.create_group("runs")

    def append(self, key: str, prompt: str, prompt_index: int, seed: int, branches: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Make one finished pipeline call (all its branches) durable."""

        def write(handle: h5py.File) -> None:
            runs = handle.require_group("runs")
            for branch, data in sorted(branches.items()):
                name = f"{key}_{branch}"
                if name in runs:
                    del runs[name]
                group = runs.create_group(name)
                for dataset in DATASETS:
                    group.create_dataset(dataset, data=np.asarray(data[dataset]))
                attrs = {"key": key, "prompt": prompt, "prompt_index": prompt_index, "seed": int(seed), "branch": branch}
                attrs.update(self.recipe.to_attrs())
                group.attrs.update(attrs)
            for branch in branches:
                runs[f"{key}_{branch}"].attrs["complete"] = True

        self._replace(write, start_from_existing=True)
        self.done.add(key)

    def _replace(self, edit, start_from_existing: bool) -> None:
        # Copy, edit, fsync, rename: the file at self.path is never a half-written one.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a trace file is an ordinary file
        try:
            if start_from_existing:
                shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a" if start_from_existing else "w") as handle:
                edit(handle)
            with open(tmp, "rb") as raw:
                os.fsync(raw.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass
class Trajectory:
    """One branch of one pipeline call, as read back."""

    key: str
    prompt: str
    prompt_index: int
    seed: int
    branch: str
    data: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return f"{self.key}_{self.branch}"


@dataclass
class TraceSet:
    """Trajectories read from one or more agreeing trace files (shards)."""

    model: str
    transformer_class: str
    recipe: Recipe
    files: list[Path]
    trajectories: list[Trajectory] = field(default_factory=list)
    duplicates: int = 0


def expand_paths(spec: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named by a path, a glob, or a list of either, sorted and without repeats."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[Path] = []
    for item in specs:
        text = os.fspath(item)
        if glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text))
            if not matches:
                raise TraceFileError(f"no trace files match {text!r}; record some with `python -m calibrate.record`.")
            found.extend(matches)
        else:
            path = Path(text)
            if not path.is_file():
                raise TraceFileError(f"trace file {path} does not exist; record it with `python -m calibrate.record`.")
            found.append(path)
    return sorted(set(found))


def load_traces(spec: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> TraceSet:
    """Read every finished trajectory of the given files; the files must agree on model, class and recipe."""
    paths = expand_paths(spec)
    traces: TraceSet | None = None
    seen: set[str] = set()
    for path in paths:
        with _open_for_reading(path) as handle:
            _check_header(handle, path)
            header = (handle.attrs["model"], handle.attrs["transformer_class"], Recipe.from_attrs(handle.attrs))
            if traces is None:
                traces = TraceSet(model=header[0], transformer_class=header[1], recipe=header[2], files=[])
            elif header != (traces.model, traces.transformer_class, traces.recipe):
                raise TraceFileError(
                    f"{path} ({header[0]}, {header[1]}, {header[2]}) does not agree with {traces.files[0]} "
                    f"({traces.model}, {traces.transformer_class}, {traces.recipe}); fit traces of one model and "
                    "one recipe at a time."
                )
            traces.files.append(path)
            for name, group in sorted(handle.get("runs", {}).items()):
                if not group.attrs.get("complete"):
                    continue
                if name in seen:
                    traces.duplicates += 1
                    continue
                seen.add(name)
                missing = [d for d in DATASETS if d not in group]
                if missing:
                    raise TraceFileError(f"{path}: trajectory {name} lacks dataset {missing[0]!r}; re-record it.")
                traces.trajectories.append(
                    Trajectory(
                        key=str(group.attrs["key"]),
                        prompt=str(group.attrs["prompt"]),
                        prompt_index=int(group.attrs["prompt_index"]),
                        seed=int(group.attrs["seed"]),
                        branch=str(group.attrs["branch"]),
                        data={d: group[d][()] for d in DATASETS},
                    )
                )
    assert traces is not None
    if not traces.trajectories:
        raise TraceFileError(
            f"{', '.join(map(str, paths))} hold no finished trajectories; record some with `python -m calibrate.record`."
        )
    return traces


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

