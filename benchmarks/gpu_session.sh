#!/usr/bin/env bash
# The prepared GPU check of the "fast and lean" targets, in two parts that each fit one 10-minute device call.
# NOT YET RUN ON A GPU: no session so far was lent one. `DRY=1` runs the same commands on the tiny model and the
# CPU with 2 steps (a few minutes), to catch plumbing mistakes here before device time is spent on them.
#
# Preparation, once, on the development machine (the GPU machine has torch, transformers, peft, accelerate but
# no diffusers, and no internet):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Then, with the device tool (carry [".whl"]):
#   bash benchmarks/gpu_session.sh 1   # layer costs; LoRA/LoHa/LoKr: floor, plain, peftbooth, PEFT's forward
#   bash benchmarks/gpu_session.sh 2   # LoRA: memory with gradient checkpointing, --compile, CUDA graphs
#                                      # (--compile-mode reduce-overhead), --channels-last; class images
# Results: JSON lines under $OUT (the device tool brings them back), to be copied into BENCHMARKS.md with the
# machine, date and versions printed at the start.
set -o pipefail
part="${1:-1}"
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
py="${PY:-python3}"  # PY=.venv/bin/python for a dry run here
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PEFTBOOTH_CACHE="${PEFTBOOTH_CACHE:-/tmp/pbcache}"
if [ "${DRY:-0}" = 1 ]; then  # 2 CPU cores compile and start processes far slower: longer limits
  model=tiny device=cpu steps=2 warmup=1 images=2 slow=4
else
  model=sd15 device=cuda steps=20 warmup=3 images=16 slow=1
fi
limit() { echo $(($1 * slow)); }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH}"  # the package from this checkout, without installing it
PB_MODEL="$model" "$py" - <<'EOF' | tee "$OUT/env-$part.txt" || exit 1
import os, platform, torch, diffusers, peft, transformers, accelerate
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
print(name, "| torch", torch.__version__, "| diffusers", diffusers.__version__, "| peft", peft.__version__,
      "| transformers", transformers.__version__, "| accelerate", accelerate.__version__,
      "| python", platform.python_version())
from peftbooth.models import build_tiny_model, cache_dir
shape = os.environ["PB_MODEL"]
path = cache_dir() / ("sd15-random" if shape == "sd15" else "tiny-sd")
if not (path / "model_index.json").exists():
    build_tiny_model(path, shape=shape)  # random weights (the benchmarks read it from here)
EOF
bench=("$py" benchmarks/train_throughput.py --model "$model" --steps "$steps" --warmup "$warmup" --repeats 1)
if [ "$part" = 1 ]; then  # about 6 min on the GPU machine (estimate: ~25 s per worker process)
  timeout $(limit 120) "$py" benchmarks/lycoris_layers.py --device "$device" | tee "$OUT/layers.jsonl"
  timeout $(limit 420) "${bench[@]}" --peft-forward --out "$OUT/train.jsonl"
else  # LoRA only: compiling the SD 1.5 UNet takes minutes, so LoHa/LoKr compiled runs need a third call
  timeout $(limit 100) "${bench[@]}" --adapters lora --modes floor,peftbooth --gradient-checkpointing \
    --out "$OUT/train_gc.jsonl"
  timeout $(limit 180) "${bench[@]}" --adapters lora --modes peftbooth,peftbooth-compile,peftbooth-channels-last \
    --out "$OUT/train_compile.jsonl"
  timeout $(limit 150) "${bench[@]}" --adapters lora --modes peftbooth-compile --compile-mode reduce-overhead \
    --out "$OUT/train_cudagraphs.jsonl"
  timeout $(limit 90) "$py" benchmarks/class_images.py --model "$model" --num-images "$images" \
    | tee "$OUT/class_images.jsonl"
fi
