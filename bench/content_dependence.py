"""How much the trajectory depends on the content: per-step spread of x (and y) across prompts x seeds.

    python bench/content_dependence.py [--traces reference=traces/reference.h5 reference_video=traces/reference_video.h5]
                                       [--json bench/results/content_dependence.json]

For each model's trace file (read with h5py) and each CFG branch, the recorded per-step rel-L1 changes form a
[runs, steps] matrix (a run is one prompt x seed). At each step the coefficient of variation across runs is
std / mean; the figure reported is its median over the steps, the first and last excluded. With no --traces, the
two reference models are recorded first with their documented commands (the digits model over its 60 prompts
with seed 0, the video model over its 60 prompts with seeds 0, 1, 2) into a temporary folder, unless the files
traces/reference.h5 and traces/reference_video.h5 already exist.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECORD_OVERRIDES = {"reference": ["seeds=[0]"], "reference_video": ["seeds=[0,1,2]"]}


def per_branch_matrices(path: Path, signal: str) -> dict[str, np.ndarray]:
    """``{branch: [runs, steps]}`` of one recorded change signal, from the trace file's ``runs`` groups."""
    rows: dict[str, list[np.ndarray]] = {}
    with h5py.File(path, "r") as handle:
        for group in handle["runs"].values():
            rows.setdefault(str(group.attrs["branch"]), []).append(np.asarray(group[signal], dtype=np.float64))
    return {branch: np.stack(r) for branch, r in sorted(rows.items())}


def median_cv(matrix: np.ndarray) -> float:
    """Median over steps 1 .. S-2 of std / mean across runs (ddof 0)."""
    inner = matrix[:, 1:-1]
    return float(np.median(inner.std(axis=0) / inner.mean(axis=0)))


def content_dependence(path: Path) -> dict[str, object]:
    out: dict[str, object] = {"traces": str(path)}
    for signal in ("x", "y"):
        mats = per_branch_matrices(path, signal)
        out[signal] = {branch: round(median_cv(m), 4) for branch, m in mats.items()}
        out["runs_per_branch"] = {branch: int(m.shape[0]) for branch, m in mats.items()}
        out["steps"] = int(next(iter(mats.values())).shape[1])
    with h5py.File(path, "r") as handle:
        seeds = {int(g.attrs["seed"]) for g in handle["runs"].values()}
        prompts = {str(g.attrs["prompt"]) for g in handle["runs"].values()}
    out["prompts"], out["seeds"] = len(prompts), sorted(seeds)
    return out


def record_model(model: str, folder: Path) -> Path:
    from hydra import compose, initialize_config_dir

    from calibrate.record import record

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("record", [f"model={model}", f"out={folder / model}.h5", "device=cpu",
                                 *RECORD_OVERRIDES[model]])
    return Path(record(cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", nargs="*", default=None, help="name=path pairs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.traces:
        files = {item.split("=", 1)[0]: Path(item.split("=", 1)[1]) for item in args.traces}
    else:
        folder = Path(tempfile.mkdtemp())
        files = {}
        for model in RECORD_OVERRIDES:
            existing = ROOT / "traces" / f"{model}.h5"
            files[model] = existing if existing.exists() else record_model(model, folder)
    results = {name: content_dependence(path) for name, path in files.items()}
    branches = sorted({b for r in results.values() for b in r["x"]})
    print(f"{'model':<18}{'runs/branch':>12}{'steps':>7}" + "".join(f"{'x ' + b:>12}{'y ' + b:>12}" for b in branches))
    for name, r in results.items():
        runs = max(r["runs_per_branch"].values())
        cells = "".join(f"{r['x'].get(b, float('nan')):>12.4f}{r['y'].get(b, float('nan')):>12.4f}" for b in branches)
        print(f"{name:<18}{runs:>12}{r['steps']:>7}{cells}")
    print("median over steps (first and last excluded) of the coefficient of variation across prompts x seeds")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
