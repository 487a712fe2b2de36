#!/usr/bin/env bash
# Everything measured on a lent GPU: fidelity per dtype, then HTTP throughput per workload.
# Usage (device machine, repo root, wheels carried in .whl): bash benchmarks/gpu_suite.sh OUTDIR
# ONLY="fidelity graphs qwen2_16_512" runs just those parts (a device call has a time limit);
# WITH_EAGER=1 adds gte-Qwen2 served without torch.compile; PROFILE=1 profiles instead.
set -u
out=${1:-/tmp/gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch; print('torch', torch.__version__, 'flash attention:', torch.backends.cuda.is_flash_attention_available())"
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
# Server log lines are dropped except the runner's closing summary (batches, device busy).
run() { name=$1; shift; want "$name" || return 0; python3 benchmarks/serve.py "$@" --out "$out/$name.json" 2>&1 | grep -v -e Loading -e Writing -e "Batch\." -e "HTTP/1.1" -e "method=" | tail -22 | tee "$out/$name.txt"; }
if want fidelity; then
  python3 benchmarks/gpu_fidelity.py --shape bert-base --shape gte-qwen2-1.5b 2>&1 | grep -v -e Loading -e Writing | tee "$out/fidelity.txt"
fi
if want graphs; then  # CUDA graph replays against the plain forward (CI has no GPU)
  python3 benchmarks/gpu_graph_check.py 2>&1 | grep -v -e Loading -e Writing | tee "$out/graph_check.txt"
fi
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
# The HTTP side in four processes of its own: with BERT-base one process holds the GPU back.
run bert_16_512_http_workers_4 --shape bert-base --lengths 16-512 --num-inputs 20000 --concurrency 16,64,128 --reference-batch-sizes 64,128 --server-args=--http-workers=4
