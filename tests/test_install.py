"""The package outside its checkout, and its command lines' first second.

- A wheel (not an editable install) finds the shipped coefficients, the hydra configs and the reference
  weights, and record -> fit -> sweep run from any directory, writing only there.
- ``--help`` explains every key of each command's config.
- Errors about arguments and files come before torch is imported.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
# What pyproject.toml builds the wheel from; copied so that the build never sees the checkout's build/.
SOURCES = ["pyproject.toml", "README.md", "runtime", "calibrate", "reference", "reference_video", "coefficients", "conf"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
APPS = ["record", "fit", "sweep"]


def run(args, cwd, env=ENV, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project built as a wheel and installed with ``pip --target`` (no editable finder, no checkout)."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    source.mkdir()
    for name in SOURCES:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, source / name)
    build = run(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "wheel"), "."], cwd=source)
    assert build.returncode == 0, build.stderr
    (wheel,) = (base / "wheel").glob("*.whl")
    # --target installs beside, never over, the environment's own (editable) install.
    target = base / "site"
    install = run(["-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)], cwd=base)
    assert install.returncode == 0, install.stderr
    shutil.rmtree(source)  # nothing may still point into the source tree
    work = base / "work"
    work.mkdir()
    env = {**ENV, "PYTHONPATH": str(target)}
    return target, work, env


def test_wheel_finds_coefficients_configs_and_weights(installed):
    target, work, env = installed
    code = """
import calibrate.cli, reference.pipeline, runtime
from runtime import TeaCache, available_names
cache = TeaCache.from_coefficients("qwen_image")
print(runtime.__file__)
print(calibrate.cli.CONF_DIR)
print(reference.pipeline.DEFAULT_WEIGHTS_DIR)
print(",".join(available_names()))
print(type(cache).__name__)
"""
    proc = run(["-c", code], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    module, conf, weights, names, _ = proc.stdout.strip().splitlines()
    for path in (module, conf, weights):
        assert Path(path).is_relative_to(target), path  # the wheel's copy, not the checkout
    assert (Path(conf) / "record.yaml").is_file() and (Path(conf) / "model" / "reference.yaml").is_file()
    assert all((Path(conf) / "hydra" / "help" / f"{app}.yaml").is_file() for app in APPS)
    assert (Path(weights) / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert {"qwen_image", "flux", "reference"} <= set(names.split(","))


def test_wheel_record_fit_sweep_from_any_directory(installed):
    """The reference model end to end from the installed package; outputs go to the working directory."""
    target, work, env = installed
    before = listing(target)
    record = run(["-m", "calibrate.record", "limit=2"], cwd=work, env=env)
    assert record.returncode == 0, record.stderr
    assert (work / "traces" / "reference.h5").is_file()
    fit = run(["-m", "calibrate.fit"], cwd=work, env=env)
    assert fit.returncode == 0, fit.stderr
    assert (work / "coefficients" / "reference.json").is_file() and (work / "coefficients" / "reference.png").is_file()
    sweep = run(
        ["-m", "calibrate.sweep", "limit=1", "repeats=1", "methods=[teacache]", "teacache_points=1"], cwd=work, env=env
    )
    assert sweep.returncode == 0, sweep.stderr
    assert (work / "sweep" / "reference" / "sweep.json").is_file()
    assert listing(target) == before  # nothing written into the installed package


def help_keys_section(text: str) -> str:
    match = re.search(r"== Keys \(key=value\) ==\n(.*?)\n== ", text, re.S)
    assert match, f"--help has no key list:\n{text}"
    return match.group(1)


@pytest.mark.parametrize("app", APPS)
def test_help_explains_every_key(tmp_path, app):
    proc = run(["-m", f"calibrate.{app}", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    keys = help_keys_section(proc.stdout)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(app)
    groups = {"model", "prompts"}
    expected = []
    for key, value in cfg.items():
        if key not in groups and hasattr(value, "items"):
            expected += [f"{key}.{sub}" for sub in value]
        else:
            expected.append(key)
    missing = [key for key in expected if not re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", keys)]
    assert not missing, f"--help of calibrate.{app} does not explain {missing}"
    assert "model: " in proc.stdout and "reference" in proc.stdout  # the choices of the model group


def imported_modules(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    "app, args, message",
    [
        ("fit", ["traces={tmp}/missing.h5"], "error: trace file {tmp}/missing.h5 does not exist"),
        ("fit", ["traces={tmp}/missing-*.h5"], "error: no trace files match"),
        ("sweep", ["coefficients={tmp}/missing.json"], "error: coefficients file {tmp}/missing.json does not exist"),
        ("record", ["out={tmp}/notes.h5"], "error: {tmp}/notes.h5 is not a readable HDF5 file"),
        ("record", ["seeds=[]"], "error: seeds must be a non-empty list of integers"),
    ],
)
def test_errors_come_before_torch_is_imported(tmp_path, app, args, message):
    (tmp_path / "notes.h5").write_text("not HDF5\n")
    args = [a.format(tmp=tmp_path) for a in args]
    proc = run(["-X", "importtime", "-m", f"calibrate.{app}", *args, f"hydra.run.dir={tmp_path}/hydra"], cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert errors and errors[-1].startswith(message.format(tmp=tmp_path)), proc.stderr[-2000:]
    loaded = imported_modules(proc.stderr)
    assert "hydra" in loaded  # the check is the importtime output itself
    assert not loaded & {"torch", "diffusers", "scipy", "matplotlib", "transformers"}
    assert (tmp_path / "notes.h5").read_text() == "not HDF5\n"
