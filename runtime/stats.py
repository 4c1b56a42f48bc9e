"""What the runtime decided, per CFG branch: counts over all calls, and the last generation's trace."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepRecord:
    """One transformer call of one branch: the signal change, the prediction and the decision."""

    step: int
    x: float  # relative L1 change of the signal (NaN at step 0, after a shape change, and at a call a schedule
    # rule skipped whole under an output forecast: the signal was not read)
    p: float  # max(poly(clamp(x)), 0)
    accumulator: float  # the sum compared to the threshold
    computed: bool
    reason: str  # see runtime.decision: first, warmup, final, max_skips, shape_change, threshold, nonfinite, skipped


@dataclass
class BranchStats:
    """Counts since ``apply`` (or ``reset_stats``), and the trace of the branch's latest generation."""

    computed: int = 0
    skipped: int = 0
    trace: list[StepRecord] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return self.computed + self.skipped

    @property
    def computed_fraction(self) -> float:
        return self.computed / self.calls if self.calls else float("nan")


class CacheStats:
    """Host-side bookkeeping the head hook writes into after its one device-to-host read per call."""

    def __init__(self) -> None:
        self.branches: dict[str, BranchStats] = {}

    def record(self, branch: str, record: StepRecord) -> None:
        stats = self.branches.setdefault(branch, BranchStats())
        if record.step == 0:
            stats.trace = []  # keep one generation per branch, so a long-lived server does not grow
        stats.trace.append(record)
        if record.computed:
            stats.computed += 1
        else:
            stats.skipped += 1

    def clear(self) -> None:
        self.branches.clear()
