"""The decision rule, checked against a plain-Python reading of its documented behaviour."""

import math

import pytest
import torch

from runtime import ConfigError, DecisionRule, replay


def naive(rule: DecisionRule, xs: list[float]) -> list[bool]:
    """The rule as the docs state it, one trajectory, floats only; True = computed."""
    computed, acc, run = [], 0.0, 0
    n = len(xs)
    for step, x in enumerate(xs):
        forced = step == 0 or step < rule.warmup_steps or step >= n - rule.final_steps
        forced |= rule.max_consecutive_skips is not None and run >= rule.max_consecutive_skips
        if rule.rule == "searched_schedule":  # the schedule is the whole plan: only step 0 is forced
            forced = step == 0
        xc = x if rule.x_range is None or math.isnan(x) else min(max(x, rule.x_range[0]), rule.x_range[1])
        p = 0.0
        for c in rule.coefficients:
            p = p * xc + c
        p = max(p, 0.0) if not math.isnan(p) else p
        if rule.rule == "teacache_dsigma" and step < len(rule.step_weights):
            p *= rule.step_weights[step]  # the prediction scaled by the step's share of the sigma travel
        candidate = acc + p
        if rule.rule in ("fixed_schedule", "searched_schedule"):
            skip = not forced and step not in rule.schedule  # x does not matter
        else:
            skip = not forced and math.isfinite(x) and math.isfinite(candidate) and candidate < rule.rel_l1_thresh
        acc = candidate if skip else 0.0
        run = run + 1 if skip else 0
        computed.append(not skip)
    return computed


RULES = [
    DecisionRule(coefficients=(1.0, 0.0), x_range=None, rel_l1_thresh=0.3),
    DecisionRule(coefficients=(-450.0, 280.0, -45.0, 3.2, -0.02), x_range=None, rel_l1_thresh=0.4),
    DecisionRule(coefficients=(50.0, -5.0, 0.1), x_range=(0.02, 0.2), rel_l1_thresh=0.5, warmup_steps=3),
    DecisionRule(coefficients=(2.0, 0.0), x_range=(0.0, 1.0), rel_l1_thresh=1.0, final_steps=2, max_consecutive_skips=2),
    # teacache_dsigma: large early sigma steps count more, small late ones less (weights for 16 of 20 steps)
    DecisionRule(coefficients=(1.0, 0.0), x_range=None, rel_l1_thresh=0.3, rule="teacache_dsigma",
                 step_weights=tuple(2.0 - 0.1 * i for i in range(16))),
    # fixed_schedule: compute steps 0, 4, 8, ... and the forced ones, whatever x says
    DecisionRule(coefficients=(1.0, 0.0), x_range=None, rel_l1_thresh=0.3, rule="fixed_schedule",
                 schedule=frozenset(range(0, 20, 4)), max_consecutive_skips=5),
    # searched_schedule: an early-dense schedule, as the search finds on the video model; it may skip the
    # last steps, and the warm-up and the cap do not apply
    DecisionRule(coefficients=(1.0, 0.0), x_range=None, rel_l1_thresh=0.5, rule="searched_schedule",
                 schedule=frozenset({0, 1, 2, 3, 5, 8, 12}), warmup_steps=3, max_consecutive_skips=2),
]


def naive_drift(rule: DecisionRule, lagged: list[list[float]]) -> list[bool]:
    """teacache_drift as documented, floats only: no sum; x is the change since the last computed step
    (``lagged[step][lag - 1]``), unknown past the recorded lags (so computed); True = computed."""
    computed, last = [], None
    n = len(lagged)
    for step, row in enumerate(lagged):
        run = 0 if last is None else step - last - 1
        forced = step == 0 or step < rule.warmup_steps or step >= n - rule.final_steps
        forced |= rule.max_consecutive_skips is not None and run >= rule.max_consecutive_skips
        x = row[step - last - 1] if last is not None and step - last - 1 < len(row) else float("nan")
        xc = x if rule.x_range is None or math.isnan(x) else min(max(x, rule.x_range[0]), rule.x_range[1])
        p = 0.0
        for c in rule.coefficients:
            p = p * xc + c
        p = max(p, 0.0) if not math.isnan(p) else p
        skip = not forced and math.isfinite(x) and math.isfinite(p) and p < rule.rel_l1_thresh
        if not skip:
            last = step
        computed.append(not skip)
    return computed


@pytest.mark.parametrize("cap", [None, 2])
def test_drift_replay_matches_documented_rule(cap):
    """Lagged changes that grow with the lag (a drifting signal), some of them non-finite; 4 lags."""
    gen = torch.Generator().manual_seed(1)
    per_step = torch.rand(64, 20, 1, generator=gen) * 0.1
    x = per_step * torch.arange(1, 5).view(1, 1, 4) * (0.8 + 0.4 * torch.rand(64, 20, 4, generator=gen))
    for step in range(4):
        x[:, step, step:] = float("nan")  # no call that far back
    x[3, 7, 1] = float("nan")
    x[5, 9, 0] = float("inf")
    rule = DecisionRule(coefficients=(2.0, 0.0), x_range=(0.0, 0.5), rel_l1_thresh=0.25, rule="teacache_drift",
                        max_consecutive_skips=cap)
    computed = replay(rule, x)
    for i in range(x.shape[0]):
        assert computed[i].tolist() == naive_drift(rule, x[i].tolist()), f"trajectory {i}"
    runs = [len(r) for row in computed.tolist() for r in "".join("c" if c else "s" for c in row).split("c") if r]
    assert max(runs) >= 2 and (cap is None or max(runs) <= cap)
    assert max(runs) <= 4, "never past the recorded lags"
    with pytest.raises(ValueError, match=r"\[trajectories, steps, lags\]"):
        replay(rule, x[:, :, 0])


@pytest.mark.parametrize("rule", RULES)
def test_replay_matches_documented_rule(rule):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 20, generator=gen) * 0.3
    x[:, 0] = float("nan")
    x[3, 7] = float("nan")
    x[5, 9] = float("inf")
    computed = replay(rule, x)
    for i in range(x.shape[0]):
        assert computed[i].tolist() == naive(rule, x[i].tolist()), f"trajectory {i}"
    assert (~computed).any(), "the case should exercise skipping"


def test_threshold_zero_never_skips():
    rule = DecisionRule(coefficients=(1.0, 0.0), x_range=None, rel_l1_thresh=0.0)
    x = torch.zeros(4, 10)
    assert replay(rule, x).all()


def test_negative_polynomial_never_lowers_the_accumulator():
    rule = DecisionRule(coefficients=(-10.0, 0.0), x_range=None, rel_l1_thresh=0.05)
    x = torch.tensor([0.01, 0.02, 0.5])
    p, candidate, skip, acc = rule.accumulate(x, torch.full((3,), 0.04), forced=False)
    assert (p == 0).all()
    assert torch.equal(candidate, torch.full((3,), 0.04))
    # Upstream adds p raw: 0.04 - 5 would let a later large change slip under the threshold.


def test_x_outside_range_is_evaluated_at_the_boundary():
    rule = DecisionRule(coefficients=(1.0, 0.0, 0.0), x_range=(0.1, 0.2), rel_l1_thresh=1.0)
    values = rule.predict(torch.tensor([0.0, 0.1, 0.15, 0.2, 10.0]))
    assert values.tolist() == pytest.approx([0.01, 0.01, 0.0225, 0.04, 0.04])


def test_nonfinite_x_forces_a_compute_and_resets():
    rule = DecisionRule(coefficients=(0.0,), x_range=(0.0, 1.0), rel_l1_thresh=1.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        _, _, skip, acc = rule.accumulate(torch.tensor(bad), torch.tensor(0.5), forced=False)
        assert not skip and acc == 0


def test_cap_on_consecutive_skips():
    rule = DecisionRule(coefficients=(0.0,), x_range=None, rel_l1_thresh=1.0, final_steps=0, max_consecutive_skips=2)
    computed = replay(rule, torch.zeros(1, 9))[0].tolist()
    assert computed == [True, False, False, True, False, False, True, False, False]


def test_warmup_and_final_steps():
    rule = DecisionRule(coefficients=(0.0,), x_range=None, rel_l1_thresh=1.0, warmup_steps=3, final_steps=2)
    assert replay(rule, torch.zeros(1, 8))[0].tolist() == [True, True, True, False, False, False, True, True]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rel_l1_thresh": -1.0}, "rel_l1_thresh"),
        ({"rel_l1_thresh": float("nan")}, "rel_l1_thresh"),
        ({"rel_l1_thresh": 0.1, "warmup_steps": -2}, "warmup_steps"),
        ({"rel_l1_thresh": 0.1, "max_consecutive_skips": 0}, "max_consecutive_skips"),
    ],
)
def test_rule_rejects_nonsense(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DecisionRule(coefficients=(1.0,), x_range=None, **kwargs)


def test_rule_variants_need_their_data_and_old_files_mean_the_upstream_rule(tmp_path):
    import json

    from runtime import load_coefficients

    with pytest.raises(ConfigError, match="teacache_dsigma rule needs step_weights"):
        DecisionRule(coefficients=(1.0,), x_range=None, rel_l1_thresh=0.1, rule="teacache_dsigma")
    with pytest.raises(ConfigError, match="fixed_schedule rule needs a schedule"):
        DecisionRule(coefficients=(1.0,), x_range=None, rel_l1_thresh=0.1, rule="fixed_schedule")
    with pytest.raises(ConfigError, match="rule must be one of teacache, teacache_dsigma"):
        DecisionRule(coefficients=(1.0,), x_range=None, rel_l1_thresh=0.1, rule="magic")
    old = load_coefficients("qwen_image")  # written before rules existed: no "rule" anywhere
    assert "rule" not in json.loads(open(old.origin).read())["defaults"]
    assert old.defaults.rule == "teacache" and DecisionRule.of(old, old.defaults).rule == "teacache"
    document = {**old.to_dict(), "defaults": {**old.defaults.to_dict(), "rule": "teacache_dsigma"}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(document))
    from runtime import CoefficientsError

    with pytest.raises(CoefficientsError, match="step_weights.*is missing for rule teacache_dsigma"):
        load_coefficients(path)
