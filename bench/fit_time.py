"""Time of `calibrate.fit` on 10^6 points (target: under 10 s on the project's 2-core CPU).

    python bench/fit_time.py [--traces traces/<model>.h5] [--points 1000000]

The points are recorded trajectories repeated until there are enough (whole trajectories, values
untouched, each copy renamed); with no --traces, 16 prompts of tiny_qwen_image are recorded first.
The timed part is the whole fit: both signals, robust and plain methods, per-branch fits, held-out
scores and the threshold table (no plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibrate.fit import FitSettings, fit_traces  # noqa: E402
from calibrate.traces import load_traces  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path)
    parser.add_argument("--points", type=int, default=1_000_000)
    args = parser.parse_args()

    if args.traces is None:
        from hydra import compose, initialize_config_dir

        from calibrate.record import record

        args.traces = Path(tempfile.mkdtemp()) / "bench.h5"
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
            cfg = compose("record", ["model=tiny_qwen_image", "limit=16", f"out={args.traces}", "device=cpu"])
        record(cfg)

    traces = load_traces(args.traces)
    base = traces.trajectories
    per_trajectory = sum(len(t.data["x"]) - 1 for t in base) / len(base)
    copies = max(1, round(args.points / (per_trajectory * len(base))))
    traces.trajectories = [
        dataclasses.replace(t, key=f"{t.key}{i:05d}") for i in range(copies) for t in base
    ]
    points = sum(len(t.data["x"]) - 1 for t in traces.trajectories)

    start = time.perf_counter()
    coefficients, _ = fit_traces(traces, FitSettings())
    elapsed = time.perf_counter() - start
    print(f"traces           {args.traces} ({len(base)} trajectories, x{copies})")
    print(f"points           {points}")
    print(f"fit time         {elapsed:.2f} s")
    print(f"r2 / held-out    {coefficients.fit['r2']} / {coefficients.fit['r2_heldout']}")


if __name__ == "__main__":
    main()
