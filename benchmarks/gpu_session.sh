#!/usr/bin/env bash
# The prepared GPU check of the "fast and lean" targets: one device call of at most ~9 minutes (a session has
# 15 minutes of device time, machine start included, so one full call is the plan, not two). The steps run in
# order of importance, each under its own time limit, and a step that no longer fits before the deadline is
# skipped and says so; every finished worker's row is written at once, so a late timeout loses nothing earlier.
# NOT YET RUN ON A GPU: no session so far was lent one. `DRY=1 PY=.venv/bin/python` runs the same steps on the
# tiny model and the CPU with 2 steps, to catch plumbing mistakes here before device time is spent on them;
# `QUICK=1` besides (what CI runs, tests/test_benchmarks.py) narrows each step to one adapter and skips the
# compile steps (inductor on 2 CPU cores takes minutes; "cuda graphs" is the same as "compile" off a GPU).
#
# Preparation, once, on the development machine (the GPU machine has torch, transformers, peft, accelerate but
# no diffusers, and no internet):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Then, with the device tool: run `bash benchmarks/gpu_session.sh` with carry [".whl"] and timeout_s 600.
# Results: JSON lines under $OUT (the device tool brings them back), to be copied into BENCHMARKS.md with the
# machine, date and versions printed first.
set -o pipefail
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
py="${PY:-python3}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PEFTBOOTH_CACHE="${PEFTBOOTH_CACHE:-/tmp/pbcache}"
if [ "${DRY:-0}" = 1 ]; then  # 2 CPU cores compile and start processes far slower: longer limits
  model=tiny device=cpu steps=2 warmup=1 images=2 slow=4
else
  model=sd15 device=cuda steps=20 warmup=3 images=16 slow=1
fi
adapters=lora,loha,lokr lycoris=loha,lokr layers=5 class_steps=(--class-image-steps 25 --plain-steps 50)
[ "${QUICK:-0}" = 1 ] && adapters=lora lycoris=lokr layers=1 images=1 class_steps=(--class-image-steps 2 --plain-steps 2)
deadline=$((530 * slow))  # seconds after the start: under 9 minutes; the device call's own limit is 600
step() {  # step NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, time left), or skip it when under 30 s are left
  local name=$1 limit=$(($2 * slow)); shift 2
  local left=$((deadline - SECONDS))
  if [ "${QUICK:-0}" = 1 ] && [[ "$name" == compile || "$name" == "cuda graphs" ]]; then
    echo "SKIPPED $name: QUICK=1" | tee -a "$OUT/steps.txt" >&2; return
  fi
  if [ "$left" -lt $((30 * slow)) ]; then echo "SKIPPED $name: ${left} s left" | tee -a "$OUT/steps.txt" >&2; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "$name: exit $? after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/steps.txt" >&2
}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH}"  # the package from this checkout, without installing it
cat > /tmp/pb_env.py <<'EOF'
import os, platform, torch, diffusers, peft, transformers, accelerate
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
print(name, "| torch", torch.__version__, "| diffusers", diffusers.__version__, "| peft", peft.__version__,
      "| transformers", transformers.__version__, "| accelerate", accelerate.__version__,
      "| python", platform.python_version(), flush=True)
from peftbooth.models.loading import cache_dir
from peftbooth.models.tiny import build_tiny_model
shape = os.environ["PB_MODEL"]
path = cache_dir() / ("sd15-random" if shape == "sd15" else "tiny-sd")
if not (path / "model_index.json").exists():
    build_tiny_model(path, shape=shape)  # random weights (the benchmarks read it from here)
EOF
PB_MODEL="$model" step "env and model" 150 "$py" /tmp/pb_env.py | tee "$OUT/env.txt"
bench=("$py" benchmarks/train_throughput.py --model "$model" --steps "$steps" --warmup "$warmup" --repeats 1)
# 1. the throughput targets: LoRA / LoHa / LoKr against floor and plain, bf16, 512 px, defaults
step "throughput" 240 "${bench[@]}" --adapters "$adapters" --modes floor,plain,peftbooth \
  --worker-timeout $((60 * slow)) --out "$OUT/train.jsonl"
# 2. the memory target: LoRA with gradient checkpointing
step "gradient checkpointing" 60 "${bench[@]}" --adapters lora --modes peftbooth --gradient-checkpointing \
  --out "$OUT/train_gc.jsonl"
# 2b. train's memory check (peftbooth.memory): its estimate beside the free memory and the measured peaks, per
# phase, for the defaults (bf16) and the low-memory preset: LoRA r16 + text encoder + prior preservation
step "memory check" 90 "$py" benchmarks/memory_check.py --model "$model" --steps "$steps" \
  --out "$OUT/memory_check.jsonl"
# 3. compiled LoRA, without and with CUDA graphs (the SD 1.5 UNet's first compile takes minutes)
step "compile" 150 "${bench[@]}" --adapters lora --modes peftbooth-compile --out "$OUT/train_compile.jsonl"
step "cuda graphs" 150 "${bench[@]}" --adapters lora --modes peftbooth-compile --compile-mode reduce-overhead \
  --out "$OUT/train_cudagraphs.jsonl"
# 4. smaller questions, if time is left
step "channels-last" 60 "${bench[@]}" --adapters lora --modes peftbooth-channels-last --out "$OUT/train_cl.jsonl"
step "class images" 60 "$py" benchmarks/class_images.py --model "$model" --num-images "$images" "${class_steps[@]}" \
  > "$OUT/class_images.jsonl"
step "lycoris layers" 40 "$py" benchmarks/lycoris_layers.py --device "$device" --layers "$layers" --adapters "$lycoris" \
  > "$OUT/layers.jsonl"
# PEFT's LoHa/LoKr forward (full delta weight, fp32 outputs after CUDA autocast's fp32 norms) against ours
step "lycoris peft forward" 90 "${bench[@]}" --adapters "$lycoris" --modes peftbooth-peft-forward \
  --out "$OUT/train_peft_forward.jsonl"
