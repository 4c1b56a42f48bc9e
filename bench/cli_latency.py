"""How long the command lines take to say something: an argument or file error, and ``--help``.

Each command is a fresh ``python`` process, timed from start to exit, interleaved with the baselines
``python -c pass`` (interpreter start) and ``python -c "import torch"`` and repeated; the table gives
medians and the ratio to ``import torch`` on the same machine in the same run. Target: the missing-file
error of ``calibrate.fit`` under 2 s on the project's 2-core CPU.

    python bench/cli_latency.py [--repeats 5] [--tree /path/to/another/checkout]

``--tree`` puts another source tree first on ``PYTHONPATH`` (e.g. an older commit from ``git archive``),
to compare before and after in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands(tmp: Path) -> dict[str, list[str]]:
    run_dir = f"hydra.run.dir={tmp}/hydra"
    return {
        "python -c pass": ["-c", "pass"],
        "python -c 'import torch'": ["-c", "import torch"],
        "calibrate.fit traces=<missing>": ["-m", "calibrate.fit", f"traces={tmp}/missing.h5", run_dir],
        "calibrate.sweep coefficients=<missing>": ["-m", "calibrate.sweep", f"coefficients={tmp}/missing.json", run_dir],
        "calibrate.record seeds=[]": ["-m", "calibrate.record", "seeds=[]", run_dir],
        "calibrate.record --help": ["-m", "calibrate.record", "--help"],
        "calibrate.fit --help": ["-m", "calibrate.fit", "--help"],
        "calibrate.sweep --help": ["-m", "calibrate.sweep", "--help"],
    }


def time_once(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tree", type=Path, default=None, help="source tree to put first on PYTHONPATH")
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    if args.tree is not None:
        env["PYTHONPATH"] = str(args.tree.resolve())
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        table = commands(tmp)
        times: dict[str, list[float]] = {name: [] for name in table}
        codes: dict[str, int] = {}
        for _ in range(args.repeats):  # interleaved: a slow moment of the machine hits every row alike
            for name, argv in table.items():
                seconds, codes[name] = time_once(argv, tmp, env)
                times[name].append(seconds)

    torch_time = statistics.median(times["python -c 'import torch'"])
    where = f"tree {args.tree}" if args.tree else "as installed (an editable install: this checkout)"
    print(f"{where}; medians of {args.repeats} interleaved runs, {os.cpu_count()} CPUs, OMP_NUM_THREADS=1")
    print(f"{'command':<42} {'exit':>4} {'seconds':>8} {'/ import torch':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<42} {codes[name]:>4} {median:>8.3f} {median / torch_time:>15.2f}")


if __name__ == "__main__":
    main()
