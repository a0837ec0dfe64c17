#!/bin/sh
# One-shot GPU check for a short device lease: the meta-device counts, then `omniportrait bench` on the real
# SD1.5 (512²) and SDXL (1024²) architectures with random weights in fp16, all components on the GPU.
# Packages the GPU image lacks (diffusers, mediapipe, protobuf<5) travel as wheels in .wheels/ (git-ignored):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .wheels diffusers==0.42.1 mediapipe==0.10.14 protobuf==4.25.9
# Results go to $OUT (env.txt, count.txt, bench.txt, bench.json).
set -e
OUT=${OUT:-/tmp/omniportrait-gpu}
SITE=/tmp/omniportrait-site
mkdir -p "$OUT" "$SITE"
if [ -d .wheels ]; then
    python3 -m pip install --quiet --no-deps --no-index --target "$SITE" .wheels/*.whl
fi
export PYTHONPATH="$SITE:$PWD/src:$PWD" HF_HUB_OFFLINE=1
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
torch.cuda.get_device_name())" | tee "$OUT/env.txt"
python3 benchmarks/count_guidance.py | tee "$OUT/count.txt"
python3 -m omniportrait.cli bench --reference examples/astronaut.jpg --models random-sd15 random-sdxl \
    --steps 50 --repeats 2 --json "$OUT/bench.json" | tee "$OUT/bench.txt"
