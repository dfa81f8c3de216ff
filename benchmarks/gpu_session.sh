#!/usr/bin/env bash
# The prepared GPU check of the "fast and lean" targets, in two parts that each fit one 10-minute device call.
# NOT YET RUN: no session so far was lent a GPU. Expect to fix small things on its first run.
#
# Preparation, once, on the development machine (the GPU machine has torch, transformers, peft, accelerate but
# no diffusers, and no internet):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Then, with the device tool (carry [".whl"]):
#   bash benchmarks/gpu_session.sh 1     # layer costs, then LoRA / LoHa / LoKr: floor, plain, peftbooth, PEFT forward
#   bash benchmarks/gpu_session.sh 2     # gradient checkpointing (the memory target), --compile, class images
# Results: JSON lines under $OUT (the device tool brings them back), to be copied into BENCHMARKS.md with the
# machine, date and versions printed at the start.
set -o pipefail
part="${1:-1}"
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PEFTBOOTH_CACHE=/tmp/pbcache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH}"  # the package from this checkout, without installing it
python3 - <<'EOF' | tee "$OUT/env-$part.txt"
import platform, torch, diffusers, peft, transformers, accelerate
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| diffusers", diffusers.__version__,
      "| peft", peft.__version__, "| transformers", transformers.__version__, "| accelerate", accelerate.__version__,
      "| python", platform.python_version())
from peftbooth.models import build_tiny_model, cache_dir
path = cache_dir() / "sd15-random"
if not (path / "model_index.json").exists():
    build_tiny_model(path, shape="sd15")  # SD 1.5 shapes, random weights (the benchmarks read it from here)
EOF
if [ "$part" = 1 ]; then
  timeout 120 python3 benchmarks/lycoris_layers.py --device cuda | tee "$OUT/layers.jsonl"
  timeout 420 python3 benchmarks/train_throughput.py --model sd15 --steps 30 --repeats 1 --peft-forward \
    --out "$OUT/train.jsonl"
else
  timeout 200 python3 benchmarks/train_throughput.py --model sd15 --steps 30 --repeats 1 --adapters lora \
    --gradient-checkpointing --out "$OUT/train_gc.jsonl"
  timeout 240 python3 benchmarks/train_throughput.py --model sd15 --steps 30 --repeats 1 --compile \
    --adapters lora,loha,lokr --out "$OUT/train_compile.jsonl"
  timeout 120 python3 benchmarks/class_images.py --model sd15 --num-images 16 | tee "$OUT/class_images.jsonl"
fi
