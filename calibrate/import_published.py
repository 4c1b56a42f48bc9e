"""Write one coefficients file per published polynomial whose transformer class the runtime supports.

    python -m calibrate.import_published ../shared/published_coefficients.json

Each file keeps the source's numbers untouched, provenance ``published`` with the source. The sources
state no x range, so ``x_range`` is null (the runtime then evaluates the polynomial unclamped; negative
values still count as 0). The default threshold is the smallest one the source reports at 1.5x or
more (else its largest); the first and the last step are computed, as in the upstream ports.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from runtime import ADAPTERS, Coefficients, DecisionDefaults, save_coefficients
from runtime.coefficients import coefficients_dir


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


def import_published(path: Path, out_dir: Path) -> list[Path]:
    written = []
    for entry in json.loads(path.read_text())["models"]:
        if entry["transformer_class"] not in ADAPTERS or not entry["speedups"]:
            continue
        coefficients = Coefficients(
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
        written.append(save_coefficients(coefficients, out_dir / f"{entry['name']}.json"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("published", type=Path, help="published_coefficients.json")
    parser.add_argument("--out", type=Path, default=coefficients_dir())
    args = parser.parse_args()
    for path in import_published(args.published, args.out):
        print(path)


if __name__ == "__main__":
    main()
