"""The trace file: HDF5, one group per trajectory (prompt x seed x CFG branch), written crash-safe.

Layout (``schema = "teacache-traces/1"``)::

    /                   attrs: schema, model, transformer_class, [pipeline_class], created, versions (JSON), and the recipe:
                               num_inference_steps, height, width, num_frames, guidance, negative_prompt
    /runs/<key>_<branch>       attrs: prompt, prompt_index, seed, branch, [expert], the recipe again, complete
        step        int32   [steps]   call index within the branch (0 = first step)
        timestep    float32 [steps]   the timestep as the transformer receives it
        x           float32 [steps]   rel-L1 change of the first block's modulated input (NaN at step 0)
        x_temb      float32 [steps]   rel-L1 change of the timestep embedding (NaN at step 0)
        y           float32 [steps]   rel-L1 change of the transformer output (NaN at step 0)
        y_residual  float32 [steps]   rel-L1 change of the block-stack residual (NaN at step 0)

Two experts (Wan2.2): the second expert's branches are ``transformer_2.cond``/``.uncond``, every group of
such a run has an ``expert`` attribute, and each CFG branch's calls over the experts add up to the step
count. Files without ``pipeline_class`` or ``expert`` (older ones) read as one expert, pipeline unknown.

rel-L1(a, b) = mean|a - b| / mean|b| against the previous call of the same branch. A missing recipe
number is stored as NaN and a missing negative prompt is left out. ``<key>`` hashes the prompt, seed
and recipe, so a rerun knows what the file already holds. The datasets are small (one value per
step) and stored contiguous: chunking and compression would cost more than they save.

Every append writes a copy of the file beside it and renames it into place, so at any moment the
file on disk is a complete, readable HDF5 file holding every finished trajectory, even after SIGKILL.
One writer at a time: a writer holds an exclusive ``flock`` on ``.<name>.lock`` beside the file from
before the model loads until it is done (the kernel drops it when the process dies), and a second
writer is refused. Under that lock a writer removes the temp files (``.<name>.<random>.tmp``) that a
killed writer left, and treats a trajectory marked complete but damaged (a dataset or attribute missing
or of the wrong length, negative changes, more steps than the recipe) as not recorded, so the next
``calibrate.record`` records it again; ``load_traces`` refuses such a file and names the trajectory.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from runtime.coefficients import commit_file, stage_file, unwritable
from runtime.errors import TeaCacheError

from .recipe import Recipe

log = logging.getLogger(__name__)

TRACE_SCHEMA = "teacache-traces/1"
DATASETS = ("step", "timestep", "x", "x_temb", "y", "y_residual")
#: Datasets a trajectory may hold: the lagged changes [steps, lags] the drift rule is calibrated from.
LAGGED_DATASETS = ("x_lag", "y_lag")
CHANGES = ("x", "x_temb", "y", "y_residual")  # rel-L1 changes: >= 0 where finite
GROUP_ATTRS = ("key", "prompt", "prompt_index", "seed", "branch")


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


def check_output(path: Path, *, folder: bool = False, error: type[TeaCacheError] = TraceFileError) -> None:
    """Refuse, before any work, an output path that cannot be written; changes nothing on disk.

    The nearest existing folder is probed with a temp file (removed at once): that catches read-only,
    full-inode and permission-denied folders even for root, for whom mode bits do not block writes.
    """
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise error(f"out={path} is a file, not a folder; pass a folder path instead (nothing was written).")
    elif path.is_dir():
        raise error(
            f"out={path} is a folder; pass a file path instead, such as {path / 'out'}{path.suffix or ''} "
            "(nothing was written)."
        )
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise error(
            f"out={path} cannot be created because {existing} is a file, not a folder; pass a path under a "
            "folder instead (nothing was written)."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".teacache-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise error(
            f"out={path} cannot be written ({exc.strerror or exc} in {existing}); pass a writable path instead "
            "(nothing was written)."
        ) from None


def _stale_temp_pattern(path: Path) -> re.Pattern[str]:
    """What ``tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")`` names, for this file only."""
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")


class _WriterLock:
    """An exclusive, non-blocking ``flock`` on ``.<name>.lock`` beside a trace file.

    The kernel drops the lock when its process dies (SIGKILL included), so a stale lock file never
    blocks. The lock file is removed on release; a writer that locked a lock file another writer
    removed meanwhile notices (the inode on disk differs) and locks the current one instead.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.parent / f".{path.name}.lock"
        self.fd: int | None = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. some network filesystems
                    log.warning("cannot lock %s (%s): make sure no other recorder writes %s", self.path, exc.strerror, path)
                    break
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise TraceFileError(
                    f"{path} is being written by another process{self._holder()} right now, and two writers "
                    "would lose each other's runs; wait for it to finish and rerun, or record into another out= "
                    "(parallel jobs: shard=<i> num_shards=<n>, one file per shard), so nothing was written."
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous writer removed this lock file as we opened it: lock the new one
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def _holder(self) -> str:
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return ""
        return f" (pid {pid})"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def expert_of(branch: str) -> tuple[str, str]:
    """``(expert, CFG branch)`` of a branch label: ``"cond"`` -> ``("transformer", "cond")``,
    ``"transformer_2.cond"`` -> ``("transformer_2", "cond")`` (Wan2.2's low-noise expert)."""
    expert, _, name = branch.rpartition(".")
    return (expert or "transformer"), name


def steps_of(several_experts: bool, steps: int) -> int | None:
    """The length a branch's trajectory must have: the recipe's step count, or, with several experts
    sharing the steps, any (their lengths must add up to it, checked per run by :func:`experts_problem`)."""
    return None if several_experts else steps


def experts_problem(lengths: Mapping[str, int], steps: int) -> str | None:
    """With several experts, each CFG branch's calls over the experts must add up to the step count."""
    if not any("." in label for label in lengths):
        return None
    totals: dict[str, int] = {}
    for label, n in lengths.items():
        totals[expert_of(label)[1]] = totals.get(expert_of(label)[1], 0) + n
    for branch, total in sorted(totals.items()):
        if total != steps:
            return f"has {total} calls of branch {branch!r} over its experts where the recipe has num_inference_steps={steps}"
    return None


def trajectory_problem(data: Mapping[str, np.ndarray], steps: int | None) -> str | None:
    """What is wrong with one branch's arrays, or None: every dataset present, 1-D, numeric, as long as
    ``step`` = 0, 1, 2, ... and as the recipe's ``steps``, and no negative rel-L1 change."""
    lengths = {}
    for name in DATASETS:
        if name not in data:
            return f"lacks dataset {name!r}"
        values = np.asarray(data[name])
        if values.ndim != 1 or values.dtype.kind not in "iuf":
            return f"has a dataset {name!r} that is not a 1-D array of numbers (shape {values.shape}, {values.dtype})"
        lengths[name] = len(values)
    n = lengths["step"]
    for name in DATASETS:
        if lengths[name] != n:
            return f"has dataset {name!r} with {lengths[name]} values where 'step' has {n}"
    if steps is not None and n != steps:
        return f"has {n} steps where the recipe has num_inference_steps={steps}"
    if not np.array_equal(np.asarray(data["step"]), np.arange(n)):
        return "has a 'step' dataset that is not 0, 1, 2, ..."
    for name in CHANGES:
        values = np.asarray(data[name], dtype=np.float64)
        if (values[np.isfinite(values)] < 0).any():
            return f"holds negative values in {name!r}, which a rel-L1 change never is"
    lagged = [name for name in LAGGED_DATASETS if name in data]
    for name in lagged:
        values = np.asarray(data[name])
        if values.ndim != 2 or values.shape[0] != n or values.shape[1] < 1 or values.dtype.kind not in "f":
            return f"has a dataset {name!r} of shape {values.shape} where [{n} steps, lags] of floats belongs"
        if (values[np.isfinite(values)] < 0).any():
            return f"holds negative values in {name!r}, which a rel-L1 change never is"
    if len(lagged) == 1 or (lagged and data["x_lag"].shape != data["y_lag"].shape):
        return "holds x_lag and y_lag of different shapes (or only one of them)"
    return None


def group_problem(name: str, group: object, steps: int) -> str | None:
    """What is wrong with a stored trajectory group, or None when it is sound."""
    try:
        if not isinstance(group, h5py.Group):
            return "is not an HDF5 group"
        for attr in GROUP_ATTRS:
            if attr not in group.attrs:
                return f"lacks attribute {attr!r}"
        key, branch = str(group.attrs["key"]), str(group.attrs["branch"])
        if name != f"{key}_{branch}":
            return f"has attributes key={key!r} and branch={branch!r} that do not match its name"
        int(group.attrs["prompt_index"]), int(group.attrs["seed"]), str(group.attrs["prompt"])
        data = {}
        for dataset in DATASETS:
            item = group.get(dataset)
            if not isinstance(item, h5py.Dataset):
                return f"lacks dataset {dataset!r}"
            data[dataset] = item[()]
        for dataset in LAGGED_DATASETS:
            if dataset in group:
                item = group[dataset]
                if not isinstance(item, h5py.Dataset):
                    return f"holds {dataset!r} that is not a dataset"
                data[dataset] = item[()]
        return trajectory_problem(data, steps_of("expert" in group.attrs, steps))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return f"cannot be read ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"


def _runs_group(handle: h5py.File, path: Path) -> h5py.Group | dict:
    runs = handle.get("runs")
    if runs is None:
        return {}
    if not isinstance(runs, h5py.Group):
        raise TraceFileError(
            f"{path}'s 'runs' is not an HDF5 group, so the file is damaged; move it away and record it again."
        )
    return runs


def _missing_branches(keys: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Keys that lack a branch every other run of the file has (the branches of one recipe agree)."""
    every = set().union(*keys.values()) if keys else set()
    return {key: every - branches for key, branches in keys.items() if every - branches}


class TraceWriter:
    """Appends finished pipeline calls to a trace file; refuses files of another model, schema or recipe.

    It takes the file's writer lock at once (refusing a second writer), removes the temp files of killed
    writers, and reads which runs the file holds intact (``done``). Close it (or use it as a context
    manager) to release the lock; a writer that wrote nothing leaves nothing on disk.
    """

    def __init__(self, path: str | os.PathLike[str], *, model: str, recipe: Recipe) -> None:
        self.path = Path(path)
        self.model = model
        self.recipe = recipe
        self.done: set[str] = set()
        self.damaged: dict[str, str] = {}  # trajectory name -> what is wrong with it
        check_output(self.path)
        self._created: list[Path] = [p for p in reversed(self.path.parents) if not p.exists()]
        self._lock: _WriterLock | None = None
        try:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock = _WriterLock(self.path)
                self._remove_stale_temps()
            except OSError as exc:
                raise TraceFileError(unwritable(self.path, exc)) from None
            if self.path.exists():
                self._read_existing()
        except BaseException:
            self.close()
            raise

    def _remove_stale_temps(self) -> None:
        pattern = _stale_temp_pattern(self.path)
        removed = 0
        for entry in os.scandir(self.path.parent):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        if removed:
            log.info("removed %d temp file(s) that a killed writer left beside %s", removed, self.path)

    def _read_existing(self) -> None:
        with _open_for_reading(self.path) as handle:
            _check_header(handle, self.path)
            if handle.attrs.get("model") != self.model:
                raise TraceFileError(
                    f"{self.path} holds traces of model {handle.attrs.get('model')!r}, not {self.model!r}; "
                    "record into another out= (nothing was written)."
                )
            theirs = Recipe.from_attrs(handle.attrs)
            if theirs != self.recipe:
                raise TraceFileError(
                    f"{self.path} holds traces of another recipe ({theirs}) than this run's ({self.recipe}); "
                    "coefficients are tied to their recipe, so record into another out= (nothing was written)."
                )
            branches: dict[str, set[str]] = {}
            lengths: dict[str, dict[str, int]] = {}
            bad_keys: set[str] = set()
            for name, group in _runs_group(handle, self.path).items():
                key = name.split("_", 1)[0]
                if not (isinstance(group, h5py.Group) and group.attrs.get("complete")):
                    bad_keys.add(key)  # unfinished: record it (again)
                    continue
                problem = group_problem(name, group, self.recipe.num_inference_steps)
                if problem:
                    self.damaged[name] = problem
                    bad_keys.add(key)
                    continue
                branches.setdefault(key, set()).add(str(group.attrs["branch"]))
                lengths.setdefault(key, {})[str(group.attrs["branch"])] = len(group["step"])
            for key, per_branch in lengths.items():
                problem = experts_problem(per_branch, self.recipe.num_inference_steps)
                if problem:
                    self.damaged[f"{key}_{sorted(per_branch)[0]}"] = problem
                    bad_keys.add(key)
            for key, missing in _missing_branches(branches).items():
                self.damaged[f"{key}_{sorted(missing)[0]}"] = "is missing"
                bad_keys.add(key)
            self.done = set(branches) - bad_keys
        if self.damaged:
            name, problem = sorted(self.damaged.items())[0]
            log.warning(
                "%s: %d damaged trajectories (e.g. %s %s) are recorded again if this run's work list holds them",
                self.path, len(self.damaged), name, problem,
            )

    def bind(self, transformer_class: str, pipeline_class: str | None = None) -> None:
        """Create the file if it does not exist; check the transformer (and pipeline) class if it does."""
        if self.path.exists():
            with _open_for_reading(self.path) as handle:
                theirs = handle.attrs.get("transformer_class")
                their_pipeline = handle.attrs.get("pipeline_class")
            if theirs != transformer_class:
                raise TraceFileError(
                    f"{self.path} holds traces of a {theirs}, but this model is a {transformer_class}; record "
                    "into another out= (nothing was written)."
                )
            if their_pipeline is not None and pipeline_class is not None and str(their_pipeline) != pipeline_class:
                raise TraceFileError(
                    f"{self.path} holds traces recorded through a {their_pipeline}, but this run uses a {pipeline_class} "
                    "(their trajectories differ, e.g. image editing vs text-to-image); record into another out= "
                    "(nothing was written)."
                )
            return
        self._replace(lambda handle: self._write_header(handle, transformer_class, pipeline_class), start_from_existing=False)

    def _write_header(self, handle: h5py.File, transformer_class: str, pipeline_class: str | None = None) -> None:
        handle.attrs["schema"] = TRACE_SCHEMA
        handle.attrs["model"] = self.model
        handle.attrs["transformer_class"] = transformer_class
        if pipeline_class is not None:
            handle.attrs["pipeline_class"] = pipeline_class
        handle.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        handle.attrs["versions"] = json.dumps(library_versions())
        for name, value in self.recipe.to_attrs().items():
            handle.attrs[name] = value
        handle.create_group("runs")

    def append(self, key: str, prompt: str, prompt_index: int, seed: int, branches: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Make one finished pipeline call (all its branches) durable; it replaces whatever the file held
        of the same run (a damaged or unfinished earlier recording)."""
        steps = self.recipe.num_inference_steps
        several = any("." in branch for branch in branches)
        problems = [(branch, trajectory_problem(data, steps_of(several, steps))) for branch, data in sorted(branches.items())]
        run_problem = experts_problem({b: len(d["step"]) for b, d in branches.items()}, steps)
        if run_problem:
            problems.append(("whole", run_problem))
        for branch, problem in problems:
            if problem:
                raise TraceFileError(
                    f"the run of prompt {prompt_index} with seed {seed} was not written because its {branch} "
                    f"branch {problem}; a trace holds one transformer call per sampling step, so use a "
                    "scheduler that calls the model once per step (the file was left as it was)."
                )

        def write(handle: h5py.File) -> None:
            runs = handle.require_group("runs")
            for name in [n for n in runs if n.split("_", 1)[0] == key]:
                del runs[name]
            for branch, data in sorted(branches.items()):
                group = runs.create_group(f"{key}_{branch}")
                for dataset in (*DATASETS, *(d for d in LAGGED_DATASETS if d in data)):
                    group.create_dataset(dataset, data=np.asarray(data[dataset]))
                attrs = {"key": key, "prompt": prompt, "prompt_index": prompt_index, "seed": int(seed), "branch": branch}
                if several:  # the run's calls are shared between the pipeline's experts (Wan2.2)
                    attrs["expert"] = expert_of(branch)[0]
                attrs.update(self.recipe.to_attrs())
                group.attrs.update(attrs)
            for branch in branches:
                runs[f"{key}_{branch}"].attrs["complete"] = True

        self._replace(write, start_from_existing=True)
        self.done.add(key)
        for name in [n for n in self.damaged if n.split("_", 1)[0] == key]:
            del self.damaged[name]

    def _replace(self, edit, start_from_existing: bool) -> None:
        # Copy, edit, fsync, rename: the file at self.path is never a half-written one, and a failed
        # write (full disk, read-only folder) leaves it as it was.
        if self._lock is None:
            raise TraceFileError(f"this writer of {self.path} was closed; open a new TraceWriter to write again.")

        def fill(tmp: Path) -> None:
            if start_from_existing:
                shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a" if start_from_existing else "w") as handle:
                edit(handle)

        try:
            commit_file(stage_file(self.path, fill), self.path)
        except OSError as exc:
            raise TraceFileError(unwritable(self.path, exc)) from None

    def close(self) -> None:
        """Release the writer lock; folders this writer created for a file it never wrote are removed."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if not self.path.exists():
            for folder in reversed(self._created):
                try:
                    folder.rmdir()
                except OSError:
                    break
        self._created = []

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()


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

    @property
    def expert(self) -> str:
        """Which of the pipeline's transformers made it: ``transformer``, or e.g. ``transformer_2``."""
        return expert_of(self.branch)[0]


@dataclass
class TraceSet:
    """Trajectories read from one or more agreeing trace files (shards)."""

    model: str
    transformer_class: str
    recipe: Recipe
    files: list[Path]
    trajectories: list[Trajectory] = field(default_factory=list)
    duplicates: int = 0
    pipeline_class: str | None = None  # None: recorded before the header named it

    @property
    def experts(self) -> list[str]:
        """The pipeline's experts these traces hold, ``transformer`` first."""
        return sorted({t.expert for t in self.trajectories}, key=lambda e: (e != "transformer", e))

    def of_expert(self, expert: str) -> "TraceSet":
        """The same traces restricted to one expert's trajectories (their branches named plainly)."""
        own = [
            dataclasses.replace(t, branch=expert_of(t.branch)[1]) for t in self.trajectories if t.expert == expert
        ]
        return dataclasses.replace(self, trajectories=own)


def expand_paths(spec: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named by a path, a glob, or a list of either, sorted and without repeats."""
    if isinstance(spec, (str, os.PathLike)):
        specs = [spec]
    else:
        try:
            specs = list(spec)
        except TypeError:
            raise TraceFileError(
                f"traces={spec!r} is not a path, a glob or a list of them; pass e.g. traces=traces/<model>.h5."
            ) from None
    if not specs:
        raise TraceFileError(
            "traces= names no files (an empty list); pass a file, a glob or a list of them, e.g. "
            "traces=traces/<model>.h5 or 'traces=traces/<model>.shard-*.h5'."
        )
    found: list[Path] = []
    for item in specs:
        text = os.fspath(item) if isinstance(item, (str, os.PathLike)) else str(item)
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
            pipeline = handle.attrs.get("pipeline_class")
            if traces is None:
                traces = TraceSet(model=header[0], transformer_class=header[1], recipe=header[2], files=[],
                                  pipeline_class=None if pipeline is None else str(pipeline))
            elif header != (traces.model, traces.transformer_class, traces.recipe):
                raise TraceFileError(
                    f"{path} ({header[0]}, {header[1]}, {header[2]}) does not agree with {traces.files[0]} "
                    f"({traces.model}, {traces.transformer_class}, {traces.recipe}); fit traces of one model and "
                    "one recipe at a time."
                )
            traces.files.append(path)
            steps = traces.recipe.num_inference_steps
            branches: dict[str, set[str]] = {}
            lengths: dict[str, dict[str, int]] = {}
            for name, group in sorted(_runs_group(handle, path).items()):
                if not (isinstance(group, h5py.Group) and group.attrs.get("complete")):
                    continue
                problem = group_problem(name, group, steps)
                if problem:
                    raise _damaged(path, name, problem)
                branches.setdefault(str(group.attrs["key"]), set()).add(str(group.attrs["branch"]))
                lengths.setdefault(str(group.attrs["key"]), {})[str(group.attrs["branch"])] = len(group["step"])
                if name in seen:
                    traces.duplicates += 1
                    continue
                seen.add(name)
                traces.trajectories.append(
                    Trajectory(
                        key=str(group.attrs["key"]),
                        prompt=str(group.attrs["prompt"]),
                        prompt_index=int(group.attrs["prompt_index"]),
                        seed=int(group.attrs["seed"]),
                        branch=str(group.attrs["branch"]),
                        data={d: group[d][()] for d in (*DATASETS, *LAGGED_DATASETS) if d in group},
                    )
                )
            for key, per_branch in sorted(lengths.items()):
                problem = experts_problem(per_branch, steps)
                if problem:
                    raise _damaged(path, f"{key}_{sorted(per_branch)[0]}", f"(run {key}) {problem}")
            for key, missing in sorted(_missing_branches(branches).items()):
                raise _damaged(path, f"{key}_{sorted(missing)[0]}", f"is missing (run {key} lacks branch "
                               f"{sorted(missing)[0]!r} that the file's other runs have)")
    assert traces is not None  # expand_paths returns at least one file
    if not traces.trajectories:
        raise TraceFileError(
            f"{', '.join(map(str, paths))} hold no finished trajectories; record some with `python -m calibrate.record`."
        )
    return traces


def _damaged(path: Path, name: str, problem: str) -> TraceFileError:
    return TraceFileError(
        f"{path} is damaged: trajectory {name} {problem}; re-record it by running the same "
        f"`python -m calibrate.record` command with out={path} again, which records damaged trajectories anew."
    )


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

