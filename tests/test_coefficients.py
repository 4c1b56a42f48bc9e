"""The coefficients file: shipped files, the validator's errors, and the writer's round trip."""

import json

import pytest

from runtime import (
    SCHEMA,
    Coefficients,
    CoefficientsError,
    ConfigError,
    DecisionDefaults,
    TeaCache,
    ThresholdRow,
    available_names,
    coefficients_from_dict,
    load_coefficients,
    save_coefficients,
    supported_classes,
)

PUBLISHED_SUPPORTED = {
    "flux",
    "flux_kontext",
    "wan2_1_t2v_1_3b",
    "wan2_1_t2v_14b",
    "wan2_1_i2v_480p",
    "wan2_1_i2v_720p",
    "qwen_image",
    "qwen_image_mlx",
}


def valid_document(**changes):
    doc = {
        "schema": SCHEMA,
        "model": "toy",
        "transformer_class": "QwenImageTransformer2DModel",
        "signal": "modulated_input",
        "coefficients": [2.0, 0.5, 0.0],
        "x_range": [0.01, 0.3],
        "recipe": {"num_inference_steps": 8, "height": 32, "width": 32, "num_frames": None, "guidance": 4.0},
        "defaults": {"rel_l1_thresh": 0.2, "warmup_steps": 1, "final_steps": 1, "max_consecutive_skips": None},
        "thresholds": [
            {"rel_l1_thresh": 0.1, "computed_fraction": 0.8, "computed_fraction_std": 0.05},
            {"rel_l1_thresh": 0.3, "computed_fraction": 0.5, "computed_fraction_std": 0.05},
        ],
        "provenance": {"kind": "calibrated", "traces": ["t.h5"], "tool_version": "0"},
    }
    doc.update(changes)
    return doc


def searched_entry(**changes):
    """A valid rules.searched_schedule entry for 8 steps: 5 and 4 steps computed."""
    entry = {
        "rel_l1_thresh": 0.5,
        "thresholds": [{"rel_l1_thresh": 0.375, "computed_fraction": 0.625}, {"rel_l1_thresh": 0.5, "computed_fraction": 0.5}],
        "schedules": [[0, 1, 2, 4, 7], [0, 1, 3, 7]],
        "num_steps": 8,
    }
    entry.update(changes)
    return entry


def write(tmp_path, doc, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_every_supported_published_model_ships_as_published():
    assert PUBLISHED_SUPPORTED <= set(available_names())
    for name in available_names():
        c = load_coefficients(name)
        assert c.model == name
        assert c.transformer_class in supported_classes()
        if name in PUBLISHED_SUPPORTED:
            assert c.provenance["kind"] == "published"
            assert c.provenance["source"]
            assert len(c.coefficients) == 5


def test_published_numbers_are_untouched():
    shared = json.loads(open("../shared/published_coefficients.json").read()) if __import__("os").path.exists(
        "../shared/published_coefficients.json"
    ) else None
    if shared is None:
        pytest.skip("../shared/published_coefficients.json is not beside this checkout")
    by_name = {m["name"]: m for m in shared["models"]}
    for name in PUBLISHED_SUPPORTED:
        assert list(load_coefficients(name).coefficients) == by_name[name]["coefficients"]


def test_round_trip(tmp_path):
    c = coefficients_from_dict(valid_document(), origin="doc")
    path = save_coefficients(c, tmp_path / "sub" / "rt.json")
    again = load_coefficients(path)
    assert again.to_dict() == c.to_dict()
    assert again.thresholds == (ThresholdRow(0.1, 0.8, 0.05), ThresholdRow(0.3, 0.5, 0.05))


def test_evaluate_clamps_to_x_range():
    c = coefficients_from_dict(valid_document())
    assert c.evaluate(0.2) == pytest.approx(2 * 0.04 + 0.1)
    assert c.evaluate(5.0) == c.evaluate(0.3)
    assert c.evaluate(0.0) == c.evaluate(0.01)


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path, '{"schema": "teacache-coefficients/1",\n "model": }')
    with pytest.raises(CoefficientsError, match=r"c\.json is not valid JSON \(line 2"):
        load_coefficients(path)


def test_unknown_schema_version(tmp_path):
    path = write(tmp_path, valid_document(schema="teacache-coefficients/9"))
    with pytest.raises(CoefficientsError, match=r"field 'schema' is 'teacache-coefficients/9'.*reads 'teacache-coefficients/1'"):
        load_coefficients(path)


def test_missing_schema(tmp_path):
    doc = valid_document()
    del doc["schema"]
    with pytest.raises(CoefficientsError, match="field 'schema' is missing"):
        load_coefficients(write(tmp_path, doc))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"coefficients": []}, "coefficients"),
        ({"coefficients": [1.0, "a"]}, "coefficients"),
        ({"signal": "latent"}, "signal"),
        ({"x_range": [0.3, 0.1]}, "x_range"),
        ({"x_range": None}, "x_range"),
        ({"defaults": {"rel_l1_thresh": -0.1}}, "rel_l1_thresh"),
        ({"defaults": {"rel_l1_thresh": 0.1, "warmup": 2}}, "defaults.warmup"),
        ({"defaults": {"rel_l1_thresh": 0.1, "max_consecutive_skips": 0}}, "max_consecutive_skips"),
        ({"thresholds": [{"rel_l1_thresh": 0.3, "computed_fraction": 0.5}, {"rel_l1_thresh": 0.1, "computed_fraction": 0.8}]}, r"thresholds\[1\]"),
        ({"provenance": {"kind": "guessed"}}, "provenance"),
        ({"recipe": {"num_inference_steps": -3}}, "recipe.num_inference_steps"),
        ({"extra": 1}, "extra"),
        # teacache_drift: its own polynomial, whole and sound, and a positive max_lag
        ({"rules": {"teacache_drift": {"rel_l1_thresh": 0.1, "coefficients": [1.0, 0.0]}}}, "rules.teacache_drift"),
        ({"rules": {"teacache_drift": {"rel_l1_thresh": 0.1, "coefficients": [1.0, "a"], "x_range": [0.0, 1.0]}}},
         r"rules.teacache_drift.coefficients"),
        ({"rules": {"teacache_drift": {"rel_l1_thresh": 0.1, "coefficients": [1.0], "x_range": [0.0, 1.0], "max_lag": 0}}},
         r"rules.teacache_drift.max_lag"),
        ({"rules": {"teacache_joint": {"rel_l1_thresh": 0.1, "coefficients": [1.0]}}}, "rules.teacache_joint"),
        ({"defaults": {"rel_l1_thresh": 0.1, "rule": "teacache_drift"}}, "rules.teacache_drift"),
        ({"rules": {"teacache": {"rel_l1_thresh": 0.1, "thresholds": []}}}, "rules.teacache"),
        # searched_schedule: a step count and one schedule per row, in range, with step 0, of the row's size
        ({"defaults": {"rel_l1_thresh": 0.1, "rule": "searched_schedule"}}, "rules.searched_schedule"),
        ({"rules": {"searched_schedule": searched_entry(num_steps=0)}}, r"rules.searched_schedule.num_steps"),
        ({"rules": {"searched_schedule": searched_entry(forecasts=["linear"])}}, r"rules.searched_schedule.forecasts"),
        ({"rules": {"searched_schedule": searched_entry(forecasts=["linear", "cubic"])}}, r"rules.searched_schedule.forecasts"),
        ({"defaults": {"rel_l1_thresh": 0.1, "forecast": "quadratic"}}, r"forecast must be one of reuse, linear"),
        ({"rules": {"searched_schedule": searched_entry(thresholds=[], schedules=[])}}, r"rules.searched_schedule.thresholds"),
        ({"rules": {"searched_schedule": searched_entry(schedules=[[0, 1, 2, 3, 7]])}}, r"rules.searched_schedule.schedules"),
        ({"rules": {"searched_schedule": searched_entry(schedules=[[0, 1, 2, 3, 9], [0, 3, 7, 4]])}},
         r"rules.searched_schedule.schedules\[0\]"),
        ({"rules": {"searched_schedule": searched_entry(schedules=[[1, 2, 3, 4, 7], [0, 3, 7, 4]])}},
         r"rules.searched_schedule.schedules\[0\]"),
        ({"rules": {"searched_schedule": searched_entry(schedules=[[0, 1, 2, 7], [0, 3, 7, 4]])}},
         r"computes 4 of 8 steps, but its row says 0.625"),
    ],
)
def test_each_bad_field_is_named(tmp_path, changes, field):
    path = write(tmp_path, valid_document(**changes))
    with pytest.raises(CoefficientsError, match=field) as info:
        load_coefficients(path)
    assert str(path) in str(info.value)


def test_unknown_name_lists_available():
    with pytest.raises(CoefficientsError, match=r"no coefficients named 'nope'.*available: .*qwen_image"):
        load_coefficients("nope")


def test_missing_path():
    with pytest.raises(CoefficientsError, match="does not exist"):
        load_coefficients("/no/such/file.json")


def test_negative_threshold_override_is_refused():
    with pytest.raises(ConfigError, match=r"rel_l1_thresh must be a finite number >= 0, got -0\.1"):
        TeaCache.from_coefficients("qwen_image", rel_l1_thresh=-0.1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"final_steps": 1.5}, "final_steps"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
        ({"warmpu_steps": 2}, "unknown TeaCache setting 'warmpu_steps'"),
    ],
)
def test_nonsense_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        TeaCache.from_coefficients("qwen_image", **overrides)


def test_speedup_picks_threshold_from_table(tmp_path):
    path = write(tmp_path, valid_document())
    assert TeaCache.from_coefficients(path, speedup=1.25).rel_l1_thresh == 0.1
    assert TeaCache.from_coefficients(path, speedup=1.8).rel_l1_thresh == 0.3
    with pytest.raises(ConfigError, match="no tabulated threshold reaches speedup 3"):
        TeaCache.from_coefficients(path, speedup=3)
    with pytest.raises(ConfigError, match="has no threshold table"):
        TeaCache.from_coefficients("qwen_image", speedup=1.5)
    with pytest.raises(ConfigError, match="not both"):
        TeaCache.from_coefficients(path, speedup=1.5, rel_l1_thresh=0.1)


def test_object_built_in_code_is_validated():
    with pytest.raises(CoefficientsError, match="x_range"):
        Coefficients(
            model="m",
            transformer_class="FluxTransformer2DModel",
            signal="modulated_input",
            coefficients=(1.0, 0.0),
            x_range=None,
            defaults=DecisionDefaults(rel_l1_thresh=0.1),
            provenance={"kind": "calibrated", "traces": []},
        )


def test_searched_schedule_runs_the_schedule_of_the_skipped_fraction(tmp_path):
    """For searched_schedule the threshold is the fraction skipped: the file's schedule that skips the most
    without skipping more than it; below the first row every step; speedup= picks a row as for the others."""
    path = write(tmp_path, valid_document(rules={"searched_schedule": searched_entry()}))
    c = load_coefficients(path)
    assert c.searched_schedule(0.0) == tuple(range(8))
    assert c.searched_schedule(0.4) == (0, 1, 2, 4, 7)
    assert c.searched_schedule(0.5) == c.searched_schedule(0.9) == (0, 1, 3, 7)
    cache = TeaCache.from_coefficients(path, rule="searched_schedule")
    assert cache.rule.rule == "searched_schedule" and cache.rel_l1_thresh == 0.5
    assert cache.rule.schedule == frozenset({0, 1, 3, 7})
    assert TeaCache.from_coefficients(path, rule="searched_schedule", speedup=1.6).rule.schedule == frozenset({0, 1, 2, 4, 7})
    assert TeaCache.from_coefficients(path, rule="searched_schedule", rel_l1_thresh=0.0).rule.schedule == frozenset(range(8))
    # the default rule of a file may be searched_schedule; without the entry the rule is refused with the fix
    chosen = write(tmp_path, valid_document(defaults={"rel_l1_thresh": 0.375, "rule": "searched_schedule"},
                                            rules={"searched_schedule": searched_entry()}), "chosen.json")
    assert TeaCache.from_coefficients(chosen).rule.schedule == frozenset({0, 1, 3, 7})  # the entry's default
    with pytest.raises(ConfigError, match="final_steps does not apply"):
        TeaCache.from_coefficients(path, rule="searched_schedule", final_steps=2)
    # files before forecasts: every row reuses the residual; with forecasts, each row runs its own
    assert {TeaCache.from_coefficients(path, rule="searched_schedule", rel_l1_thresh=t).rule.forecast for t in (0.0, 0.4, 0.5)} == {"reuse"}
    mixed = write(tmp_path, valid_document(rules={"searched_schedule": searched_entry(forecasts=["reuse", "linear"])}), "mixed.json")
    assert [TeaCache.from_coefficients(mixed, rule="searched_schedule", rel_l1_thresh=t).rule.forecast for t in (0.0, 0.4, 0.5)] == [
        "reuse", "reuse", "linear"]
    with pytest.raises(ConfigError, match="forecast does not apply"):
        TeaCache.from_coefficients(mixed, rule="searched_schedule", forecast="reuse")
    # any other rule takes forecast= as a setting; the file's defaults leave it out when it is reuse
    assert TeaCache.from_coefficients(mixed, forecast="linear").rule.forecast == "linear"
    assert TeaCache.from_coefficients(mixed).rule.forecast == "reuse" and "forecast" not in load_coefficients(mixed).to_dict()["defaults"]
    with pytest.raises(ConfigError, match="forecast must be one of reuse, linear"):
        TeaCache.from_coefficients(mixed, forecast="quadratic")
    with pytest.raises(CoefficientsError, match=r"no searched schedules .*calibrate.fit model=toy search=8"):
        TeaCache.from_coefficients(write(tmp_path, valid_document(), "plain.json"), rule="searched_schedule")


def test_another_default_rule_keeps_the_upstream_rules_threshold(tmp_path):
    """choose_rule writes the winner as the default; rule="teacache" then still runs the upstream rule at its own
    default threshold and table (rules.teacache), not at the winner's."""
    from calibrate.sweep import _write_default_rule

    path = write(tmp_path, valid_document(rules={"searched_schedule": searched_entry()}))
    _write_default_rule(load_coefficients(path), "searched_schedule", str(path))
    c = load_coefficients(path)
    assert c.defaults.rule == "searched_schedule" and c.rules["teacache"] == {"rel_l1_thresh": 0.2}
    assert TeaCache.from_coefficients(path).rule.schedule == frozenset({0, 1, 3, 7})
    upstream = TeaCache.from_coefficients(path, rule="teacache")
    assert upstream.rule.rule == "teacache" and upstream.rel_l1_thresh == 0.2
    assert TeaCache.from_coefficients(path, rule="teacache", speedup=1.8).rel_l1_thresh == 0.3  # the file's own table
    from calibrate.export import export_coefficients  # the ports run the upstream rule: exported at its threshold

    exported = export_coefficients(c, "teacache")
    assert exported.rel_l1_thresh == 0.2 and any("default rule is searched_schedule" in w for w in exported.warnings)
    _write_default_rule(c, "teacache", str(path))
    assert load_coefficients(path).defaults.rule == "teacache" and TeaCache.from_coefficients(path).rel_l1_thresh == 0.2
