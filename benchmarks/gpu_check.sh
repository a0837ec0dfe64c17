#!/bin/sh
# One-shot GPU check for a short device lease: the meta-device counts, then `omniportrait bench` on the real
# SD1.5 (512²) and SDXL (1024²) architectures with random weights in fp16, all components on the GPU.
# Runs from the source tree (PYTHONPATH=src), no install. Packages the GPU image lacks (diffusers, mediapipe,
# protobuf<5) travel as wheels in .wheels/ (git-ignored), fetched beforehand on a machine with an index:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .wheels diffusers==0.42.1 mediapipe==0.10.14 protobuf==4.25.9
# Results go to $OUT (env.txt, count.txt, bench.txt, bench.json). MODELS, STEPS and REPEATS override the run,
# e.g. `MODELS=tiny-sd15 STEPS=2 REPEATS=1 sh benchmarks/gpu_check.sh` checks the script itself on a CPU.
set -e
OUT=${OUT:-/tmp/omniportrait-gpu}
SITE=${SITE:-/tmp/omniportrait-site}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$SITE"
if [ -d .wheels ]; then
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$SITE" .wheels/*.whl
fi
export PYTHONPATH="$SITE:$PWD/src:$PWD" HF_HUB_OFFLINE=1
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$OUT/env.txt"
"$PYTHON" benchmarks/count_guidance.py | tee "$OUT/count.txt"
"$PYTHON" -m omniportrait.cli bench --reference examples/astronaut.jpg --models ${MODELS:-random-sd15 random-sdxl} \
    --steps "${STEPS:-50}" --repeats "${REPEATS:-2}" --json "$OUT/bench.json" | tee "$OUT/bench.txt"
