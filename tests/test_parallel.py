"""TeaCache and the recorder under diffusers' context parallelism: two gloo ranks on CPU (Ulysses).

Ring attention needs the attention's log-sum-exp, which CPU backends lack: it runs on GPUs only and
is not tested here. The worker is tests/_cp_worker.py; a hung collective fails the test by timeout.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FAMILIES = ("qwen_image", "flux", "wan")
ROOT = Path(__file__).resolve().parent.parent


def run_ranks(command, **kwargs):
    """Run a two-rank torchrun job; a hang fails the test. A native abort of a rank (glibc's "malloc():
    unaligned fastbin chunk detected", seen once in about a dozen runs, on a 2-core CPU loaded by other
    work; 8 runs of the same sampling without TeaCache were clean, so our all-reduces are not ruled out)
    is retried once, and then fails."""
    for attempt in range(2):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=240, **kwargs)
        except subprocess.TimeoutExpired:
            pytest.fail("the two context-parallel ranks did not finish in 240 s (a hung collective?)")
        aborted = done.returncode != 0 and any(s in done.stderr for s in ("SIGABRT", "SIGSEGV", "malloc()"))
        if not aborted:
            break
    return done


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "_cp_worker.py"), "--out", str(out)]
    done = run_ranks(command, cwd=out, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {f: [torch.load(out / f"{f}.rank{r}.pt", weights_only=False) for r in (0, 1)] for f in FAMILIES}


def nan_free(decisions):
    return {b: [(c, None if x != x else x) for c, x in trace] for b, trace in decisions.items()}


def close(a, b, atol=1e-5):
    return all(torch.allclose(x, y, rtol=0, atol=atol) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_context_parallel_teacache_equals_single_process(ranks, family):
    rank0, rank1 = ranks[family]
    single = rank0["single_decisions"]
    assert any(not computed for trace in single.values() for computed, _ in trace)  # the threshold skips
    for key in ("cp_decisions", "cp_decisions_before"):  # applied after, and before, enable_parallelism
        for rank in (rank0, rank1):
            assert [[c for c, _ in rank[key][b]] for b in sorted(single)] == [[c for c, _ in single[b]] for b in sorted(single)]
            for branch in single:
                np.testing.assert_allclose([x for _, x in rank[key][branch]], [x for _, x in single[branch]], rtol=1e-5)
        assert nan_free(rank0[key]) == nan_free(rank1[key])  # both ranks: the same decisions on the same x
    for rank in (rank0, rank1):
        assert close(rank["cp_full"], rank["single_full"])  # context parallelism itself is exact
        assert close(rank["cp_cached"], rank["single_cached"])
        assert close(rank["cp_cached_before"], rank["single_cached"])
        # an output forecast acts on the gathered output: the same on every rank as in one process
        assert close(rank["cp_output_linear"], rank["single_output_linear"])
        assert not close(rank["single_output_linear"], rank["single_cached"])
        assert all(torch.equal(a, b) for a, b in zip(rank["cp_zero"], rank["cp_full"]))  # threshold 0: no cache


@pytest.mark.parametrize("family", FAMILIES)
def test_context_parallel_recording_equals_single_process(ranks, family):
    for rank in ranks[family]:
        single, cp = rank["single_trace"], rank["cp_trace"]
        assert sorted(cp) == sorted(single) == ["cond", "uncond"]
        for branch in single:
            for field in ("timestep", "x", "x_temb", "y", "y_residual"):
                np.testing.assert_allclose(cp[branch][field], single[branch][field], rtol=1e-4, atol=1e-6, equal_nan=True)


def test_calibrate_record_under_torchrun_equals_a_single_process_recording(tmp_path):
    """`torchrun --nproc_per_node=2 -m calibrate.record ... parallel.ulysses_degree=2`: rank 0 writes once,
    and the traces equal a single-process recording of the same work."""
    import h5py

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["model=tiny_qwen_image", "limit=2", "seeds=[0]", "device=cpu"]
    single, cp = tmp_path / "single.h5", tmp_path / "cp.h5"
    done = subprocess.run([sys.executable, "-m", "calibrate.record", *common, f"out={single}",
                           f"hydra.run.dir={tmp_path / 'h1'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "calibrate.record", *common, "parallel.ulysses_degree=2", f"out={cp}", f"hydra.run.dir={tmp_path / 'h2'}"]
    done = run_ranks(command, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("traces:") == 1  # rank 0 alone reports (and writes)
    with h5py.File(single) as a, h5py.File(cp) as b:
        assert sorted(a["runs"]) == sorted(b["runs"]) and len(a["runs"]) == 4
        for name in a["runs"]:
            for field in ("timestep", "x", "x_temb", "y", "y_residual"):
                np.testing.assert_allclose(b["runs"][name][field][()], a["runs"][name][field][()], rtol=1e-4, atol=1e-6)


def test_parallel_settings_are_checked_before_anything_loads(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "calibrate.record", "model=tiny_qwen_image", "parallel.ulysses_degree=2",
                           f"out={tmp_path / 't.h5'}", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: parallel.ulysses_degree x parallel.ring_degree = 2 needs 2 processes" in done.stderr
    assert "torchrun --nproc_per_node=2" in done.stderr and not (tmp_path / "t.h5").exists()
