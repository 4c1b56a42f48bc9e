#!/usr/bin/env bash
# Train the video reference model on a GPU machine with no network in one go, evaluate it there, pack the results.
#
#   bash reference_video/device_train.sh --fetch-wheels     # with network, once per checkout: .whl/
#   OUT=/tmp/rv bash reference_video/device_train.sh        # on the GPU machine, in a copy of the checkout with .whl/
#   tar -xf /tmp/rv/reference_video_gpu.tar -C reference_video                         # back here, afterwards
#
# (A remote runner that copies the checkout and returns $OUT, as this project's lent GPUs do, carries .whl and
# runs the second line with its own OUT, within a 10-minute command.) On the GPU machine it installs the wheels
# (diffusers and hydra are not in a plain PyTorch image), runs the
# trainer's tests (the GPU one included: tiny, seconds), trains with
# `python -m reference_video.train --device cuda --minutes $MINUTES` (the transformer's step count is chosen
# from the rate measured over its first steps and written to weights/train_config.json), runs
# `python -m reference_video.evaluate --device cuda`, and packs weights/, loss.json, loss.png, eval.json,
# samples.png, samples.gif and train.log into $OUT/reference_video_gpu.tar (one file: $OUT brings back at most
# 8); train.log also comes back on its own, so a failed run still says why. Settings, as environment variables:
# MINUTES (default 5), BATCH (256), LR (1.2e-3), POOL (50000), SEED (0); DEVICE (cuda) and VAE_STEPS (1000)
# exist for a dry run on a CPU: `OUT=/tmp/o DEVICE=cpu MINUTES=0.1 POOL=200 VAE_STEPS=5 bash <this script>`.
# The whole call must fit the tool's 10-minute command limit: the VAE, the pool and the evaluation take about
# two of them on top of MINUTES (an estimate: no GPU was lent when this script was written).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 hydra-core==1.3.8 omegaconf==2.3.1
    (cd .whl && python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3)
    ls -l .whl
    exit 0
fi

: "${OUT:?OUT is unset: set OUT to the folder for the results (OUT=/tmp/rv bash $0)}"
mkdir -p "$OUT"
ls .whl/*.whl > /dev/null 2>&1 || { echo "no wheels in .whl/: run 'bash reference_video/device_train.sh --fetch-wheels' here first and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

work=$(mktemp -d)
{
    # the GPU path of the trainer, small, before the long run (a failure here is in the log that comes back)
    python3 -m pytest -q -p no:cacheprovider tests/test_reference_video.py -k "gpu or training" || true
    python3 -m reference_video.train --seed "${SEED:-0}" --device "${DEVICE:-cuda}" --minutes "${MINUTES:-5}" \
        --batch-size "${BATCH:-256}" --lr "${LR:-1.2e-3}" --pool-size "${POOL:-50000}" \
        --vae-steps "${VAE_STEPS:-1000}" --out "$work/weights" --log-dir "$work"
    python3 -m reference_video.evaluate --device "${DEVICE:-cuda}" --weights "$work/weights" --out "$work/eval.json" \
        --figures "$work"
} 2>&1 | tee "$work/train.log" "$OUT/train.log"
tar -C "$work" -cf "$OUT/reference_video_gpu.tar" weights loss.json loss.png eval.json samples.png samples.gif train.log
ls -l "$OUT"
