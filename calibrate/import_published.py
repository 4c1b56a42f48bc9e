"""Write coefficients files (``schema: teacache-coefficients/1``) from published polynomials, in any
of the shapes the TeaCache ports keep them in.

    python -m calibrate.import_published ../shared/published_coefficients.json
    python -m calibrate.import_published teacache_flux.py --transformer-class FluxTransformer2DModel
    python -m calibrate.import_published teacache.json --transformer-class QwenImageTransformer2DModel --model mine

Shapes read (``--format auto`` tells them apart; name one to insist on it):

- ``published``: this project's list of published polynomials (``{"models": [...]}``): one file per
  model whose transformer class the runtime supports, into ``--out`` (default ``coefficients/``). The
  default threshold is the smallest one the source reports at 1.5x or more (else its largest); the
  first and the last step are computed, as in the upstream ports.
- ``teacache``: upstream TeaCache: a Python snippet with ``coefficients = [...]`` (and optionally
  ``rel_l1_thresh = ...``), or a bare JSON list of coefficients.
- ``comfyui``: ComfyUI-TeaCache: ``SUPPORTED_MODELS_COEFFICIENTS = {...}`` (or one pasted
  ``"model_type": [...]`` entry), optionally with the node inputs ``TEACACHE_NODE_INPUTS``.
- ``vllm_omni``: vllm-omni: ``_MODEL_COEFFICIENTS = {...}``, a ``TeaCacheConfig(...)`` call, or its
  ``cache_config`` (``{"rel_l1_thresh": ..., "coefficients": [...]}``).
- ``sglang``: ``{"coefficients": [...], "teacache_thresh": ...}``, or one such object per expert
  (``{"high": {...}, "low": {...}}``; pick one with ``--entry``).
- ``diffusers``: the config snippet ``python -m calibrate.export format=diffusers`` writes.

A shape that does not carry something the schema needs is refused with the argument that supplies it
(``--transformer-class``, ``--rel-l1-thresh``, ``--entry``); ``--model`` names the file (default: the
entry's key or the input's file name). Snippets written by ``calibrate.export`` carry the source's
fields in a ``# teacache-calibrate:`` line, which restores model, class, signal, x range, recipe and
decision settings. The sources' numbers are kept untouched; provenance is ``published`` and names the
input file and its format. An existing file with other contents is never overwritten without
``--force``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import TeaCacheError

from .export import COMFYUI_FAMILIES, FORMATS, META_MARKER, PORT_NAMES

INPUT_FORMATS = ("auto", "published", *FORMATS)
# Families whose published fits measure the timestep embedding (upstream's Wan2.1, HiDream, CogVideoX
# scripts); every other published fit measures the first block's modulated input.
TIMESTEP_EMBEDDING_CLASSES = {"WanTransformer3DModel", "HiDreamImageTransformer2DModel", "CogVideoXTransformer3DModel"}


class ImportFormatError(TeaCacheError):
    """An input file of no known shape, an ambiguous one, or one lacking what the schema needs."""


# ----------------------------------------------------------------------------- the published list

def default_threshold(speedups: dict[str, float]) -> float:
    ordered = sorted((float(t), s) for t, s in speedups.items())
    for thresh, speedup in ordered:
        if speedup >= 1.5:
            return thresh
    return ordered[-1][0]


def recipe_from_notes(notes: str) -> dict[str, float | int | None]:
    steps = re.search(r"(\d+) steps", notes)
    size = re.search(r"(\d+)x(\d+)", notes)
    cfg = re.search(r"CFG (\d+(?:\.\d+)?)", notes)
    return {
        "num_inference_steps": int(steps.group(1)) if steps else None,
        "height": int(size.group(1)) if size else None,
        "width": int(size.group(2)) if size else None,
        "num_frames": None,
        "guidance": float(cfg.group(1)) if cfg else None,
    }


def published_list(data: dict) -> list:
    """The supported models of a published list, as :class:`Coefficients`."""
    from runtime import ADAPTERS, Coefficients, DecisionDefaults

    out = []
    for entry in data["models"]:
        if entry["transformer_class"] not in ADAPTERS or not entry["speedups"]:
            continue
        out.append(
            Coefficients(
                model=entry["name"],
                transformer_class=entry["transformer_class"],
                signal=entry["signal"],
                coefficients=tuple(entry["coefficients"]),
                x_range=None,
                recipe=recipe_from_notes(entry["notes"]),
                defaults=DecisionDefaults(rel_l1_thresh=default_threshold(entry["speedups"])),
                provenance={
                    "kind": "published",
                    "source": entry["source"],
                    "checkpoint": entry["checkpoint"],
                    "reported_speedups": entry["speedups"],
                    "notes": entry["notes"],
                },
            )
        )
    return out


def import_published(path: Path, out_dir: Path, *, force: bool = False) -> list[Path]:
    """One file per supported model of the published list at ``path``, into ``out_dir``."""
    data = _read_json(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ImportFormatError(f"{path} is not a published list (a JSON object with a \"models\" list).")
    return _write_all([(c, Path(out_dir) / f"{c.model}.json") for c in published_list(data)], force)


# ----------------------------------------------------------------------------- one port entry

@dataclass
class Shape:
    """What a port's file holds, before it becomes a coefficients file."""

    format: str
    coefficients: list
    rel_l1_thresh: float | None = None
    transformer_class: str | None = None
    key: str | None = None
    meta: dict | None = None
    extras: dict = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportFormatError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).") from None


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ImportFormatError(f"{path} does not exist; pass the file to import.")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportFormatError(f"cannot read {path} as text ({exc}); pass a JSON or Python file.") from None


def _is_numbers(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _python_literals(text: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Top-level ``name = <literal>`` assignments and the keywords of a ``TeaCacheConfig(...)`` call,
    read with ``ast`` (never executed); None when the text is not Python."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    assigns: dict[str, Any] = {}
    call: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            name = target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else None
            if name is not None:
                try:
                    assigns[name] = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError, RecursionError):
                    pass
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "TeaCacheConfig":
            for kw in node.keywords:
                try:
                    call[kw.arg] = ast.literal_eval(kw.value)
                except (ValueError, TypeError, SyntaxError, RecursionError):
                    pass
    return assigns, call


def _pasted_entries(text: str) -> dict | None:
    """A dict entry pasted on its own (``"flux": [...],``), as ``{key: list}``."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).strip().rstrip(",")
    if not body.startswith(("'", '"')):
        return None
    try:
        value = ast.literal_eval("{" + body + "}")
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _meta(text: str) -> dict | None:
    for line in text.splitlines():
        if line.startswith(META_MARKER):
            try:
                value = json.loads(line[len(META_MARKER):])
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _looks_like_class(key: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Za-z0-9]*(Model|Pipeline)", key))


def _pick(entries: dict, entry: str | None, what: str, path: Path, preferred: str | None = None) -> tuple[str, Any]:
    if entry is not None:
        if entry not in entries:
            raise ImportFormatError(f"{path} has no {what} {entry!r} (it has {', '.join(map(str, entries))}); pass one of those as --entry.")
        return entry, entries[entry]
    if preferred is not None and preferred in entries:
        return preferred, entries[preferred]
    if len(entries) != 1:
        raise ImportFormatError(
            f"{path} holds {len(entries)} {what}s ({', '.join(map(str, entries))}); pass the one to import as --entry."
        )
    return next(iter(entries.items()))


def _check_coefficients(values: Any, path: Path, where: str) -> list:
    if not _is_numbers(values):
        raise ImportFormatError(f"{path}: {where} must be a non-empty list of finite numbers (highest power first), got {values!r}.")
    return [float(v) for v in values]


def _from_dict_of_lists(entries: dict, fmt: str, path: Path, entry: str | None, preferred: str | None = None) -> Shape:
    key, values = _pick(entries, entry, "vllm-omni class entry" if fmt == "vllm_omni" else "ComfyUI model entry", path, preferred)
    coefficients = _check_coefficients(values, path, f"entry {key!r}")
    return Shape(fmt, coefficients, key=str(key), transformer_class=str(key) if fmt == "vllm_omni" else None)


def read_shape(path: Path, fmt: str = "auto", entry: str | None = None) -> Shape | dict:
    """The coefficients entry that ``path`` holds; a published list is returned as its parsed dict."""
    if fmt not in INPUT_FORMATS:
        raise ImportFormatError(f"--format {fmt!r} is not one of {', '.join(INPUT_FORMATS)}.")
    path = Path(path)
    text = _read_text(path)
    meta = _meta(text)
    shape: Shape | dict | None = None
    try:
        data = json.loads(text)
        is_json = True
    except json.JSONDecodeError:
        data, is_json = None, False

    if is_json:
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            shape = data
        elif isinstance(data, dict) and "schema" in data and "coefficients" in data and "transformer_class" in data:
            raise ImportFormatError(
                f"{path} is already a coefficients file of this project's schema; use it as is (load_coefficients, "
                "coefficients=<path>), nothing to import."
            )
        elif isinstance(data, dict) and isinstance(data.get("teacache"), dict) and isinstance(data["teacache"].get("coefficients"), dict):
            shape = Shape("diffusers", [], extras=dict(data["teacache"]))
        elif isinstance(data, dict) and "teacache_thresh" in data:
            shape = Shape("sglang", _check_coefficients(data.get("coefficients"), path, "\"coefficients\""),
                          rel_l1_thresh=data["teacache_thresh"])
        elif isinstance(data, dict) and data and all(isinstance(v, dict) and "teacache_thresh" in v for v in data.values()):
            key, value = _pick(data, entry, "sglang expert", path)
            shape = Shape("sglang", _check_coefficients(value.get("coefficients"), path, f"expert {key!r} coefficients"),
                          rel_l1_thresh=value["teacache_thresh"], key=str(key))
        elif isinstance(data, dict) and "rel_l1_thresh" in data and "coefficients" in data:
            shape = Shape("vllm_omni", _check_coefficients(data["coefficients"], path, "\"coefficients\""),
                          rel_l1_thresh=data["rel_l1_thresh"], transformer_class=data.get("transformer_type"))
        elif _is_numbers(data):
            shape = Shape("teacache", [float(v) for v in data])
        elif isinstance(data, dict) and data and all(_is_numbers(v) for v in data.values()):
            guess = "vllm_omni" if all(_looks_like_class(str(k)) for k in data) else "comfyui"
            shape = _from_dict_of_lists(data, fmt if fmt in ("vllm_omni", "comfyui") else guess, path, entry)
    else:
        literals = _python_literals(text)
        if literals is not None:
            assigns, call = literals
            if isinstance(assigns.get("SUPPORTED_MODELS_COEFFICIENTS"), dict):
                inputs = assigns.get("TEACACHE_NODE_INPUTS") if isinstance(assigns.get("TEACACHE_NODE_INPUTS"), dict) else {}
                shape = _from_dict_of_lists(assigns["SUPPORTED_MODELS_COEFFICIENTS"], "comfyui", path, entry, inputs.get("model_type"))
                if inputs.get("model_type") in (None, shape.key):
                    shape.rel_l1_thresh = inputs.get("rel_l1_thresh")
                    shape.extras = {k: inputs[k] for k in ("start_percent", "end_percent") if k in inputs}
            elif isinstance(assigns.get("_MODEL_COEFFICIENTS"), dict):
                shape = _from_dict_of_lists(assigns["_MODEL_COEFFICIENTS"], "vllm_omni", path, entry, call.get("transformer_type"))
                config = assigns.get("cache_config") if isinstance(assigns.get("cache_config"), dict) else {}
                shape.rel_l1_thresh = config.get("rel_l1_thresh", call.get("rel_l1_thresh", assigns.get("rel_l1_thresh")))
            elif call:
                shape = Shape("vllm_omni", _check_coefficients(call.get("coefficients"), path, "TeaCacheConfig(coefficients=...)"),
                              rel_l1_thresh=call.get("rel_l1_thresh"), transformer_class=call.get("transformer_type"))
            elif isinstance(assigns.get("cache_config"), dict) and "coefficients" in assigns["cache_config"]:
                config = assigns["cache_config"]
                shape = Shape("vllm_omni", _check_coefficients(config["coefficients"], path, "cache_config[\"coefficients\"]"),
                              rel_l1_thresh=config.get("rel_l1_thresh"))
            elif "coefficients" in assigns:
                shape = Shape("teacache", _check_coefficients(assigns["coefficients"], path, "coefficients"),
                              rel_l1_thresh=assigns.get("rel_l1_thresh"))
        if shape is None:
            pasted = _pasted_entries(text)
            if pasted and all(_is_numbers(v) for v in pasted.values()):
                guess = "vllm_omni" if all(_looks_like_class(str(k)) for k in pasted) else "comfyui"
                shape = _from_dict_of_lists(pasted, fmt if fmt in ("vllm_omni", "comfyui") else guess, path, entry)

    if shape is None:
        raise ImportFormatError(
            f"{path} holds none of the shapes this reads (published list, upstream `coefficients = [...]`, ComfyUI "
            "SUPPORTED_MODELS_COEFFICIENTS, vllm-omni _MODEL_COEFFICIENTS / TeaCacheConfig, sglang "
            "{\"coefficients\", \"teacache_thresh\"}, calibrate.export's diffusers config); check the file."
        )
    found = "published" if isinstance(shape, dict) else shape.format
    if fmt != "auto" and fmt != found:
        raise ImportFormatError(f"{path} looks like the {found} shape, not {fmt}; pass --format {found} or the right file.")
    if isinstance(shape, Shape):
        shape.meta = meta
    return shape


def _number_or_none(value: Any, path: Path, what: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ImportFormatError(f"{path}: {what} must be a finite number >= 0, got {value!r}.")
    return float(value)


def coefficients_from_shape(
    shape: Shape,
    path: Path,
    *,
    transformer_class: str | None = None,
    model: str | None = None,
    signal: str | None = None,
    rel_l1_thresh: float | None = None,
    num_inference_steps: int | None = None,
):
    """A validated :class:`Coefficients` from one port entry plus what the arguments supply."""
    from runtime.coefficients import SIGNALS, Coefficients, DecisionDefaults, coefficients_from_dict

    path = Path(path)
    if shape.format == "diffusers":
        settings = dict(shape.extras)
        document = dict(settings.pop("coefficients"))
        c = coefficients_from_dict(document, origin=str(path))
        thresh = rel_l1_thresh if rel_l1_thresh is not None else settings.get("rel_l1_thresh", c.defaults.rel_l1_thresh)
        provenance = {"kind": "published", "source": f"{path} ({PORT_NAMES['diffusers']} config)", "format": "diffusers",
                      "imported_from": dict(c.provenance)}
        for name, value in (("transformer_class", transformer_class), ("model", model), ("signal", signal)):
            if value is not None and value != getattr(c, name):
                raise ImportFormatError(f"{path} is for {name} {getattr(c, name)!r}, not {value!r}; drop --{name.replace('_', '-')}.")
        return Coefficients(
            model=c.model, transformer_class=c.transformer_class, signal=c.signal, coefficients=c.coefficients,
            x_range=c.x_range, recipe=dict(c.recipe),
            defaults=DecisionDefaults(
                rel_l1_thresh=float(thresh),
                warmup_steps=settings.get("warmup_steps", c.defaults.warmup_steps),
                final_steps=settings.get("final_steps", c.defaults.final_steps),
                max_consecutive_skips=settings.get("max_consecutive_skips", c.defaults.max_consecutive_skips),
            ),
            thresholds=c.thresholds, fit=c.fit, provenance=provenance, origin=str(path),
        )

    meta = shape.meta or {}
    carried = shape.transformer_class or meta.get("transformer_class")
    if shape.format == "comfyui" and not carried and shape.key:
        carried = next((cls for family, cls in COMFYUI_FAMILIES.items() if family in shape.key), None)
    if transformer_class and carried and transformer_class != carried:
        raise ImportFormatError(
            f"{path} is for {carried}, but --transformer-class says {transformer_class}; drop the argument or import "
            "another entry (--entry)."
        )
    cls = transformer_class or carried
    if not cls:
        raise ImportFormatError(
            f"{path} ({shape.format} shape) does not say which transformer class its coefficients are for; pass "
            "--transformer-class, e.g. --transformer-class QwenImageTransformer2DModel."
        )
    thresh = rel_l1_thresh if rel_l1_thresh is not None else shape.rel_l1_thresh
    if thresh is None:
        thresh = (meta.get("defaults") or {}).get("rel_l1_thresh")
    thresh = _number_or_none(thresh, path, "the threshold")
    if thresh is None:
        raise ImportFormatError(
            f"{path} ({shape.format} shape) carries no threshold; pass --rel-l1-thresh with the value its port uses."
        )
    chosen_signal = signal or meta.get("signal") or ("timestep_embedding" if cls in TIMESTEP_EMBEDDING_CLASSES else "modulated_input")
    if chosen_signal not in SIGNALS:
        raise ImportFormatError(f"--signal {chosen_signal!r} is not one of {', '.join(SIGNALS)}.")
    name = model or meta.get("model") or (re.sub(r"[^A-Za-z0-9_]+", "_", shape.key).strip("_") if shape.key and shape.format != "vllm_omni" else None) or path.stem
    recipe = dict(meta.get("recipe") or {})
    if num_inference_steps is not None:
        recipe["num_inference_steps"] = int(num_inference_steps)
    steps = recipe.get("num_inference_steps")

    meta_defaults = meta.get("defaults") or {}
    # Each port's own schedule of forced steps, unless the export's marker line states ours.
    warmup, final = {"teacache": (1, 1), "vllm_omni": (1, 0), "comfyui": (1, 0), "sglang": (1, 1)}[shape.format]
    if shape.format == "comfyui" and steps:
        start, end = shape.extras.get("start_percent", 0.0), shape.extras.get("end_percent", 1.0)
        warmup = max(1, round(start * steps)) if start > 0 else 1
        final = max(0, steps - round(end * steps) - 1) if end < 1 else 0
    warmup = meta_defaults.get("warmup_steps", warmup)
    final = meta_defaults.get("final_steps", final)
    x_range = meta.get("x_range")

    provenance: dict[str, Any] = {
        "kind": "published",
        "source": f"{path} ({PORT_NAMES[shape.format]} format)",
        "format": shape.format,
    }
    if shape.key is not None:
        provenance["entry"] = shape.key
    if meta.get("provenance"):
        provenance["exported_from"] = meta["provenance"]
    return Coefficients(
        model=name,
        transformer_class=cls,
        signal=chosen_signal,
        coefficients=tuple(shape.coefficients),
        x_range=tuple(x_range) if x_range is not None else None,
        recipe=recipe,
        defaults=DecisionDefaults(
            rel_l1_thresh=thresh,
            warmup_steps=warmup,
            final_steps=final,
            max_consecutive_skips=meta_defaults.get("max_consecutive_skips"),
        ),
        provenance=provenance,
        origin=str(path),
    )


def _write_all(items: list, force: bool) -> list[Path]:
    """Write every (coefficients, path); first check that none would overwrite other contents."""
    from runtime.coefficients import save_coefficients

    for c, target in items:
        if target.exists() and not force:
            try:
                same = json.loads(target.read_text(encoding="utf-8")) == json.loads(json.dumps(c.to_dict()))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                same = False
            if not same:
                raise ImportFormatError(
                    f"{target} already exists with other contents; pass --out elsewhere, or --force to replace it "
                    "(nothing was written)."
                )
    return [save_coefficients(c, target) for c, target in items]


def import_file(
    path: Path,
    out: Path | None = None,
    *,
    fmt: str = "auto",
    entry: str | None = None,
    force: bool = False,
    **arguments: Any,
) -> list[Path]:
    """Import any supported shape; ``out`` is a folder (default ``coefficients/``) or, for one entry, a ``.json`` file."""
    from runtime.coefficients import coefficients_dir

    path = Path(path)
    shape = read_shape(path, fmt, entry)
    out = Path(out) if out is not None else coefficients_dir()
    if isinstance(shape, dict):
        extra = {k: v for k, v in arguments.items() if v is not None}
        if extra or entry is not None:
            raise ImportFormatError(
                f"{path} is a published list, which carries every field itself; drop --{next(iter(extra or {'entry': 0})).replace('_', '-')}."
            )
        if out.suffix == ".json":
            raise ImportFormatError(f"a published list writes one file per model; pass --out a folder, not {out}.")
        return _write_all([(c, out / f"{c.model}.json") for c in published_list(shape)], force)
    c = coefficients_from_shape(shape, path, **arguments)
    target = out if out.suffix == ".json" else out / f"{c.model}.json"
    return _write_all([(c, target)], force)


def main(argv: list[str] | None = None) -> None:
    from .cli import one_line_errors

    parser = argparse.ArgumentParser(
        prog="python -m calibrate.import_published",
        description="Write coefficients files of this project's schema from a published list or from a file in any "
        "TeaCache port's shape (upstream list/snippet, ComfyUI entry, vllm-omni entry, sglang JSON, diffusers config).",
    )
    parser.add_argument("source", type=Path, help="the file to import (JSON or Python text)")
    parser.add_argument("--format", default="auto", choices=INPUT_FORMATS, help="the input's shape (default: auto-detect)")
    parser.add_argument("--out", type=Path, default=None, help="folder to write into (default: coefficients/), or a .json file for one entry")
    parser.add_argument("--transformer-class", default=None, help="diffusers class the coefficients are for, when the shape does not carry it")
    parser.add_argument("--model", default=None, help="name of the written file/model (default: the entry's key or the input's name)")
    parser.add_argument("--signal", default=None, help="modulated_input or timestep_embedding (default: the family's published signal)")
    parser.add_argument("--rel-l1-thresh", type=float, default=None, help="threshold, when the shape carries none (overrides it otherwise)")
    parser.add_argument("--entry", default=None, help="which entry of a file holding several (ComfyUI model_type, vllm-omni class, sglang expert)")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="the step count the coefficients were made for")
    parser.add_argument("--force", action="store_true", help="replace an existing file with other contents")
    args = parser.parse_args(argv)
    with one_line_errors():
        written = import_file(
            args.source,
            args.out,
            fmt=args.format,
            entry=args.entry,
            force=args.force,
            transformer_class=args.transformer_class,
            model=args.model,
            signal=args.signal,
            rel_l1_thresh=args.rel_l1_thresh,
            num_inference_steps=args.num_inference_steps,
        )
        for path in written:
            print(path)


if __name__ == "__main__":
    main()
