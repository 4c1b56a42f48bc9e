"""What the latent-landing tests of ``output_corrected`` share (tests/test_reference_video.py, tests/test_experts.py)."""


def reestimated_targets(raw: list, schedule, steps: int, guidance: float) -> list:
    """Per step, the CFG-combined output the sampler should have been given: each branch's output as the model
    computed it (``raw[2 * step + branch]``, cond then uncond) at the schedule's steps, else on the line between the
    computed outputs either side (held after the last one: nothing re-estimates those)."""
    targets = []
    for step in range(steps):
        branch = []
        for b in (0, 1):
            if step in schedule:
                branch.append(raw[2 * step + b])
            else:
                a = max(s for s in schedule if s < step)
                k = min((s for s in schedule if s > step), default=a)
                v_a, v_k = raw[2 * a + b], raw[2 * k + b]
                branch.append(v_a + (v_k - v_a) * ((step - a) / (k - a) if k > a else 0.0))
        cond, uncond = branch
        targets.append(uncond + guidance * (cond - uncond))
    return targets
