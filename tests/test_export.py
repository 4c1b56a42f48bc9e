"""Export to the ports' formats, read back the way each port reads it, and import every shape back."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibrate.export import FORMATS, SUFFIXES, ExportError, export_coefficients
from calibrate.import_published import ImportFormatError, import_file, import_published
from runtime import DecisionDefaults, TeaCache, coefficients_from_dict, load_coefficients

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SOURCES = ["reference", "flux", "wan2_1_t2v_14b", "qwen_image"]  # calibrated, and published of three classes


def run_module(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def exec_snippet(text):
    """Run an exported Python snippet as the port's source file would hold it (plain literals only)."""
    namespace = {}
    exec(compile(text, "<export>", "exec"), {"__builtins__": {}}, namespace)
    return namespace


# What the ports document (their source, read for this test; see calibrate/export.py):
# ComfyUI-TeaCache's TeaCache node takes model_type, rel_l1_thresh (0..10), start_percent and end_percent (0..1).
COMFYUI_INPUTS = {"model_type", "rel_l1_thresh", "start_percent", "end_percent"}


@dataclasses.dataclass
class VllmOmniTeaCacheConfig:
    """The fields and checks of vllm-omni's TeaCacheConfig (cache/teacache/config.py)."""

    rel_l1_thresh: float = 0.2
    coefficients: list | None = None
    transformer_type: str = "QwenImageTransformer2DModel"

    def __post_init__(self):
        if self.rel_l1_thresh <= 0:
            raise ValueError("rel_l1_thresh must be positive")
        if len(self.coefficients) != 5:
            raise ValueError("coefficients must contain exactly 5 elements")


@dataclasses.dataclass
class SglangTeaCacheParams:
    """The fields of sglang's TeaCacheParams (configs/sample/teacache.py)."""

    cache_type: str = "teacache"
    teacache_thresh: float = 0.0
    coefficients: list = dataclasses.field(default_factory=list)


def load_upstream(name):
    """The file as the ports see it: the upstream rule at its own threshold, whichever rule is the default
    (the reference files' default is searched_schedule; rules.teacache keeps TeaCache's threshold)."""
    c = load_coefficients(name)
    return c.for_rule("teacache") if c.defaults.rule != "teacache" else c


@pytest.mark.parametrize("name", SOURCES)
def test_teacache_snippet_is_a_poly1d_list_and_threshold(name):
    c = load_upstream(name)
    ns = exec_snippet(export_coefficients(c, "teacache").text)
    assert set(ns) == {"coefficients", "rel_l1_thresh"}
    assert ns["rel_l1_thresh"] == c.defaults.rel_l1_thresh
    grid = np.linspace(0.0, 0.5, 101)
    np.testing.assert_array_equal(np.poly1d(ns["coefficients"])(grid), np.polyval(c.coefficients, grid))


@pytest.mark.parametrize("name", SOURCES)
def test_comfyui_entry_and_node_inputs(name):
    c = load_upstream(name)
    ns = exec_snippet(export_coefficients(c, "comfyui").text)
    entries, inputs = ns["SUPPORTED_MODELS_COEFFICIENTS"], ns["TEACACHE_NODE_INPUTS"]
    assert set(inputs) == COMFYUI_INPUTS
    assert list(entries) == [inputs["model_type"]]
    assert entries[inputs["model_type"]] == list(c.coefficients)
    assert 0 <= inputs["rel_l1_thresh"] <= 10 and inputs["rel_l1_thresh"] == c.defaults.rel_l1_thresh
    assert 0 <= inputs["start_percent"] <= inputs["end_percent"] <= 1
    if c.transformer_class == "FluxTransformer2DModel":
        assert "flux" in inputs["model_type"]  # the node picks its FLUX forward by this substring
    if c.transformer_class == "WanTransformer3DModel":
        assert "wan2.1" in inputs["model_type"]
    # The node enables TeaCache on step i of n when start <= i / n <= end: the steps it decides on must
    # be the ones our rule decides on (not step 0, not the warm-up, not the final steps).
    n = c.recipe.get("num_inference_steps")
    if n:
        theirs = {i for i in range(1, n) if inputs["start_percent"] <= i / n <= inputs["end_percent"]}
        ours = {i for i in range(n) if i >= max(1, c.defaults.warmup_steps) and i < n - c.defaults.final_steps}
        assert theirs == ours


@pytest.mark.parametrize("name", SOURCES)
def test_vllm_omni_entry_builds_its_teacache_config(name):
    c = load_upstream(name)
    ns = exec_snippet(export_coefficients(c, "vllm_omni").text)
    assert ns["_MODEL_COEFFICIENTS"] == {c.transformer_class: list(c.coefficients)}
    config = VllmOmniTeaCacheConfig(**ns["cache_config"], transformer_type=c.transformer_class)
    assert config.rel_l1_thresh == c.defaults.rel_l1_thresh and config.coefficients == list(c.coefficients)


@pytest.mark.parametrize("name", SOURCES)
def test_sglang_json_is_exactly_teacache_params(name):
    c = load_upstream(name)
    data = json.loads(export_coefficients(c, "sglang").text)
    params = SglangTeaCacheParams(**data)  # any other key would raise TypeError
    assert params.coefficients == list(c.coefficients) and params.teacache_thresh == c.defaults.rel_l1_thresh


@pytest.mark.parametrize("name", SOURCES)
def test_diffusers_config_builds_our_runtime(name):
    c = load_coefficients(name)
    cfg = json.loads(export_coefficients(c, "diffusers").text)["teacache"]
    cache = TeaCache.from_coefficients(coefficients_from_dict(cfg.pop("coefficients")), **cfg)
    # the whole file, run with its default rule (that rule's own table where the file has one)
    expected = c.for_rule(c.defaults.rule) if c.defaults.rule in c.rules else c
    assert cache.coefficients.to_dict() == expected.to_dict()
    assert cache.rule.rule == c.defaults.rule and cache.rel_l1_thresh == expected.defaults.rel_l1_thresh


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", SOURCES)
def test_round_trip(tmp_path, name, fmt):
    c = load_coefficients(name)
    exported = export_coefficients(c, fmt, rel_l1_thresh=0.123)
    path = tmp_path / f"x{SUFFIXES[fmt]}"
    path.write_text(exported.text)
    extra = {"transformer_class": c.transformer_class} if fmt == "sglang" else {}
    [written] = import_file(path, tmp_path / "out.json", **extra)
    back = load_coefficients(written)
    assert back.coefficients == c.coefficients
    assert back.defaults.rel_l1_thresh == 0.123
    assert back.transformer_class == c.transformer_class
    assert back.provenance["kind"] == "published" and back.provenance["format"] == fmt
    if fmt != "sglang":  # the Python snippets and the diffusers config carry the rest too
        assert (back.model, back.signal, back.x_range) == (c.model, c.signal, c.x_range)


def test_warnings_name_what_each_port_cannot_express():
    reference = load_coefficients("reference")
    teacache = " ".join(export_coefficients(reference, "teacache").warnings)
    assert "x_range" in teacache and "negative" in teacache and "backwards" in teacache
    wan = load_coefficients("wan2_1_t2v_14b")  # p(0) = -13
    assert any("abs(p)" in w for w in export_coefficients(wan, "vllm_omni").warnings)
    assert any("timestep embedding" in w for w in export_coefficients(wan, "sglang").warnings)
    capped = dataclasses.replace(reference, defaults=DecisionDefaults(0.05, warmup_steps=3, final_steps=2, max_consecutive_skips=2))
    vllm = " ".join(export_coefficients(capped, "vllm_omni").warnings)
    assert "warmup_steps=3" in vllm and "max_consecutive_skips=2" in vllm
    assert export_coefficients(reference, "diffusers").warnings == []
    joint = dataclasses.replace(reference, defaults=reference.defaults.with_overrides(rule="teacache_joint"))
    assert any("rule is teacache_joint, which" in w for w in export_coefficients(joint, "sglang").warnings)
    text = export_coefficients(reference, "teacache").text
    assert f"x_range: [{reference.x_range[0]!r}" in text and "traces/reference.h5" in text and "recipe: num_inference_steps 25" in text


def degree(c, n):
    return dataclasses.replace(c, coefficients=tuple(c.coefficients[-(n + 1):]))


def test_vllm_omni_refuses_other_degrees_and_zero_threshold():
    c = load_coefficients("reference")
    for n in (3, 5):
        poly = degree(c, 3) if n == 3 else dataclasses.replace(c, coefficients=(1.0, *c.coefficients))
        with pytest.raises(ExportError, match="exactly 5 coefficients"):
            export_coefficients(poly, "vllm_omni")
        assert json.loads(export_coefficients(poly, "sglang").text)["coefficients"] == list(poly.coefficients)
    with pytest.raises(ExportError, match="rel_l1_thresh > 0"):
        export_coefficients(c, "vllm_omni", rel_l1_thresh=0.0)


def test_cli_writes_file_and_warns_on_stderr(tmp_path):
    result = run_module("calibrate.export", "coefficients=reference", "format=comfyui", f"out={tmp_path / 'r.py'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "SUPPORTED_MODELS_COEFFICIENTS" in (tmp_path / "r.py").read_text()
    assert result.stderr.startswith("warning: ") and "x_range" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.py"]  # no outputs/, .hydra/ or log files
    stdout = run_module("calibrate.export", "coefficients=flux", "format=sglang", cwd=tmp_path)
    assert json.loads(stdout.stdout) == {"coefficients": list(load_coefficients("flux").coefficients), "teacache_thresh": 0.25}


def write_degree3(tmp_path):
    c = degree(load_coefficients("reference"), 3)
    path = tmp_path / "d3.json"
    path.write_text(json.dumps(c.to_dict()))
    return path


@pytest.mark.parametrize(
    "args, expected",
    [
        (["coefficients=reference", "format=onnx"], "format='onnx' is not one of"),
        (["coefficients=missing/x.json", "format=sglang"], "does not exist"),
        (["coefficients=bad.json", "format=sglang"], "is not valid JSON"),
        (["coefficients=d3.json", "format=vllm_omni"], "requires exactly 5 coefficients"),
        (["format=sglang"], "coefficients= is required"),
    ],
)
def test_cli_bad_input_is_one_error_line(tmp_path, args, expected):
    (tmp_path / "bad.json").write_text("{not json")
    write_degree3(tmp_path)
    result = run_module("calibrate.export", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


# ------------------------------------------------------------------------------------------- import

FLUX = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]


def test_published_list_import_is_unchanged(tmp_path):
    shared = ROOT.parent / "shared" / "published_coefficients.json"
    if not shared.is_file():
        pytest.skip("../shared/published_coefficients.json is not beside this checkout")
    written = import_published(shared, tmp_path)
    assert written
    for path in written:
        assert path.read_bytes() == (ROOT / "coefficients" / path.name).read_bytes()


def test_upstream_script_needs_the_transformer_class(tmp_path):
    # The shape of an upstream script: the list, np.poly1d of it, the threshold set on the class.
    src = tmp_path / "teacache_flux.py"
    src.write_text(
        "import numpy as np\n"
        f"coefficients = {FLUX!r}\n"
        "rescale_func = np.poly1d(coefficients)\n"
        "pipeline.transformer.__class__.rel_l1_thresh = 0.6\n"
    )
    with pytest.raises(ImportFormatError, match="--transformer-class"):
        import_file(src, tmp_path / "o.json")
    [path] = import_file(src, tmp_path / "o.json", transformer_class="FluxTransformer2DModel")
    c = load_coefficients(path)
    assert list(c.coefficients) == FLUX and c.defaults.rel_l1_thresh == 0.6 and c.model == "teacache_flux"
    assert "upstream TeaCache" in c.provenance["source"] and c.provenance["format"] == "teacache"
    assert (c.defaults.warmup_steps, c.defaults.final_steps) == (1, 1)  # upstream computes first and last


def test_bare_list_needs_a_threshold(tmp_path):
    src = tmp_path / "list.json"
    src.write_text(json.dumps(FLUX))
    with pytest.raises(ImportFormatError, match="--rel-l1-thresh"):
        import_file(src, tmp_path / "o.json", transformer_class="FluxTransformer2DModel")
    [path] = import_file(src, tmp_path / "o.json", transformer_class="FluxTransformer2DModel", rel_l1_thresh=0.4)
    assert load_coefficients(path).defaults.rel_l1_thresh == 0.4


def test_pasted_comfyui_entry_knows_its_family(tmp_path):
    src = tmp_path / "entry.txt"
    src.write_text('    "wan2.1_t2v_14B": [-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404],\n')
    [path] = import_file(src, tmp_path, rel_l1_thresh=0.2)
    c = load_coefficients(path)
    assert c.transformer_class == "WanTransformer3DModel" and c.signal == "timestep_embedding"
    assert c.model == "wan2_1_t2v_14B" and c.provenance["entry"] == "wan2.1_t2v_14B"
    with pytest.raises(ImportFormatError, match="is for WanTransformer3DModel"):
        import_file(src, tmp_path / "x.json", rel_l1_thresh=0.2, transformer_class="FluxTransformer2DModel")


def test_comfyui_dict_with_several_entries_needs_entry(tmp_path):
    src = tmp_path / "nodes.py"
    src.write_text(f"SUPPORTED_MODELS_COEFFICIENTS = {{'flux': {FLUX!r}, 'ltxv': [21.47, -12.8, 2.31, 0.79, 0.0097]}}\n")
    with pytest.raises(ImportFormatError, match="--entry"):
        import_file(src, tmp_path, rel_l1_thresh=0.4)
    [path] = import_file(src, tmp_path, rel_l1_thresh=0.4, entry="flux")
    assert load_coefficients(path).transformer_class == "FluxTransformer2DModel"


def test_vllm_omni_config_call(tmp_path):
    src = tmp_path / "cfg.py"
    src.write_text(
        'config = TeaCacheConfig(rel_l1_thresh=0.2, coefficients=[-450.0, 280.0, -45.0, 3.2, -0.02], '
        'transformer_type="QwenImageTransformer2DModel")\n'
    )
    [path] = import_file(src, tmp_path / "q.json")
    c = load_coefficients(path)
    assert c.transformer_class == "QwenImageTransformer2DModel" and c.defaults.rel_l1_thresh == 0.2
    assert c.defaults.final_steps == 0  # vllm-omni forces only the first step


def test_sglang_moe_needs_entry(tmp_path):
    src = tmp_path / "teacache.json"
    src.write_text(json.dumps({"high": {"coefficients": FLUX, "teacache_thresh": 0.1},
                               "low": {"coefficients": [1.0, 2.0, 0.1], "teacache_thresh": 0.3}}))
    with pytest.raises(ImportFormatError, match="high, low"):
        import_file(src, tmp_path, transformer_class="WanTransformer3DModel")
    [path] = import_file(src, tmp_path, transformer_class="WanTransformer3DModel", entry="low")
    c = load_coefficients(path)
    assert c.coefficients == (1.0, 2.0, 0.1) and c.defaults.rel_l1_thresh == 0.3 and c.model == "low"


def test_import_never_overwrites_other_contents(tmp_path):
    reference = (ROOT / "coefficients" / "reference.json").read_bytes()
    target = tmp_path / "reference.json"
    target.write_bytes(reference)
    src = tmp_path / "s.json"
    src.write_text(json.dumps({"coefficients": FLUX, "teacache_thresh": 0.1}))
    with pytest.raises(ImportFormatError, match="already exists"):
        import_file(src, target, transformer_class="QwenImageTransformer2DModel")
    assert target.read_bytes() == reference
    import_file(src, target, transformer_class="QwenImageTransformer2DModel", force=True)
    assert list(load_coefficients(target).coefficients) == FLUX


@pytest.mark.parametrize(
    "content, args, expected",
    [
        ("print('hello')\n", [], "holds none of the shapes"),
        (json.dumps({"coefficients": FLUX, "teacache_thresh": 0.1}), [], "--transformer-class"),
        (json.dumps({"coefficients": ["a"], "teacache_thresh": 0.1}), ["--transformer-class", "X"], "finite numbers"),
        (json.dumps({"coefficients": FLUX, "teacache_thresh": 0.1}), ["--format", "comfyui"], "looks like the sglang shape"),
        (json.dumps(load_coefficients("flux").to_dict()), [], "already a coefficients file"),
    ],
)
def test_import_cli_bad_input_is_one_error_line(tmp_path, content, args, expected):
    src = tmp_path / "in.json"
    src.write_text(content)
    result = run_module("calibrate.import_published", str(src), "--out", str(tmp_path / "o.json"), *args, cwd=ROOT)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()
