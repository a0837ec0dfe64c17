#!/bin/sh
# One-shot GPU check for a short device lease: `omniportrait generate` and `evaluate` on the tiny SDXL preset with every
# default, then `omniportrait bench` on the real SDXL (1024²) and SD1.5 (512²) architectures with random weights in
# fp16, all components on the GPU, then small_card.py (the default SDXL generation with the allocator capped at 12, 11
# and 10 GiB), offload_check.py (the default SD1.5 generation with diffusers' model and sequential CPU offload) and
# profile_step.py (where one step's time goes). The FLOP/memory counts of count_guidance.py do not depend on the
# machine: run them anywhere.
# Runs from the source tree (PYTHONPATH=src), no install. Packages the GPU image lacks (diffusers, mediapipe,
# protobuf<5) travel as wheels in .wheels/ (git-ignored), fetched beforehand on a machine with an index:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .wheels diffusers==0.42.1 mediapipe==0.10.14 protobuf==4.25.9
# Six bench variants: what a call gets (rb-default), guidance off, the eager `cfg` pass, and the graphed `cfg` and
# `split` passes with and without bands, which decide the defaults; the others decided what they could in the previous
# runs (`VARIANTS=...` runs any). Those runs, with 13 variants, took about 8 minutes on an H100 besides the machine's
# start; this one should stay well inside one 10-minute call. Results go to $OUT (env.txt, cli.txt/.png/.json,
# evaluate.txt and evaluate/, bench.txt/.json/.err, plain-alone.txt/.json, bench-table.md, small-card.txt, offload.txt,
# profile-MODEL.txt); bench.json is written after each model, and a variant or step that fails (out of memory, say) is
# reported in its place while the rest still runs. MODELS, VARIANTS, STEPS, REPEATS, SMALL_CARD and OFFLOAD (a model, or
# `none`) and PROFILE (models, or `none`) override the run, e.g. `MODELS=tiny-sd15 SMALL_CARD=tiny-sd15
# OFFLOAD=tiny-sd15 PROFILE=tiny-sd15 STEPS=2 REPEATS=1 sh benchmarks/gpu_check.sh` checks it on a CPU.
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
"$PYTHON" -m omniportrait.cli bench --reference examples/astronaut.jpg --models ${MODELS:-random-sdxl random-sd15} \
    --variants ${VARIANTS:-rb-default rb-off rb-cfg rb-cfg-graph rb-split-graph rb-split-graph-banded} \
    --steps "${STEPS:-50}" --repeats "${REPEATS:-1}" --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
grep -iE "warn|error" "$OUT/bench.err" | sort | uniq -c | head -5  # e.g. a CUDA graph that could not be captured
# diffusers' plain pipeline in a process where none of ours runs: the bench's plain ran beside ours (4.49-4.88 s
# there against 3.61 s alone for SDXL at 20eee37)
"$PYTHON" -m omniportrait.cli bench --reference examples/astronaut.jpg --models ${MODELS:-random-sdxl random-sd15} \
    --variants diffusers-plain --steps "${STEPS:-50}" --repeats "${REPEATS:-1}" --json "$OUT/plain-alone.json" \
    2>>"$OUT/bench.err" | tee "$OUT/plain-alone.txt"
"$PYTHON" benchmarks/gpu_table.py "$OUT/bench.json" > "$OUT/bench-table.md" \
    || echo "gpu_table.py exited $? (bench.json missing or incomplete?)"  # the table for benchmarks/README.md
sed -n '/^Targets/,$p' "$OUT/bench-table.md"  # the variants within the targets
# the default generation with the allocator capped at 12, 11 and 10 GiB: what it went on with, or that it failed
[ "${SMALL_CARD:-random-sdxl}" = none ] || "$PYTHON" -m benchmarks.small_card --model "${SMALL_CARD:-random-sdxl}" \
    --steps "${STEPS:-50}" 2>&1 | tee "$OUT/small-card.txt"
# the default generation with diffusers' model and sequential CPU offload, against the same generation in place
[ "${OFFLOAD:-random-sd15}" = none ] || "$PYTHON" -m benchmarks.offload_check --model "${OFFLOAD:-random-sd15}" \
    2>&1 | grep -v "^\[transformers\]" | tee "$OUT/offload.txt"
for model in ${PROFILE:-random-sdxl}; do
    [ "$model" = none ] && break
    "$PYTHON" benchmarks/profile_step.py --model "$model" > "$OUT/profile-$model.txt" 2>&1 \
        || echo "profile_step.py --model $model exited $? (the end of profile-$model.txt says why)"
    grep -E "^(random|tiny)|^ms|^peak|^graph|^syncs|^one|could not be captured" "$OUT/profile-$model.txt"
done
