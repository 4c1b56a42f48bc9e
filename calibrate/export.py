"""``python -m calibrate.export coefficients=<name or path> format=<f> [out=<file>]``: a coefficients
file in the shape another TeaCache port reads.

Formats (what each port reads, from its own source):

- ``teacache``: upstream TeaCache (ali-vilab/TeaCache) model scripts: ``coefficients = [...]``, highest
  power first, for ``np.poly1d``, and the script's ``rel_l1_thresh``. A Python snippet.
- ``comfyui``: ComfyUI-TeaCache (welltop-cn) ``nodes.py``: one ``SUPPORTED_MODELS_COEFFICIENTS`` entry
  keyed by ``model_type``, and the TeaCache node's inputs ``model_type``, ``rel_l1_thresh``,
  ``start_percent``, ``end_percent``. A Python snippet.
- ``vllm_omni``: vllm-omni ``cache/teacache/config.py``: one ``_MODEL_COEFFICIENTS`` entry keyed by the
  transformer class, and the ``cache_config`` its ``TeaCacheConfig`` is built from (``rel_l1_thresh``,
  ``coefficients``). ``TeaCacheConfig`` requires exactly 5 coefficients (degree 4) and a threshold > 0.
- ``sglang``: the JSON sglang's ``TeaCacheParams`` reads: exactly ``{"coefficients": [...],
  "teacache_thresh": ...}`` (what its ``teacache_calibrate`` tool writes for one transformer).
- ``diffusers``: a config snippet for this project's runtime on diffusers: the whole coefficients
  document and the decision settings, for ``TeaCache.from_coefficients(...)``. Nothing is lost.

Each snippet says where it came from (model, class, signal, provenance, x range, recipe) in comments
where the format allows comments, and every export lists what the target port cannot express (our
x-range clamp, the floor of p at 0, warm-up and final steps, the cap on consecutive skips): on
stderr, and as comments in the Python snippets. Numbers are written with Python's shortest exact
``repr``, so ``python -m calibrate.import_published`` reads back the same coefficients and threshold.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra

from runtime.errors import TeaCacheError

from .cli import CONF_PATH, one_line_errors

if TYPE_CHECKING:  # the runtime package imports torch; the CLI checks its arguments first
    from runtime.coefficients import Coefficients

FORMATS = ("teacache", "comfyui", "vllm_omni", "sglang", "diffusers")
SUFFIXES = {"teacache": ".py", "comfyui": ".py", "vllm_omni": ".py", "sglang": ".json", "diffusers": ".json"}
PORT_NAMES = {
    "teacache": "upstream TeaCache (ali-vilab/TeaCache)",
    "comfyui": "ComfyUI-TeaCache (welltop-cn/ComfyUI-TeaCache)",
    "vllm_omni": "vllm-omni (vllm-project/vllm-omni)",
    "sglang": "sglang (sgl-project/sglang)",
    "diffusers": "this project's runtime on diffusers",
}
# The marker line that carries the source file's fields through a Python snippet, so that an
# import of the snippet restores them (model, class, signal, x range, recipe, defaults).
META_MARKER = "# teacache-calibrate: "
# ComfyUI-TeaCache picks its patched forward by a substring of ``model_type`` (nodes.py,
# ``apply_teacache``); these are the diffusers classes of those families.
COMFYUI_FAMILIES = {
    "flux": "FluxTransformer2DModel",
    "hidream_i1": "HiDreamImageTransformer2DModel",
    "ltxv": "LTXVideoTransformer3DModel",
    "hunyuan_video": "HunyuanVideoTransformer3DModel",
    "wan2.1": "WanTransformer3DModel",
}
COMFYUI_NODE_INPUTS = ("model_type", "rel_l1_thresh", "start_percent", "end_percent")
VLLM_OMNI_DEGREE = 4


class ExportError(TeaCacheError):
    """A coefficients file that the requested port cannot take, or an unknown format."""


@dataclass
class Exported:
    """The text of one export, its format, and what the target port cannot express."""

    format: str
    text: str
    rel_l1_thresh: float
    warnings: list[str] = field(default_factory=list)


def check_format(fmt: Any) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} is not one of {', '.join(FORMATS)}; pass one of those.")
    return fmt


def _num(value: float) -> str:
    """Python's shortest repr that reads back to the same float."""
    return repr(float(value))


def _list(values) -> str:
    return "[" + ", ".join(_num(v) for v in values) + "]"


def polyval(coefficients, x: float) -> float:
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def _derivative(coefficients) -> list[float]:
    n = len(coefficients) - 1
    return [c * (n - i) for i, c in enumerate(coefficients[:-1])]


def negative_or_decreasing(coefficients, low: float, high: float, samples: int = 2001) -> dict[str, list[list[float]]]:
    """Intervals of [low, high] where the raw polynomial is negative, and where it decreases."""
    out: dict[str, list[list[float]]] = {"negative": [], "decreasing": []}
    if not high > low:
        return out
    grid = [low + (high - low) * i / (samples - 1) for i in range(samples)]
    slope = _derivative(coefficients)
    for key, test in (("negative", lambda x: polyval(coefficients, x) < 0), ("decreasing", lambda x: polyval(slope, x) < 0)):
        start = None
        for x in grid:
            if test(x) and start is None:
                start = x
            elif not test(x) and start is not None:
                out[key].append([start, x])
                start = None
        if start is not None:
            out[key].append([start, grid[-1]])
    return out


def _metadata(c: "Coefficients") -> dict[str, Any]:
    provenance = dict(c.provenance)
    return {
        "model": c.model,
        "transformer_class": c.transformer_class,
        "signal": c.signal,
        "x_range": list(c.x_range) if c.x_range is not None else None,
        "recipe": dict(c.recipe),
        "defaults": {
            "rel_l1_thresh": c.defaults.rel_l1_thresh,
            "warmup_steps": c.defaults.warmup_steps,
            "final_steps": c.defaults.final_steps,
            "max_consecutive_skips": c.defaults.max_consecutive_skips,
        },
        "provenance": {k: provenance[k] for k in ("kind", "source", "checkpoint", "created", "tool_version") if k in provenance}
        | ({"traces": [t.get("path") if isinstance(t, dict) else t for t in provenance["traces"]]} if "traces" in provenance else {}),
        "origin": c.origin,
    }


def _describe(c: "Coefficients") -> list[str]:
    """Human-readable lines: where the numbers come from and what they were made for."""
    prov = c.provenance
    if prov.get("kind") == "published":
        source = f"published: {prov.get('source')}" + (f" ({prov['checkpoint']})" if prov.get("checkpoint") else "")
    else:
        traces = ", ".join(
            f"{t.get('path')} (sha256 {str(t.get('sha256'))[:12]})" if isinstance(t, dict) else str(t)
            for t in prov.get("traces", [])
        )
        source = f"calibrated by teacache-calibrate {prov.get('tool_version', '')} on {prov.get('created', '?')} from {traces}"
    recipe = c.recipe or {}
    recipe_text = ", ".join(f"{k} {recipe.get(k)}" for k in ("num_inference_steps", "height", "width", "num_frames", "guidance")
                            if recipe.get(k) is not None) or "unknown"
    lines = [
        f"model {c.model} ({c.transformer_class}), from {c.origin}",
        f"provenance: {source}",
        f"x: rel-L1 change of the {c.signal.replace('_', ' ')} between consecutive steps of one CFG branch",
        f"x_range: {list(c.x_range) if c.x_range is not None else 'not stated by the source'}",
        f"recipe: {recipe_text}",
    ]
    if c.fit:
        lines.append(
            f"fit: degree {c.fit.get('degree')}, {c.fit.get('method')}, R^2 {c.fit.get('r2')} on training prompts, "
            f"{c.fit.get('r2_heldout')} on held-out prompts"
        )
    if c.thresholds:
        rows = [r for r in c.thresholds if r.rel_l1_thresh == c.defaults.rel_l1_thresh]
        if rows:
            lines.append(
                f"threshold {_num(c.defaults.rel_l1_thresh)}: replayed computed fraction {rows[0].computed_fraction} "
                f"(about {1 / rows[0].computed_fraction:.2f}x fewer block-stack calls) on the calibration traces"
            )
    return lines


def port_warnings(c: "Coefficients", fmt: str, rel_l1_thresh: float) -> list[str]:
    """What ``fmt``'s port cannot express of ``c`` and its decision settings, one sentence each."""
    if fmt == "diffusers":
        return []
    port = PORT_NAMES[fmt].split(" (")[0]
    out = []
    coefficients = c.coefficients
    if c.x_range is not None:
        lo, hi = c.x_range
        out.append(
            f"{port} evaluates the polynomial as is for any x, while this runtime clamps x to the fitted x_range "
            f"[{lo:.4g}, {hi:.4g}]: outside it the port extrapolates (p(0) = {polyval(coefficients, 0.0):.4g}, "
            f"p({2 * hi:.4g}) = {polyval(coefficients, 2 * hi):.4g} against p at the boundaries "
            f"{polyval(coefficients, lo):.4g} and {polyval(coefficients, hi):.4g})."
        )
        bad = negative_or_decreasing(coefficients, 0.0, hi)["negative"]
    else:
        bad = [[0.0, 0.0]] if polyval(coefficients, 0.0) < 0 else []
    if bad:
        where = ", ".join(f"[{a:.4g}, {b:.4g}]" for a, b in bad)
        handling = {
            "teacache": "adds p raw, so the accumulator runs backwards there",
            "comfyui": "adds p raw, so the accumulator runs backwards there",
            "vllm_omni": "adds abs(p), so a negative p counts as a positive change there",
            "sglang": "has no field for this runtime's floor of p at 0",
        }[fmt]
        out.append(f"the polynomial is negative on x in {where}; this runtime counts that as 0, {port} {handling}.")
    warmup, final = c.defaults.warmup_steps, c.defaults.final_steps
    steps = (c.recipe or {}).get("num_inference_steps")
    if fmt == "teacache" and (warmup > 1 or final != 1):
        out.append(
            f"upstream scripts compute exactly the first and the last step; warmup_steps={warmup} and "
            f"final_steps={final} cannot be expressed (edit the script's `cnt == 0 or cnt == num_steps - 1` test)."
        )
    if fmt == "comfyui" and (warmup > 1 or final > 0):
        if steps:
            out.append(
                f"warmup_steps={warmup} and final_steps={final} are written as start_percent/end_percent for "
                f"{steps} steps only (the node's widget steps by 0.01; other step counts shift the window)."
            )
        else:
            out.append(
                f"warmup_steps={warmup} and final_steps={final} cannot be written as start_percent/end_percent "
                "because the file states no step count; start 0 and end 1 were written."
            )
    if fmt == "vllm_omni" and (warmup > 1 or final > 0):
        out.append(
            f"vllm-omni computes only the first step of each branch; warmup_steps={warmup} and final_steps={final} "
            "cannot be expressed."
        )
    if fmt == "sglang" and (warmup > 1 or final > 0):
        out.append(
            f"the sglang JSON has no field for forced warm-up or final steps (this file: warmup_steps={warmup}, "
            f"final_steps={final}); sglang applies its own schedule."
        )
    if c.defaults.max_consecutive_skips is not None:
        out.append(f"{port} has no cap on consecutive skips; max_consecutive_skips={c.defaults.max_consecutive_skips} is lost.")
    if c.signal == "timestep_embedding":
        out.append(
            f"x is the rel-L1 change of the timestep embedding; use these numbers only where {port} measures that "
            "signal (upstream's Wan2.1/HiDream/CogVideoX scripts do), not the first block's modulated input."
        )
    if fmt == "sglang":
        out.append(
            f"the sglang JSON has no room for comments, so it does not say where its numbers come from: "
            f"{_describe(c)[0]}; {_describe(c)[1]}."
        )
    return out


def _comment_block(lines: list[str]) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def _snippet_header(c: "Coefficients", fmt: str, warnings: list[str], extra: list[str]) -> str:
    lines = [f"TeaCache coefficients for {PORT_NAMES[fmt]}, exported by teacache-calibrate (python -m calibrate.export).", *extra, ""]
    lines += _describe(c)
    if warnings:
        lines += ["", "What the port cannot express of this file:"] + [f"- {w}" for w in warnings]
    return _comment_block(lines) + META_MARKER + json.dumps(_metadata(c), sort_keys=True) + "\n"


def comfyui_model_type(c: "Coefficients", name: str | None) -> tuple[str, list[str]]:
    """The ``model_type`` key: ``name`` as given, else the family prefix the node dispatches on + our model name."""
    family = next((f for f, cls in COMFYUI_FAMILIES.items() if cls == c.transformer_class), None)
    warnings = []
    if name:
        key = name
    elif family and family in c.model:
        key = c.model
    elif family:
        key = f"{family}_{c.model}"
    else:
        key = c.model
    if not any(f in key for f in COMFYUI_FAMILIES):
        warnings.append(
            f"ComfyUI-TeaCache's node patches a forward only for model_type names containing one of "
            f"{', '.join(COMFYUI_FAMILIES)}; it has none for {c.transformer_class}, so the entry {key!r} needs a "
            "forward of its own there."
        )
    return key, warnings


def comfyui_window(c: "Coefficients") -> tuple[float, float]:
    """start/end_percent that compute the same warm-up and final steps: the node enables TeaCache on
    step i of n when start <= i / n <= end (its ``current_percent``)."""
    steps = (c.recipe or {}).get("num_inference_steps")
    if not steps:
        return 0.0, 1.0
    steps = int(steps)
    start = max(c.defaults.warmup_steps, 1) / steps if c.defaults.warmup_steps > 1 else 0.0
    end = (steps - c.defaults.final_steps - 1) / steps if c.defaults.final_steps > 0 else 1.0
    return start, end


def export_coefficients(c: "Coefficients", fmt: str, *, rel_l1_thresh: float | None = None, name: str | None = None) -> Exported:
    """The text of ``c`` in ``fmt``; ``rel_l1_thresh`` None takes the file's default threshold. The other ports
    run the upstream rule only: a file whose default is another rule goes to them as the upstream rule sees it
    (its own threshold, ``rules.teacache``); this project's runtime (``diffusers``) gets the file as it is."""
    check_format(fmt)
    default_rule = c.defaults.rule
    upstream_only = fmt != "diffusers" and default_rule != "teacache"
    if upstream_only:
        c = c.for_rule("teacache")
    thresh = c.defaults.rel_l1_thresh if rel_l1_thresh is None else rel_l1_thresh
    if not isinstance(thresh, (int, float)) or isinstance(thresh, bool) or not math.isfinite(thresh) or thresh < 0:
        raise ExportError(f"rel_l1_thresh must be a finite number >= 0, got {thresh!r}.")
    thresh = float(thresh)
    degree = len(c.coefficients) - 1
    warnings = port_warnings(c, fmt, thresh)
    if upstream_only:
        warnings.append(
            f"this file's default rule is {default_rule}, which {PORT_NAMES[fmt]} does not run: exported is the upstream "
            "accumulate-and-threshold rule, with its own default threshold."
        )

    if fmt == "teacache":
        header = _snippet_header(c, fmt, warnings, [
            "Paste into the model's TeaCache script: `rescale_func = np.poly1d(coefficients)`, and set the",
            "transformer's rel_l1_thresh to the value below.",
        ])
        text = header + f"coefficients = {_list(c.coefficients)}\nrel_l1_thresh = {_num(thresh)}\n"

    elif fmt == "comfyui":
        key, extra = comfyui_model_type(c, name)
        warnings = warnings + extra
        start, end = comfyui_window(c)
        header = _snippet_header(c, fmt, warnings, [
            "Add the entry to SUPPORTED_MODELS_COEFFICIENTS in ComfyUI-TeaCache's nodes.py (and its name to the",
            "node's model_type list); set the TeaCache node's inputs as in TEACACHE_NODE_INPUTS.",
        ])
        inputs = {"model_type": key, "rel_l1_thresh": thresh, "start_percent": start, "end_percent": end}
        text = header + (
            "SUPPORTED_MODELS_COEFFICIENTS = {\n"
            f"    {json.dumps(key)}: {_list(c.coefficients)},\n"
            "}\n"
            "TEACACHE_NODE_INPUTS = {"
            + ", ".join(f"{json.dumps(k)}: {json.dumps(v) if isinstance(v, str) else _num(v)}" for k, v in inputs.items())
            + "}\n"
        )

    elif fmt == "vllm_omni":
        if degree != VLLM_OMNI_DEGREE:
            raise ExportError(
                f"vllm-omni's TeaCacheConfig requires exactly 5 coefficients (degree 4), but {c.origin} holds a degree-"
                f"{degree} polynomial ({len(c.coefficients)} coefficients); refit at degree 4 with `python -m "
                "calibrate.fit degree=4 traces=<your traces>` and export that file."
            )
        if thresh <= 0:
            raise ExportError(
                f"vllm-omni's TeaCacheConfig requires rel_l1_thresh > 0 (it raises on {thresh}); pass rel_l1_thresh= "
                "a positive threshold, or disable the cache backend there instead."
            )
        header = _snippet_header(c, fmt, warnings, [
            "Add the entry to _MODEL_COEFFICIENTS in vllm_omni/diffusion/cache/teacache/config.py, or pass",
            "cache_backend=\"tea_cache\", cache_config=cache_config to Omni(...); TeaCacheConfig takes",
            "transformer_type from pipeline.transformer's class.",
        ])
        text = header + (
            "_MODEL_COEFFICIENTS = {\n"
            f"    {json.dumps(c.transformer_class)}: {_list(c.coefficients)},\n"
            "}\n"
            f"cache_config = {{\"rel_l1_thresh\": {_num(thresh)}, \"coefficients\": {_list(c.coefficients)}}}\n"
        )

    elif fmt == "sglang":
        text = json.dumps({"coefficients": [float(v) for v in c.coefficients], "teacache_thresh": thresh}, indent=2) + "\n"

    else:  # diffusers
        document = c.to_dict()
        config = {
            "//": (
                "TeaCache for a diffusers pipeline with teacache-calibrate's runtime: cfg = json.load(f)['teacache']; "
                "TeaCache.from_coefficients(coefficients_from_dict(cfg.pop('coefficients')), **cfg).apply(pipe)"
            ),
            "teacache": {
                "rel_l1_thresh": thresh,
                # the searched schedules are the whole plan: the runtime refuses these settings with them
                **({} if default_rule == "searched_schedule" else {
                    "warmup_steps": c.defaults.warmup_steps,
                    "final_steps": c.defaults.final_steps,
                    "max_consecutive_skips": c.defaults.max_consecutive_skips,
                }),
                "coefficients": document,
            },
        }
        text = json.dumps(config, indent=1, allow_nan=False) + "\n"
    return Exported(fmt, text, thresh, warnings)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def run_export(cfg) -> Exported:
    """The CLI's work: check the arguments (before the runtime, which imports torch), export, write or print."""
    if cfg.coefficients in (None, ""):
        raise ExportError("coefficients= is required: a name in coefficients/ (e.g. coefficients=qwen_image) or a path to a .json file.")
    if cfg.format in (None, ""):
        raise ExportError(f"format= is required: one of {', '.join(FORMATS)}.")
    fmt = check_format(str(cfg.format))
    source = str(cfg.coefficients)
    if (source.endswith(".json") or "/" in source) and not Path(source).is_file():
        raise ExportError(f"coefficients file {source} does not exist; check the path.")
    out = Path(str(cfg.out)) if cfg.get("out") else None
    if out is not None and out.is_dir():
        raise ExportError(f"out={out} is a folder; pass a file name, e.g. out={out / ('x' + SUFFIXES[fmt])}.")

    from runtime.coefficients import load_coefficients

    c = load_coefficients(source)
    exported = export_coefficients(c, fmt, rel_l1_thresh=cfg.get("rel_l1_thresh"), name=cfg.get("name"))
    for warning in exported.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if out is None:
        sys.stdout.write(exported.text)
    else:
        write_text_atomic(out, exported.text)
        print(f"wrote {out} ({PORT_NAMES[fmt]}; {c.model}, rel_l1_thresh {_num(exported.rel_l1_thresh)})")
    return exported


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="export")
def main(cfg) -> None:
    with one_line_errors():
        run_export(cfg)


if __name__ == "__main__":
    main()
