#!/usr/bin/env bash
# Everything measured on a lent GPU in one call: fidelity per dtype, then HTTP throughput.
# Usage (device machine, repo root, wheels carried in .whl): bash benchmarks/gpu_suite.sh OUTDIR
set -u
out=${1:-/tmp/gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch, inspect; from torch.nn.attention.varlen import varlen_attn; print(torch.__version__, inspect.signature(varlen_attn))"
[ -n "${SKIP_FIDELITY:-}" ] || python3 benchmarks/gpu_fidelity.py --shape bert-base --shape gte-qwen2-1.5b 2>&1 | grep -v -e Loading -e Writing | tee "$out/fidelity.txt"
# Server log lines are dropped except the runner's closing summary (batches, device busy).
run() { name=$1; shift; python3 benchmarks/serve.py "$@" --out "$out/$name.json" 2>&1 | grep -v -e Loading -e Writing -e "Batch\." -e "HTTP/1.1" | tail -22 | tee "$out/$name.txt"; }
[ -n "${WITH_EAGER:-}" ] && run qwen2_16_512_eager --shape gte-qwen2-1.5b --lengths 16-512 --num-inputs 6000 --concurrency 64 --skip-reference --server-args=--no-compile
if [ -n "${PROFILE:-}" ]; then
  for shape in bert-base gte-qwen2-1.5b; do
    python3 benchmarks/profile_forward.py --shape $shape 2>&1 | grep -v -e Loading -e Writing | tee "$out/profile_$shape.txt"
  done
  run bert_pyspy --shape bert-base --lengths 16-512 --num-inputs 20000 --concurrency 64 --skip-reference --py-spy "$out/bert_stacks.raw"
  exit 0
fi
run qwen2_16_512 --shape gte-qwen2-1.5b --lengths 16-512 --num-inputs 6000 --concurrency 16,64,128 --reference-batch-sizes 32,64
run qwen2_4_64 --shape gte-qwen2-1.5b --lengths 4-64 --num-inputs 20000 --inputs-per-request 32 --concurrency 16,64,128 --reference-batch-sizes 128,256
run bert_16_512 --shape bert-base --lengths 16-512 --num-inputs 20000 --concurrency 16,64 --reference-batch-sizes 64,128
