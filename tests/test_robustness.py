"""The calibration tools under attack: concurrent writers, killed writers, damaged files, unwritable or
full disks, nonsense settings. Each fault ends in one typed error sentence that names the thing and the
fix, and leaves what is on disk as it was."""

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import calibrate.record as record_module
from calibrate import traces as traces_module
from calibrate.fit import run_fit
from calibrate.models import ModelLoadError
from calibrate.record import record
from calibrate.recipe import Recipe
from calibrate.traces import TraceFileError, TraceWriter, load_traces
from runtime import CoefficientsError, ConfigError, TeaCache, TeaCacheError, load_coefficients, save_coefficients

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
RECIPE = Recipe(8, 32, 32, guidance=4.0, negative_prompt="")  # tiny_qwen_image's own


def compose_cfg(name, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def record_to(out, limit=4, seeds="[0]", extra=()):
    overrides = ["model=tiny_qwen_image", f"limit={limit}", f"seeds={seeds}", f"out={out}", "device=cpu", *extra]
    return record(compose_cfg("record", overrides))


def fit_to(traces, out, extra=()):
    return run_fit(compose_cfg("fit", [f"traces={traces}", f"out={out}", *extra]))


def one_sentence(message: str) -> str:
    """The project's error contract: one line, one sentence, ending with a period."""
    assert "\n" not in message and "Traceback" not in message, message
    assert message.endswith("."), message
    assert not re.search(r"[.;:]\s+[A-Z][a-z]+ ", message.replace("Qwen", "qwen")), f"more than one sentence: {message}"
    return message


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model gets loaded: the faults below must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the fault was reported")

    import calibrate.models

    monkeypatch.setattr(record_module, "load_model", refuse)
    monkeypatch.setattr(calibrate.models, "load_model", refuse)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real trace file of 6 prompts x 1 seed (12 trajectories) on tiny_qwen_image."""
    return record_to(tmp_path_factory.mktemp("recorded") / "t.h5", limit=6)


@pytest.fixture(scope="module")
def fitted(recorded, tmp_path_factory):
    out = tmp_path_factory.mktemp("fitted") / "c.json"
    return fit_to(recorded, out, extra=["plot=false"])


# ------------------------------------------------------------------------------- concurrent writers


def test_a_second_recorder_is_refused_while_the_first_runs(tmp_path):
    """Two real recorders on one out=: the second exits 2 with one sentence and the file loses nothing."""
    out = tmp_path / "t.h5"
    common = ["model=tiny_qwen_image", "limit=30", f"out={out}", "device=cpu"]
    first = subprocess.Popen(
        [sys.executable, "-m", "calibrate.record", *common, "seeds=[0]", f"hydra.run.dir={tmp_path}/h1"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.02)  # waiting on another process: there is no event to wait on
        first.send_signal(signal.SIGSTOP)  # frozen mid-recording, still holding its lock
        assert first.poll() is None, "the first recorder should still be running"
        before = out.read_bytes()
        second = subprocess.run(
            [sys.executable, "-m", "calibrate.record", *common, "seeds=[1]", f"hydra.run.dir={tmp_path}/h2"],
            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
        )
        assert out.read_bytes() == before
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "being written by another process" in last and str(out) in last
    one_sentence(last)
    data = load_traces(out)  # every run the first one reported is in the file
    assert sorted((t.prompt_index, t.seed) for t in data.trajectories) == sorted(
        (i, 0) for i in range(30) for _ in ("cond", "uncond")
    )
    # the second one's runs can now be recorded into the same file
    record_to(out, limit=5, seeds="[1]")
    assert len(load_traces(out).trajectories) == 70
    assert not list(tmp_path.glob(".t.h5.*")), "no lock or temp file is left behind"


def test_stale_temp_files_are_removed_only_when_no_writer_is_live(tmp_path):
    out = record_to(tmp_path / "t.h5", limit=2)
    temp = tmp_path / ".t.h5.k1ll3d_9.tmp"  # the name an append's temp file has (tempfile.mkstemp)
    others = [tmp_path / ".t.h5.notours.tmp", tmp_path / ".t.h5x.abcdefgh.tmp", tmp_path / "keep.tmp"]
    for path in others:
        path.write_bytes(b"not ours")

    with TraceWriter(out, model="tiny_qwen_image", recipe=RECIPE):  # a live writer, mid-append
        shutil.copyfile(out, temp)
        with pytest.raises(TraceFileError, match="being written by another process") as caught:
            TraceWriter(out, model="tiny_qwen_image", recipe=RECIPE)
        one_sentence(str(caught.value))
        assert temp.exists(), "a live writer's temp files must never be removed"
    # the writer was killed mid-append: its temp file stays behind until the next writer takes the lock
    assert temp.exists()
    record_to(out, limit=3)
    assert not temp.exists()
    assert all(p.exists() for p in others)
    assert len(load_traces(out).trajectories) == 6


def test_the_lock_dies_with_its_process(tmp_path):
    out = record_to(tmp_path / "t.h5", limit=1)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from calibrate.traces import TraceWriter; from calibrate.recipe import Recipe; "
         f"w = TraceWriter({str(out)!r}, model='tiny_qwen_image', recipe=Recipe(8, 32, 32, guidance=4.0, negative_prompt='')); "
         "print('locked', flush=True); sys.stdin.read()"],
        cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TraceFileError, match="being written by another process"):
            record_to(out, limit=2)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
    record_to(out, limit=2)
    assert len(load_traces(out).trajectories) == 4


# --------------------------------------------------------------------------------- damaged groups


def _shorten_y(group):
    data = group["y"][()]
    del group["y"]
    group.create_dataset("y", data=data[:3])


def _drop_prompt(group):
    del group.attrs["prompt"]


def _drop_x_temb(group):
    del group["x_temb"]


def _negative_y(group):
    group["y"][2] = -0.5


def _overlong(group):
    for name in list(group):
        data = group[name][()]
        del group[name]
        longer = np.arange(len(data) + 3, dtype=data.dtype) if name == "step" else np.concatenate([data, data[1:4]])
        group.create_dataset(name, data=longer)


def _drop_group(group):
    del group.file[group.name]


DAMAGES = {
    "short y": (_shorten_y, r"dataset 'y' with 3 values where 'step' has 8"),
    "no prompt attribute": (_drop_prompt, r"lacks attribute 'prompt'"),
    "no x_temb": (_drop_x_temb, r"lacks dataset 'x_temb'"),
    "negative y": (_negative_y, r"negative values in 'y'"),
    "over-long": (_overlong, r"11 steps.*num_inference_steps=8"),
    "missing branch": (_drop_group, r"lacks branch 'uncond'"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_damaged_complete_groups_are_named_by_fit_and_rerecorded(recorded, tmp_path, damage):
    out = tmp_path / "t.h5"
    shutil.copyfile(recorded, out)
    with h5py.File(out, "a") as handle:
        names = sorted(handle["runs"])
        victim = next(n for n in names if n.endswith("_uncond"))
        DAMAGES[damage][0](handle["runs"][victim])
    intact = {t.name: t.data for t in load_traces(recorded).trajectories if t.name != victim}

    with pytest.raises(TraceFileError) as caught:
        fit_to(out, tmp_path / "c.json")
    message = one_sentence(str(caught.value))
    assert re.search(DAMAGES[damage][1], message), message
    assert victim.split("_")[0] in message and "re-record" in message and str(out) in message
    assert not (tmp_path / "c.json").exists()

    record_to(out, limit=6)  # the same command again repairs the file
    repaired = load_traces(out)
    assert sorted(t.name for t in repaired.trajectories) == names
    for t in repaired.trajectories:
        if t.name in intact:
            for field, values in intact[t.name].items():
                np.testing.assert_array_equal(t.data[field], values)
    with h5py.File(out) as handle:
        assert sorted(handle["runs"]) == names


# ------------------------------------------------------------------------------- file modes, atomic PNG


def test_written_files_get_the_mode_of_the_file_they_replace(recorded, tmp_path):
    old_umask = os.umask(0o027)
    try:
        traces = tmp_path / "t.h5"
        shutil.copyfile(recorded, traces)
        os.chmod(traces, 0o604)
        record_to(traces, limit=7)  # one more run: the file is replaced
        assert stat.S_IMODE(traces.stat().st_mode) == 0o604

        out = tmp_path / "c.json"
        fit_to(traces, out)  # new files: the umask's mode
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        assert stat.S_IMODE(out.with_suffix(".png").stat().st_mode) == 0o640
        os.chmod(out, 0o644)
        os.chmod(out.with_suffix(".png"), 0o604)
        fit_to(traces, out)  # existing files keep theirs
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        assert stat.S_IMODE(out.with_suffix(".png").stat().st_mode) == 0o604
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    finally:
        os.umask(old_umask)


def test_a_kill_during_the_png_write_leaves_the_old_png(recorded, tmp_path, monkeypatch):
    out = fit_to(recorded, tmp_path / "c.json")
    png = out.with_suffix(".png")
    before = snapshot(tmp_path)
    assert len(png.read_bytes()) > 10_000
    from matplotlib.figure import Figure

    def killed_midway(self, target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise KeyboardInterrupt  # what a kill looks like from inside the process

    monkeypatch.setattr(Figure, "savefig", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        fit_to(recorded, out)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------ full disk


def test_a_full_disk_during_an_append_changes_nothing(recorded, tmp_path, monkeypatch):
    out = tmp_path / "t.h5"
    shutil.copyfile(recorded, out)
    before = snapshot(tmp_path)

    def enospc(src, dst, *args, **kwargs):
        with open(dst, "wb") as handle:
            handle.write(b"\x89HDF partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(traces_module.shutil, "copyfile", enospc)
    with pytest.raises(TraceFileError) as caught:
        record_to(out, limit=8)
    message = one_sentence(str(caught.value))
    assert str(out) in message and "No space left on device" in message
    assert snapshot(tmp_path) == before


def test_a_full_disk_while_saving_coefficients_changes_nothing(fitted, tmp_path, monkeypatch):
    out = tmp_path / "c.json"
    shutil.copyfile(fitted, out)
    before = snapshot(tmp_path)
    coefficients = load_coefficients(fitted)

    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(CoefficientsError) as caught:
        save_coefficients(coefficients, out)
    message = one_sentence(str(caught.value))
    assert str(out) in message and "No space left on device" in message
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ unwritable out=


def _unwritable_outs(tmp_path, name):
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    return {
        "a folder": (tmp_path / "folder", r"is a folder"),
        "parent is a file": (afile / name, r"afile is a file"),
        "not writable": (Path("/proc/teacache-test") / name, r"cannot be written"),  # refused even to root
    }


@pytest.mark.parametrize("case", ["a folder", "parent is a file", "not writable"])
def test_record_refuses_an_unwritable_out_before_loading_the_model(tmp_path, no_model_load, case):
    (tmp_path / "folder").mkdir()
    out, pattern = _unwritable_outs(tmp_path, "t.h5")[case]
    before = snapshot(tmp_path)
    with pytest.raises(TraceFileError, match=pattern) as caught:
        record_to(out, limit=1)
    assert str(out) in one_sentence(str(caught.value))
    assert snapshot(tmp_path) == before and sorted(tmp_path.iterdir()) == [tmp_path / "afile", tmp_path / "folder"]


@pytest.mark.parametrize("case", ["a folder", "parent is a file", "not writable"])
def test_fit_refuses_an_unwritable_out_before_fitting(recorded, tmp_path, case, monkeypatch):
    (tmp_path / "folder").mkdir()
    out, pattern = _unwritable_outs(tmp_path, "c.json")[case]
    before = snapshot(tmp_path)
    import calibrate.fit as fit_module

    monkeypatch.setattr(fit_module, "fit_traces", lambda *a: pytest.fail("fitted before checking out="))
    with pytest.raises(TeaCacheError, match=pattern) as caught:
        fit_to(recorded, out)
    assert str(out) in one_sentence(str(caught.value))
    assert snapshot(tmp_path) == before


def test_record_with_out_a_folder_exits_2_with_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "calibrate.record", "model=tiny_qwen_image", "limit=1", f"out={tmp_path}/folder",
         f"hydra.run.dir={tmp_path}/h"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    one_sentence(proc.stderr.strip().splitlines()[-1])
    assert list((tmp_path / "folder").iterdir()) == []


# ------------------------------------------------------------------------------ nonsense settings


def test_nonsense_record_settings(tmp_path, no_model_load):
    for device in ("tpu", "tpu:0", "cuda:99", "3"):
        with pytest.raises(ModelLoadError, match=r"device=") as caught:
            record_to(tmp_path / "sub" / "t.h5", extra=[f"device={device}"])
        one_sentence(str(caught.value))
    assert list(tmp_path.iterdir()) == [], "nothing on disk changes"


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["traces=[]"], r"traces= names no files"),
        (["degree=abc"], r"degree must be an integer from 1 to 12, got 'abc'"),
        (["degree=0"], r"degree must be an integer from 1 to 12, got 0"),
        (["degree=0", "signal=modulated_input"], r"degree must be an integer from 1 to 12, got 0"),
        (["heldout_fraction=abc"], r"heldout_fraction must be a number in \(0, 1\)"),
    ],
)
def test_nonsense_fit_settings(recorded, tmp_path, overrides, pattern):
    traces = [] if "traces=[]" in overrides else [f"traces={recorded}"]
    cfg = compose_cfg("fit", [*traces, f"out={tmp_path}/c.json", *overrides])
    with pytest.raises(TeaCacheError, match=pattern) as caught:
        run_fit(cfg)
    assert "non-finite" not in one_sentence(str(caught.value))
    assert list(tmp_path.iterdir()) == []


def test_sweep_repeats_zero_is_refused_before_loading(fitted, tmp_path, no_model_load):
    import calibrate.sweep as sweep_module

    for repeats in (0, -1, "abc"):
        cfg = compose_cfg("sweep", ["model=tiny_qwen_image", f"coefficients={fitted}", f"repeats={repeats}",
                                    f"out={tmp_path}/sweep", "device=cpu"])
        with pytest.raises(ConfigError, match=r"repeats must be an integer >= 1") as caught:
            sweep_module.run_sweep(cfg)
        one_sentence(str(caught.value))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cfg = compose_cfg("sweep", ["model=tiny_qwen_image", f"coefficients={fitted}", f"out={afile}", "device=cpu"])
    with pytest.raises(TeaCacheError, match="is a file, not a folder"):
        sweep_module.run_sweep(cfg)
    assert sorted(tmp_path.iterdir()) == [afile]


# ------------------------------------------------------------------------------ coefficients files


def test_coefficients_faults_are_one_sentence(fitted, tmp_path):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps({"model": "caf\u00e9"}, ensure_ascii=False).encode("utf-8").replace(b"\xc3\xa9", b"\xe9"))
    with pytest.raises(CoefficientsError, match=r"latin1\.json is not UTF-8 text") as caught:
        load_coefficients(latin1)
    one_sentence(str(caught.value))

    for source in (3, None, 2.5, ["a.json"]):
        with pytest.raises(CoefficientsError, match=r"a coefficients name or a path") as caught:
            load_coefficients(source)
        one_sentence(str(caught.value))
        with pytest.raises(CoefficientsError, match=r"a coefficients name or a path"):
            TeaCache.from_coefficients(source)

    document = json.loads(Path(fitted).read_text())
    for field, value in (("coefficients", [1e39, 0.0]), ("coefficients", [10**400, 0.0]), ("x_range", [0.0, 1e39])):
        bad = tmp_path / "overflow.json"
        bad.write_text(json.dumps({**document, field: value}))
        with pytest.raises(CoefficientsError, match=rf"'{field}'.*float32") as caught:
            load_coefficients(bad)
        one_sentence(str(caught.value))
