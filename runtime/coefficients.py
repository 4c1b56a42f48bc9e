"""The coefficients file: one JSON schema, one loader/validator, one writer.

A coefficients file tells the runtime how to turn the per-step relative L1 change ``x`` of a signal
(the first block's modulated input, or the timestep embedding) into the predicted relative L1 change
of the transformer output, ``p(x)``, and which decision settings it was made for. The calibration
fitter writes through :func:`save_coefficients`, so every file the runtime reads passed the same
checks.

``coefficients`` are highest power first, as ``numpy.poly1d`` and every published port print them.
``x_range`` is the x interval the fit saw (cf. ``numpy.polynomial.Polynomial.domain``): the runtime
evaluates an x outside it at the nearest boundary instead of extrapolating the polynomial.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.resources
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import CoefficientsError, ConfigError
from .settings import FORECASTS, RULES, DecisionSettings, validate_decision_settings

SCHEMA = "teacache-coefficients/1"
SIGNALS = ("modulated_input", "timestep_embedding")
PROVENANCE_KINDS = ("published", "calibrated")
RECIPE_KEYS = ("num_inference_steps", "height", "width", "num_frames", "guidance")

_ENV_DIR = "TEACACHE_COEFFICIENTS_DIR"


def coefficients_dir() -> Path:
    """The folder that names resolve in: ``$TEACACHE_COEFFICIENTS_DIR``; else the shipped files, the
    package data of an installed wheel (``runtime/_coefficients``) or the checkout's ``coefficients/``
    (an editable install)."""
    override = os.environ.get(_ENV_DIR)
    if override:
        return Path(override)
    packaged = importlib.resources.files(__package__) / "_coefficients"
    if packaged.is_dir():
        return Path(os.fspath(packaged))
    return Path(__file__).resolve().parent.parent / "coefficients"


def available_names() -> list[str]:
    """Names of the coefficients files shipped in :func:`coefficients_dir`."""
    folder = coefficients_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


#: The file's ``defaults``: the decision settings it recommends (one class for file, runtime, fit and sweep).
DecisionDefaults = DecisionSettings


@dataclass(frozen=True)
class ThresholdRow:
    """One row of the threshold table: the computed fraction the fitter measured by replaying the rule
    on the full-compute traces, and (``calibrate.fit closed_loop=N``) the one the runtime realized on
    held-out prompt x seed pairs, where skipping changes the trajectory."""

    rel_l1_thresh: float
    computed_fraction: float
    computed_fraction_std: float = 0.0
    realized_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["realized_fraction"] is None:
            del out["realized_fraction"]
        return out


@dataclass(frozen=True)
class Coefficients:
    """A validated coefficients file in memory."""

    model: str
    transformer_class: str
    signal: str
    coefficients: tuple[float, ...]
    x_range: tuple[float, float] | None
    defaults: DecisionDefaults
    provenance: Mapping[str, Any]
    recipe: Mapping[str, Any] = field(default_factory=dict)
    thresholds: tuple[ThresholdRow, ...] = ()
    fit: Mapping[str, Any] | None = None
    experts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    rules: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # other rules' threshold and table
    step_weights: tuple[float, ...] | None = None  # teacache_dsigma: per step, the sigma step over its mean
    schedule: tuple[int, ...] | None = None  # fixed_schedule: the steps to compute (searched_schedule: in rules)
    origin: str = "<memory>"

    def __post_init__(self) -> None:
        # Round trip through the validator so an object built in code obeys the same rules as a file.
        _validate(self.to_dict(), self.origin)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, keys in schema order."""
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "model": self.model,
            "transformer_class": self.transformer_class,
            "signal": self.signal,
            "coefficients": list(self.coefficients),
            "x_range": list(self.x_range) if self.x_range is not None else None,
            "recipe": dict(self.recipe),
            "defaults": self.defaults.to_dict(),
        }
        if self.thresholds:
            out["thresholds"] = [row.to_dict() for row in self.thresholds]
        if self.fit is not None:
            out["fit"] = dict(self.fit)
        if self.experts:
            out["experts"] = {name: dict(expert) for name, expert in self.experts.items()}
        if self.rules:
            out["rules"] = {name: dict(entry) for name, entry in self.rules.items()}
        if self.step_weights is not None:
            out["step_weights"] = list(self.step_weights)
        if self.schedule is not None:
            out["schedule"] = list(self.schedule)
        out["provenance"] = dict(self.provenance)
        return out

    @property
    def expert_names(self) -> tuple[str, ...]:
        """``("transformer",)``, plus the pipeline's other experts this file has polynomials for (Wan2.2:
        ``transformer_2``, the low-noise expert)."""
        return ("transformer", *self.experts)

    def for_rule(self, rule: str) -> "Coefficients":
        """The file as seen with ``rule``: its default threshold and threshold table where the fit
        calibrated that rule (``rules``), else the file's own; the variant's data stay."""
        entry = self.rules.get(rule)
        defaults = self.defaults.with_overrides(rule=rule)
        if rule == "teacache_drift":
            if entry is None or "coefficients" not in entry:
                raise CoefficientsError(
                    f"{self.origin} has no teacache_drift polynomial (rules.teacache_drift); the drift rule needs one "
                    "fitted on lagged changes: record with `python -m calibrate.record` (drift_lags > 0, the default) "
                    "and fit with `python -m calibrate.fit`."
                )
            if self.experts:
                raise CoefficientsError(
                    f"{self.origin} holds several experts ({', '.join(self.expert_names)}), and the drift rule is "
                    "calibrated for one transformer only; use rule='teacache' (or teacache_dsigma, teacache_joint)."
                )
        if rule == "searched_schedule" and (entry is None or "schedules" not in entry):
            raise CoefficientsError(
                f"{self.origin} has no searched schedules (rules.searched_schedule); calibrate them with "
                f"`python -m calibrate.fit model={self.model} search=8` (a search over real generations of 8 "
                "training prompt x seed pairs)."
            )
        if entry is None:
            return dataclasses.replace(self, defaults=defaults)
        out = dataclasses.replace(
            self,
            defaults=defaults.with_overrides(rel_l1_thresh=entry["rel_l1_thresh"]),
            # rules.teacache (written when another rule became the default) holds the threshold only
            thresholds=tuple(ThresholdRow(**row) for row in entry["thresholds"]) if "thresholds" in entry else self.thresholds,
        )
        if "coefficients" in entry:  # a rule with its own polynomial (teacache_drift: lagged pairs)
            lag = entry.get("max_lag")
            out = dataclasses.replace(
                out,
                coefficients=tuple(float(c) for c in entry["coefficients"]),
                x_range=tuple(float(v) for v in entry["x_range"]),
                defaults=out.defaults if lag is None else out.defaults.capped(lag),
            )
        return out

    def searched_schedule(self, rel_l1_thresh: float) -> tuple[int, ...]:
        """The ``searched_schedule`` rule's steps at a threshold, which for this rule is the fraction of steps
        skipped: the searched schedule that skips the most without skipping more than ``rel_l1_thresh`` (every
        step below the table's first row: 0 never skips)."""
        entry, row = self._searched_row(rel_l1_thresh)
        return tuple(range(int(entry["num_steps"]))) if row is None else tuple(entry["schedules"][row])

    def searched_forecast(self, rel_l1_thresh: float) -> str:
        """The forecast the schedule of :meth:`searched_schedule` was searched with (``reuse`` where the file names
        none: files before forecasts)."""
        entry, row = self._searched_row(rel_l1_thresh)
        forecasts = entry.get("forecasts")
        return "reuse" if row is None or not forecasts else str(forecasts[row])

    def _searched_row(self, rel_l1_thresh: float) -> tuple[Mapping[str, Any], int | None]:
        entry = self.rules.get("searched_schedule")
        if entry is None or "schedules" not in entry:
            self.for_rule("searched_schedule")  # raises, naming the fix
        chosen = None
        for i, row in enumerate(entry["thresholds"]):
            if row["rel_l1_thresh"] <= rel_l1_thresh + 1e-9:
                chosen = i
        return entry, chosen

    def for_expert(self, name: str) -> "Coefficients":
        """The file as seen by one expert: its own polynomial, x range, table and default threshold."""
        if name == "transformer":
            return dataclasses.replace(self, experts={})
        if name not in self.experts:
            raise CoefficientsError(
                f"{self.origin} has no polynomial for expert {name!r} (it has {', '.join(self.expert_names)}); "
                "calibrate the two-expert pipeline with `python -m calibrate.record` and `python -m calibrate.fit`."
            )
        expert = self.experts[name]
        x_range = expert["x_range"]
        return dataclasses.replace(
            self,
            coefficients=tuple(float(c) for c in expert["coefficients"]),
            x_range=(float(x_range[0]), float(x_range[1])) if x_range is not None else None,
            thresholds=tuple(ThresholdRow(**row) for row in expert.get("thresholds") or ()),
            fit=expert.get("fit"),
            defaults=dataclasses.replace(self.defaults, rel_l1_thresh=expert.get("rel_l1_thresh", self.defaults.rel_l1_thresh)),
            experts={},
            origin=f"{self.origin} [{name}]",
        )

    def evaluate(self, x: float) -> float:
        """p(x) in float64 with x clamped to ``x_range`` (the runtime's own evaluation runs on the device)."""
        if self.x_range is not None:
            x = min(max(x, self.x_range[0]), self.x_range[1])
        value = 0.0
        for c in self.coefficients:
            value = value * x + c
        return value

    def threshold_for_speedup(self, speedup: float) -> float:
        """The smallest tabulated ``rel_l1_thresh`` whose mean computed fraction is at most ``1 / speedup``."""
        if not _is_number(speedup) or not speedup >= 1.0:
            raise ConfigError(f"speedup must be a number >= 1 (a ratio of step counts), got {speedup!r}.")
        if not self.thresholds:
            raise ConfigError(
                f"{self.origin} has no threshold table, so speedup= cannot pick a threshold; pass rel_l1_thresh= "
                "instead, or re-fit with `python -m calibrate.fit`, which writes the table."
            )
        row = threshold_reaching(self.thresholds, speedup)
        if row is not None:
            return row.rel_l1_thresh
        best = min(row.computed_fraction for row in self.thresholds)
        raise ConfigError(
            f"{self.origin}: no tabulated threshold reaches speedup {speedup} (the table's best is "
            f"{1.0 / best:.2f}x); ask for a smaller speedup or pass rel_l1_thresh= directly."
        )


def threshold_reaching(rows: "tuple[ThresholdRow, ...] | list[ThresholdRow]", speedup: float) -> ThresholdRow | None:
    """The row of smallest threshold whose mean computed fraction is at most ``1 / speedup``, if any."""
    return next((row for row in rows if row.computed_fraction <= 1.0 / speedup), None)


def load_coefficients(source: str | os.PathLike[str]) -> Coefficients:
    """Load and validate a coefficients file given by name (in :func:`coefficients_dir`) or path."""
    path = resolve_coefficients(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CoefficientsError(f"cannot read coefficients file {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError as exc:
        raise CoefficientsError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}), so it is not a "
            "coefficients file; re-create it with `python -m calibrate.fit` or save it as UTF-8 JSON."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CoefficientsError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); fix the file or "
            "re-create it with `python -m calibrate.fit`."
        ) from None
    return coefficients_from_dict(data, origin=str(path))


def resolve_coefficients(source: str | os.PathLike[str]) -> Path:
    """A path as given, or the file that a bare name (``qwen_image``) stands for."""
    if not isinstance(source, (str, os.PathLike)):
        raise CoefficientsError(
            f"the coefficients source must be a coefficients name or a path (str or os.PathLike), or a loaded "
            f"Coefficients object, not {type(source).__name__} {source!r}; pass e.g. 'qwen_image' or a .json path."
        )
    text = os.fspath(source)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    as_path = Path(text)
    looks_like_path = as_path.suffix == ".json" or os.sep in text or "/" in text
    if looks_like_path or as_path.is_file():
        if not as_path.is_file():
            raise CoefficientsError(f"coefficients file {as_path} does not exist; check the path.")
        return as_path
    candidate = coefficients_dir() / f"{text}.json"
    if candidate.is_file():
        return candidate
    names = ", ".join(available_names()) or "none"
    raise CoefficientsError(
        f"no coefficients named {text!r} in {coefficients_dir()} (available: {names}); pass one of those "
        "names or a path to a .json file, or calibrate the model with `python -m calibrate.record` and "
        "`python -m calibrate.fit`."
    )


def coefficients_from_dict(data: Any, origin: str = "<memory>") -> Coefficients:
    """Validate a parsed JSON document and build :class:`Coefficients` from it."""
    _validate(data, origin)
    thresholds = tuple(ThresholdRow(**row) for row in data.get("thresholds") or ())
    x_range = data["x_range"]
    return Coefficients(
        model=data["model"],
        transformer_class=data["transformer_class"],
        signal=data["signal"],
        coefficients=tuple(float(c) for c in data["coefficients"]),
        x_range=(float(x_range[0]), float(x_range[1])) if x_range is not None else None,
        recipe=dict(data.get("recipe") or {}),
        defaults=DecisionDefaults(**data["defaults"]),
        thresholds=thresholds,
        fit=data.get("fit"),
        experts=dict(data.get("experts") or {}),
        rules=dict(data.get("rules") or {}),
        step_weights=tuple(float(w) for w in data["step_weights"]) if data.get("step_weights") is not None else None,
        schedule=tuple(int(s) for s in data["schedule"]) if data.get("schedule") is not None else None,
        provenance=dict(data["provenance"]),
        origin=origin,
    )


def save_coefficients(coefficients: Coefficients, path: str | os.PathLike[str]) -> Path:
    """Write ``coefficients`` as JSON atomically (a crash never leaves half a file), and return the path.

    The file gets the mode of the file it replaces, else the umask's. A write that fails (a full or
    read-only disk, a path that is a folder) raises :class:`CoefficientsError` and leaves ``path`` as it was.
    """
    path = Path(path)
    document = coefficients.to_dict()
    _validate(document, str(path))
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    try:
        write_atomically(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))
    except OSError as exc:
        raise CoefficientsError(unwritable(path, exc)) from None
    return path


# ------------------------------------------------------------------------------------- atomic writes


def unwritable(path: Path, exc: OSError) -> str:
    """The sentence for an output that could not be written: what, why, the fix, and that nothing changed."""
    path = Path(path)
    state = "nothing was written" if not path.is_file() else f"{path.name} was left as it was"
    if isinstance(exc, IsADirectoryError) and path.is_dir():
        return f"cannot write {path}: it is a folder; pass a file path instead ({state})."
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, NotADirectoryError):
        return f"cannot write {path}: {reason}; pass a path under a folder instead ({state})."
    fix = "free some space on that disk" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "pass a writable path"
    return f"cannot write {path} ({reason}); {fix} and run again ({state})."


def _new_file_mode(path: Path) -> int:
    """The mode of the file ``path`` replaces, else what ``open()`` would give a new file under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _check_target(path: Path) -> None:
    """Refuse an output path that is a folder or lies under a file, with the reason as an OSError."""
    if path.is_dir():
        raise IsADirectoryError(21, "it is a folder; pass a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(20, f"{parent} is a file, not a folder")
            break


def stage_file(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Write a file's new content beside it, not yet in place: ``write(tmp)`` fills a temp file, which is
    then flushed to disk (fsync) and given the mode of ``path`` (else the umask's). Returns the temp path
    for :func:`commit_file`; on any error the temp file is removed and the error raised."""
    path = Path(path)
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes 0600
        write(tmp)
        with open(tmp, "rb") as raw:
            os.fsync(raw.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit_file(tmp: Path, path: str | os.PathLike[str]) -> Path:
    """Rename a staged temp file over ``path`` (atomic on POSIX) and flush the folder entry."""
    path = Path(path)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(folder)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the rename itself is done
    finally:
        os.close(folder)
    return path


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Temp file beside ``path``, ``write(tmp)``, fsync, mode of the replaced file, rename: at any moment
    ``path`` is the old file or the new one, never a half-written one."""
    return commit_file(stage_file(path, write), path)


# ---------------------------------------------------------------------------------------------- checks

_TOP_LEVEL = {
    "schema",
    "model",
    "transformer_class",
    "signal",
    "coefficients",
    "x_range",
    "recipe",
    "defaults",
    "thresholds",
    "fit",
    "experts",
    "rules",
    "step_weights",
    "schedule",
    "provenance",
}
_REQUIRED = ("schema", "model", "transformer_class", "signal", "coefficients", "x_range", "defaults", "provenance")
_DEFAULT_KEYS = {f.name for f in dataclasses.fields(DecisionDefaults)}
_THRESHOLD_KEYS = {f.name for f in dataclasses.fields(ThresholdRow)}
_EXPERT_KEYS = {"coefficients", "x_range", "rel_l1_thresh", "thresholds", "fit"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_FLOAT32_MAX = 3.4028234663852886e38


def _finite32(value: Any) -> bool:
    """A number the runtime can hold in float32 (it evaluates the polynomial on the device in float32)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value) and abs(float(value)) <= _FLOAT32_MAX
    except OverflowError:  # an integer beyond any float
        return False


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters, so a huge value cannot flood the one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(origin: str, field_name: str, problem: str, fix: str) -> CoefficientsError:
    return CoefficientsError(f"{origin}: field '{field_name}' {problem}; {fix}.")


def _validate(data: Any, origin: str) -> None:
    refit = "re-create the file with `python -m calibrate.fit`"
    if not isinstance(data, dict):
        raise CoefficientsError(f"{origin} must hold a JSON object, not {type(data).__name__}; {refit}.")
    if "schema" not in data:
        raise _fail(origin, "schema", "is missing", f"a coefficients file starts with \"schema\": \"{SCHEMA}\"")
    if data["schema"] != SCHEMA:
        raise _fail(
            origin,
            "schema",
            f"is {data['schema']!r}, a version this runtime cannot read (it reads {SCHEMA!r})",
            f"{refit} of this version, or upgrade the runtime",
        )
    for key in _REQUIRED:
        if key not in data:
            raise _fail(origin, key, "is missing", refit)
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise _fail(origin, unknown[0], "is not part of the schema", f"remove it (known fields: {sorted(_TOP_LEVEL)})")
    for key in ("model", "transformer_class"):
        if not isinstance(data[key], str) or not data[key]:
            raise _fail(origin, key, f"must be a non-empty string, got {data[key]!r}", refit)
    if data["signal"] not in SIGNALS:
        raise _fail(origin, "signal", f"is {data['signal']!r}", f"use one of {list(SIGNALS)}")

    provenance = data["provenance"]
    if not isinstance(provenance, dict) or provenance.get("kind") not in PROVENANCE_KINDS:
        raise _fail(
            origin, "provenance", "must be an object whose 'kind' is 'published' or 'calibrated'", refit
        )
    if provenance["kind"] == "published" and not isinstance(provenance.get("source"), str):
        raise _fail(origin, "provenance.source", "is missing for a published file", "name where the numbers come from")
    if provenance["kind"] == "calibrated" and not isinstance(provenance.get("traces"), list):
        raise _fail(origin, "provenance.traces", "is missing for a calibrated file", refit)

    _validate_polynomial(data, origin, "", provenance["kind"] == "calibrated")

    recipe = data.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise _fail(origin, "recipe", f"must be an object, got {recipe!r}", refit)
    pipeline = recipe.get("pipeline")
    if pipeline is not None and (not isinstance(pipeline, str) or not pipeline.isidentifier()):
        raise _fail(origin, "recipe.pipeline", f"must be a diffusers pipeline class name or null, got {pipeline!r}", refit)
    for key in RECIPE_KEYS:
        value = recipe.get(key)
        if value is not None and (not _is_number(value) or value < 0):
            raise _fail(origin, f"recipe.{key}", f"must be a number >= 0 or null, got {value!r}", refit)

    defaults = data["defaults"]
    if not isinstance(defaults, dict) or "rel_l1_thresh" not in defaults:
        raise _fail(origin, "defaults", "must be an object with at least rel_l1_thresh", refit)
    unknown = sorted(set(defaults) - _DEFAULT_KEYS)
    if unknown:
        raise _fail(origin, f"defaults.{unknown[0]}", "is not a decision setting", f"use {sorted(_DEFAULT_KEYS)}")
    try:
        validate_decision_settings(
            rel_l1_thresh=defaults["rel_l1_thresh"],
            warmup_steps=defaults.get("warmup_steps", 1),
            final_steps=defaults.get("final_steps", 1),
            max_consecutive_skips=defaults.get("max_consecutive_skips"),
            rule=defaults.get("rule", "teacache"),
            forecast=defaults.get("forecast", "reuse"),
            where=f"{origin}: defaults",
        )
    except ConfigError as exc:
        raise CoefficientsError(str(exc)) from None

    _validate_thresholds(data.get("thresholds"), origin, "thresholds")

    fit = data.get("fit")
    if fit is not None and not isinstance(fit, dict):
        raise _fail(origin, "fit", f"must be an object, got {fit!r}", refit)

    weights = data.get("step_weights")
    if weights is not None and (
        not isinstance(weights, list) or not weights or not all(_is_number(w) and _finite32(w) and w >= 0 for w in weights)
    ):
        raise _fail(origin, "step_weights", f"must be a non-empty list of numbers >= 0 (one per step), got {_short(weights)}", refit)
    schedule = data.get("schedule")
    if schedule is not None and (
        not isinstance(schedule, list) or not all(_is_int(s) and s >= 0 for s in schedule) or len(set(schedule)) != len(schedule)
    ):
        raise _fail(origin, "schedule", f"must be a list of distinct step indices >= 0, got {_short(schedule)}", refit)
    rule = defaults.get("rule", "teacache")
    if rule == "teacache_dsigma" and weights is None:
        raise _fail(origin, "step_weights", "is missing for rule teacache_dsigma", refit)
    if rule == "fixed_schedule" and schedule is None:
        raise _fail(origin, "schedule", "is missing for rule fixed_schedule", refit)

    rules = data.get("rules")
    drift = rules.get("teacache_drift") if isinstance(rules, dict) else None
    if rule == "teacache_drift" and not (isinstance(drift, dict) and "coefficients" in drift):
        raise _fail(origin, "rules.teacache_drift", "needs its own polynomial for rule teacache_drift", refit)
    searched = rules.get("searched_schedule") if isinstance(rules, dict) else None
    if rule == "searched_schedule" and not (isinstance(searched, dict) and "schedules" in searched):
        raise _fail(origin, "rules.searched_schedule", "needs its schedules for rule searched_schedule", refit)
    if rules is not None:
        if not isinstance(rules, dict):
            raise _fail(origin, "rules", "must be an object {rule: {rel_l1_thresh, thresholds}}", refit)
        for name, entry in rules.items():
            where = f"rules.{name}"
            if name not in RULES or name == "fixed_schedule":
                raise _fail(origin, where, f"is not a thresholded rule ({', '.join(r for r in RULES if r != 'fixed_schedule')})", refit)
            own = name == "teacache_drift"  # a rule with its own polynomial
            keys = {"rel_l1_thresh", "thresholds"} | ({"coefficients", "x_range", "max_lag", "fit"} if own else set())
            if name == "teacache":  # the upstream rule's default threshold while another rule is the default
                keys = {"rel_l1_thresh"}
            if name == "searched_schedule":
                keys |= {"schedules", "num_steps", "fit", "forecasts"}
            if not isinstance(entry, dict) or "rel_l1_thresh" not in entry or set(entry) - keys:
                raise _fail(origin, where, f"must be an object with rel_l1_thresh and optional {', '.join(sorted(keys - {'rel_l1_thresh'}))}", refit)
            if own and ("coefficients" in entry) != ("x_range" in entry):
                raise _fail(origin, where, "must hold both coefficients and x_range, or neither", refit)
            if own and "coefficients" in entry:
                _validate_polynomial(entry, origin, f"{where}.", provenance["kind"] == "calibrated")
            if own and entry.get("max_lag") is not None and (not _is_int(entry["max_lag"]) or entry["max_lag"] < 1):
                raise _fail(origin, f"{where}.max_lag", f"must be an integer >= 1, got {_short(entry['max_lag'])}", refit)
            try:
                validate_decision_settings(rel_l1_thresh=entry["rel_l1_thresh"], where=f"{origin}: {where}")
            except ConfigError as exc:
                raise CoefficientsError(str(exc)) from None
            _validate_thresholds(entry.get("thresholds"), origin, f"{where}.thresholds")
            if name == "searched_schedule":
                _validate_searched(entry, origin, where)

    experts = data.get("experts")
    if experts is not None:
        if not isinstance(experts, dict) or not experts:
            raise _fail(origin, "experts", "must be an object {expert attribute name: its polynomial}", refit)
        for name, expert in experts.items():
            where = f"experts.{name}"
            if not name.isidentifier() or name == "transformer":
                raise _fail(
                    origin, where, "must name another transformer attribute of the pipeline (e.g. transformer_2)",
                    "the file's own fields describe `transformer`",
                )
            if not isinstance(expert, dict) or not {"coefficients", "x_range"} <= set(expert) or set(expert) - _EXPERT_KEYS:
                raise _fail(origin, where, f"must be an object with coefficients, x_range (optional: {sorted(_EXPERT_KEYS - {'coefficients', 'x_range'})})", refit)
            _validate_polynomial(expert, origin, f"{where}.", provenance["kind"] == "calibrated")
            _validate_thresholds(expert.get("thresholds"), origin, f"{where}.thresholds")
            if "rel_l1_thresh" in expert:
                try:
                    validate_decision_settings(
                        rel_l1_thresh=expert["rel_l1_thresh"], warmup_steps=0, final_steps=0,
                        max_consecutive_skips=None, where=f"{origin}: {where}",
                    )
                except ConfigError as exc:
                    raise CoefficientsError(str(exc)) from None
            if expert.get("fit") is not None and not isinstance(expert["fit"], dict):
                raise _fail(origin, f"{where}.fit", "must be an object", refit)


def _validate_polynomial(data: dict, origin: str, prefix: str, calibrated: bool) -> None:
    """``coefficients`` and ``x_range`` of the file, or of one expert (``prefix`` names where)."""
    refit = "re-create the file with `python -m calibrate.fit`"
    coefficients = data["coefficients"]
    if (
        not isinstance(coefficients, list)
        or not coefficients
        or not all(_is_number(c) for c in coefficients)
    ):
        raise _fail(
            origin,
            f"{prefix}coefficients",
            f"must be a non-empty list of finite numbers (highest power first), got {_short(coefficients)}",
            refit,
        )
    if not all(_finite32(c) for c in coefficients):
        raise _fail(
            origin,
            f"{prefix}coefficients",
            f"holds {_short(next(c for c in coefficients if not _finite32(c)))}, which is not a finite float32 "
            "number (|c| <= 3.4e38) as the runtime evaluates the polynomial in float32",
            refit,
        )

    x_range = data["x_range"]
    if x_range is None:
        if calibrated:
            raise _fail(origin, f"{prefix}x_range", "is null in a calibrated file", refit)
    elif (
        not isinstance(x_range, list)
        or len(x_range) != 2
        or not all(_is_number(v) for v in x_range)
        or not 0 <= x_range[0] <= x_range[1]
    ):
        raise _fail(origin, f"{prefix}x_range", f"must be [low, high] with 0 <= low <= high, got {_short(x_range)}", refit)
    elif not all(_finite32(v) for v in x_range):
        raise _fail(
            origin,
            f"{prefix}x_range",
            f"is {_short(x_range)}, not finite float32 numbers (<= 3.4e38) as the runtime compares x in float32",
            refit,
        )


def _validate_searched(entry: dict, origin: str, where: str) -> None:
    """``rules.searched_schedule``: ``num_steps`` and one schedule (distinct steps in range, step 0 among them)
    per threshold row, as many steps as the row's computed fraction says."""
    refit = "re-create it with `python -m calibrate.fit search=N`"
    n, schedules, rows = entry.get("num_steps"), entry.get("schedules"), entry.get("thresholds") or []
    if not _is_int(n) or n < 1:
        raise _fail(origin, f"{where}.num_steps", f"must be the recipe's step count (an integer >= 1), got {_short(n)}", refit)
    if not rows:
        raise _fail(origin, f"{where}.thresholds", "must hold one row per searched schedule (none given)", refit)
    if not isinstance(schedules, list) or len(schedules) != len(rows):
        raise _fail(origin, f"{where}.schedules", f"must be a list of {len(rows)} schedules, one per threshold row", refit)
    for i, (steps, row) in enumerate(zip(schedules, rows)):
        if (
            not isinstance(steps, list) or not all(_is_int(s) and 0 <= s < n for s in steps)
            or len(set(steps)) != len(steps) or 0 not in steps
        ):
            raise _fail(origin, f"{where}.schedules[{i}]", f"must list distinct steps in [0, {n}), step 0 among them, got {_short(steps)}", refit)
        if abs(len(steps) / n - row["computed_fraction"]) > 1e-3:
            raise _fail(origin, f"{where}.schedules[{i}]", f"computes {len(steps)} of {n} steps, but its row says {row['computed_fraction']}", refit)
    forecasts = entry.get("forecasts")
    if forecasts is not None and (
        not isinstance(forecasts, list) or len(forecasts) != len(rows) or not all(f in FORECASTS for f in forecasts)
    ):
        raise _fail(origin, f"{where}.forecasts", f"must list one of {', '.join(FORECASTS)} per threshold row ({len(rows)}), got {_short(forecasts)}", refit)


def _validate_thresholds(thresholds: Any, origin: str, where: str) -> None:
    refit = "re-create the file with `python -m calibrate.fit`"
    if thresholds is not None:
        if not isinstance(thresholds, list):
            raise _fail(origin, where, "must be a list of rows", refit)
        previous = -math.inf
        for i, row in enumerate(thresholds):
            if not isinstance(row, dict) or set(row) - _THRESHOLD_KEYS or not {"rel_l1_thresh", "computed_fraction"} <= set(row):
                raise _fail(origin, f"{where}[{i}]", f"must have keys {sorted(_THRESHOLD_KEYS)}", refit)
            thresh, fraction = row["rel_l1_thresh"], row["computed_fraction"]
            if not (_is_number(thresh) and thresh >= 0 and _is_number(fraction) and 0 <= fraction <= 1):
                raise _fail(
                    origin, f"{where}[{i}]", "needs rel_l1_thresh >= 0 and computed_fraction in [0, 1]", refit
                )
            realized = row.get("realized_fraction")
            if realized is not None and not (_is_number(realized) and 0 <= realized <= 1):
                raise _fail(origin, f"{where}[{i}].realized_fraction", "must be in [0, 1] or absent", refit)
            if thresh <= previous:
                raise _fail(origin, f"{where}[{i}]", "is out of order (thresholds must increase)", refit)
            previous = thresh
