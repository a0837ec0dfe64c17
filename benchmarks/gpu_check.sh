#!/bin/sh
# One-shot GPU check for a short device lease: `omniportrait generate` and `evaluate` on the tiny SDXL preset with every
# default, then `python -m benchmarks.bench` on the real SDXL (1024²) and SD1.5 (512²) architectures with random
# weights in fp16, all components on the GPU, then diffusers' plain pipeline alone in a process of its own, then the
# tests marked `gpu` (the default SDXL generation with the allocator capped at 12, 11 and 10 GiB; the default SD1.5
# generation with diffusers' model and sequential CPU offload), then benchmarks/profile_step.py (where one step's time
# goes). The counts of `python -m benchmarks.count` do not depend on the machine: run them anywhere.
# Runs from the source tree (PYTHONPATH=src), no install. Packages the GPU image lacks (diffusers, mediapipe,
# protobuf<5) travel as wheels in .wheels/ (git-ignored), fetched beforehand on a machine with an index:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .wheels diffusers==0.42.1 mediapipe==0.10.14 protobuf==4.25.9
# Results go to $OUT: env.txt, cli.txt/.png/.json, evaluate.txt and evaluate/, bench.txt/.json/.md/.err (the .json
# and .md as benchmarks/results/ keeps them: copy them there as DAY-CARD.json/.md), plain-alone.txt/.json, gpu-tests.txt,
# profile-MODEL.txt. bench.json and bench.md are written after each model, and a variant or step that fails (out of
# memory, say) is reported in its place while the rest still runs.
# Variables: MODELS, VARIANTS, STEPS, REPEATS override the bench; GPU_TESTS=none skips the gpu tests; PROFILE (models,
# or `none`) the profile; e.g. `MODELS=tiny-sd15 PROFILE=tiny-sd15 STEPS=2 REPEATS=1 sh benchmarks/gpu_check.sh`
# checks the script on a CPU (where the gpu tests are skipped).
set -e
OUT=${OUT:-/tmp/omniportrait-gpu}
SITE=${SITE:-/tmp/omniportrait-site}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$SITE"
if [ -d .wheels ]; then
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$SITE" .wheels/*.whl
fi
export PYTHONPATH="$SITE:$PWD/src:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee "$OUT/env.txt"
# the CLI as a user runs it (the tiny SDXL preset, so seconds), with every default: what its sidecar says ran
if "$PYTHON" -m omniportrait.cli generate --preset tiny-sdxl --reference examples/astronaut.jpg \
    --prompt "a woman on the beach" --out "$OUT/cli.png" > "$OUT/cli.txt" 2>&1; then
    "$PYTHON" -c "import json, sys; p = json.load(open(sys.argv[1]))['parameters']; \
print('generate:', {key: p.get(key) for key in ('device', 'dtype', 'cuda_graph', 'banded_decode')})" "$OUT/cli.json"
else
    echo "generate exited $? (the end of cli.txt says why)"
fi
# evaluate likewise, on CUDA: 2 prompts of the sample photo, the metrics' tiny random models (plumbing, not scores)
"$PYTHON" -m omniportrait.cli evaluate --references examples --preset tiny-sdxl --output "$OUT/evaluate" --steps 4 \
    --max-prompts 2 --clip-model tiny-random --blip-model tiny-random --class-word woman --no-progress \
    > "$OUT/evaluate.txt" 2>&1 && grep -E "^\| (Setting|rb|default)" "$OUT/evaluate.txt" \
    || echo "evaluate exited $? (the end of evaluate.txt says why)"
# the variants that decide the defaults: what a call gets, guidance off, eager cfg, graphed cfg and split, with bands
"$PYTHON" -m benchmarks.bench --models ${MODELS:-random-sdxl random-sd15} \
    --variants ${VARIANTS:-rb-default rb-off rb-cfg rb-cfg-graph rb-split-graph rb-split-graph-banded} \
    --steps "${STEPS:-50}" --repeats "${REPEATS:-1}" --json "$OUT/bench.json" --markdown "$OUT/bench.md" \
    2>"$OUT/bench.err" | tee "$OUT/bench.txt" || echo "bench exited $? (a variant failed: bench.txt says which)"
grep -iE "warn|error" "$OUT/bench.err" | sort | uniq -c | head -5  # e.g. a CUDA graph that could not be captured
sed -n '/^Targets/,$p' "$OUT/bench.md" 2>/dev/null  # the variants within the targets
# diffusers' plain pipeline in a process where none of ours runs (the bench's plain ran beside ours)
"$PYTHON" -m benchmarks.bench --models ${MODELS:-random-sdxl random-sd15} --variants diffusers-plain \
    --steps "${STEPS:-50}" --repeats "${REPEATS:-1}" --json "$OUT/plain-alone.json" 2>>"$OUT/bench.err" \
    | tee "$OUT/plain-alone.txt"
# a smaller card and CPU offload: the gpu tests print a row each (skipped without CUDA)
[ "${GPU_TESTS:-all}" = none ] || "$PYTHON" -m pytest -q -s -m gpu tests/benchmarks/test_gpu.py 2>&1 \
    | grep -v "^\[transformers\]" | tee "$OUT/gpu-tests.txt" || echo "the gpu tests failed (gpu-tests.txt says how)"
for model in ${PROFILE:-random-sdxl}; do
    [ "$model" = none ] && break
    "$PYTHON" -m benchmarks.profile_step --model "$model" > "$OUT/profile-$model.txt" 2>&1 \
        || echo "profile_step.py --model $model exited $? (the end of profile-$model.txt says why)"
    grep -E "^(random|tiny)|^ms|^peak|^graph|^syncs|^one|could not be captured" "$OUT/profile-$model.txt"
done
