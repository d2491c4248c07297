#!/usr/bin/env bash
# The issue #13/#14/#15 figures on one H200, in phases that each fit one device call:
#   bash benchmarks/h200_session.sh A|B|C|D  (OUT=dir for logs and JSON; default /tmp/out)
# Each step runs in its own process under its own timeout, so one failure costs one row.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T="python3 benchmarks/throughput.py"
SETS=single-stream,batch-16,sharegpt-shaped
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? $(date +%T)"
  grep -v " INFO \|^\[transformers\]\|it/s\]" "$OUT/$name.log" | grep "^|\|Error\|error\|ratio\|x \|tok/s\|GB/s\|TFLOP" | tail -14
}
case "${1:-A}" in
A)
  step fp8_kernels 100 python3 benchmarks/gpu_fp8.py
  step int_gemm 130 python3 benchmarks/gpu_int4.py kernels
  step bf16 120 $T --datasets $SETS --json "$OUT/bf16.json"
  step fp8 110 $T --datasets $SETS --quantization fp8 --json "$OUT/fp8.json"
  step fp8kv 90 $T --datasets sharegpt-shaped --kv-cache-dtype fp8 --json "$OUT/fp8kv.json"
  ;;
B)
  step gptq 130 $T --model random:llama-3.1-8b:gptq --dtype bfloat16 --datasets $SETS --json "$OUT/gptq.json"
  step awq 130 $T --model random:llama-3.1-8b:awq --dtype bfloat16 --datasets $SETS --json "$OUT/awq.json"
  step bnb 90 $T --datasets single-stream,batch-16 --quantization bitsandbytes --json "$OUT/bnb.json"
  step gptq70b 110 $T --model random:llama-3.1-70b:gptq --load-format dummy --dtype bfloat16 --datasets single-stream --json "$OUT/gptq70b.json"
  ;;
C)
  step correctness 80 python3 benchmarks/gpu_correctness.py --skip-8b --skip-embed
  step gptq_tuned 150 env PAGEDLLM_INT_GEMM_UNPACK=reshape PAGEDLLM_INT_GEMM_DENSE_MIN_M=64 \
    $T --model random:llama-3.1-8b:gptq --dtype bfloat16 --datasets $SETS --json "$OUT/gptq_tuned.json"
  step structured 150 python3 benchmarks/structured_outputs.py --random-8b --batches 1,16,64 --rounds 2
  step moe_kernel 45 python3 benchmarks/moe_kernel.py
  ;;
D)  # model families next to the same-session Llama-3.1-8B (all dummy weights: same speed)
  step bf16_dummy 150 $T --load-format dummy --datasets single-stream,sharegpt-shaped --json "$OUT/bf16_dummy.json"
  step mixtral 240 $T --model random:mixtral-8x7b --load-format dummy --datasets single-stream,sharegpt-shaped --json "$OUT/mixtral.json"
  step gemma2 180 $T --model random:gemma-2-9b --load-format dummy --datasets single-stream,sharegpt-shaped --json "$OUT/gemma2.json"
  ;;
E)  # structured outputs per step (tokenizer carried in .whl/smol_tok: the model package is absent)
  step structured 220 python3 benchmarks/structured_outputs.py --random-8b --tokenizer .whl/smol_tok --batches 1,16,64 --rounds 2 --json "$OUT/structured.json"
  step moe_kernel 60 python3 benchmarks/moe_kernel.py
  ;;
F)  # issue #13: the GEMV sweep (winners -> gemv_config.TUNED / $OUT/gemv.json), then the
    # tiny GPTQ/AWQ models through the kernels (eager: 80 s never covered ten engines' graphs)
  step gemv 420 python3 benchmarks/gpu_gemv.py --json "$OUT/gemv.json"
  step int4_correct 170 python3 benchmarks/gpu_int4.py correctness
  ;;
G)  # issue #13 end to end after the GEMV sweep: its winners and thresholds, dummy weights
  step gemv 240 python3 benchmarks/gpu_gemv.py --json "$OUT/gemv.json"
  export PAGEDLLM_GEMV_CONFIG="$OUT/gemv.json"
  INT=$(grep -o "INT_GEMV_MAX_M = [0-9]*" "$OUT/gemv.log" | awk '{print $3}')
  FP8=$(grep -o "FP8_GEMV_MAX_M = [0-9]*" "$OUT/gemv.log" | awk '{print $3}')
  export PAGEDLLM_INT_GEMV_MAX_M=${INT:-1} PAGEDLLM_FP8_GEMV_MAX_M=${FP8:-1}
  echo "thresholds int ${PAGEDLLM_INT_GEMV_MAX_M} fp8 ${PAGEDLLM_FP8_GEMV_MAX_M}"
  Q="--load-format dummy --datasets single-stream,batch-16"
  step bf16_q 90 $T $Q --json "$OUT/bf16_q.json"
  step gptq_q 100 $T --model random:llama-3.1-8b:gptq --dtype bfloat16 $Q --json "$OUT/gptq_q.json"
  step fp8_q 100 $T --quantization fp8 $Q --json "$OUT/fp8_q.json"
  step int4_correct 100 python3 benchmarks/gpu_int4.py correctness
  ;;
H)  # GPU correctness of the model families (the CPU parity tests, run where the engine picks
    # cuda: Triton attention, KV groups freeing sliding-window blocks, fused MoE, CUDA graphs),
    # then GPTQ with dummy weights that take the plain (no act-order) kernel path
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/pytest-*.whl \
    .whl/pluggy-*.whl .whl/iniconfig-*.whl 2>/dev/null
  step families_gpu 300 python3 -m pytest -q -p no:cacheprovider -rf \
    tests/engine/test_hf_parity_families.py tests/engine/test_sliding_window_kv.py
  grep -E "passed|failed|FAILED|Error" "$OUT/families_gpu.log" | tail -20
  Q="--load-format dummy --datasets single-stream,batch-16"
  step gptq_plain 110 $T --model random:llama-3.1-8b:gptq --dtype bfloat16 $Q --json "$OUT/gptq_plain.json"
  step bf16_ref 90 $T $Q --json "$OUT/bf16_ref.json"
  ;;
O)  # issue #13's end-to-end table on the current tree (GEMVs, split-KV, dense GEMV in), dummy
  # weights, same session: bf16, fp8 W8A8, fp8 KV cache, GPTQ int4
  D="--load-format dummy"
  step bf16 110 $T $D --datasets $SETS --json "$OUT/bf16.json"
  step fp8 110 $T $D --datasets $SETS --quantization fp8 --json "$OUT/fp8.json"
  step fp8kv 90 $T $D --datasets single-stream,sharegpt-shaped --kv-cache-dtype fp8 --json "$OUT/fp8kv.json"
  step gptq 120 $T --model random:llama-3.1-8b:gptq --dtype bfloat16 $D --datasets $SETS --json "$OUT/gptq.json"
  ;;
P)  # the rest of O's table: AWQ int4, the 70B in int4 on one GPU, bf16 again (same session)
  D="--load-format dummy"
  step awq 120 $T --model random:llama-3.1-8b:awq --dtype bfloat16 $D --datasets $SETS --json "$OUT/awq.json"
  step gptq70b 150 $T --model random:llama-3.1-70b:gptq --dtype bfloat16 $D --datasets single-stream,batch-16 --json "$OUT/gptq70b.json"
  step bf16 110 $T $D --datasets $SETS --json "$OUT/bf16.json"
  ;;
Q)  # issue #13: the fused int4 GEMM's tile sweep at M = 16/64/256, then GPTQ end to end with
  # its winners (PAGEDLLM_INT_GEMM_CONFIG) and dense threshold next to today's defaults
  step int_gemm_sweep 300 python3 benchmarks/gpu_int_gemm_sweep.py --ms 16,64,256 --budget-s 230 --json "$OUT/int_gemm.json"
  grep "best:\|dense path" "$OUT/int_gemm_sweep.log"
  DMIN=$(cat "$OUT/int_gemm_dense_min_m.txt" 2>/dev/null || echo 64)
  D="--load-format dummy"
  step gptq_tuned 110 env PAGEDLLM_INT_GEMM_CONFIG="$OUT/int_gemm.json" PAGEDLLM_INT_GEMM_DENSE_MIN_M=${DMIN:-64} \
    $T --model random:llama-3.1-8b:gptq --dtype bfloat16 $D --datasets batch-16,sharegpt-shaped --json "$OUT/gptq_tuned.json"
  step gptq_base 90 $T --model random:llama-3.1-8b:gptq --dtype bfloat16 $D --datasets batch-16,sharegpt-shaped --json "$OUT/gptq_base.json"
  ;;
R)  # after phase Q: GPTQ with the new M <= 16 / M <= 64 tiles, and the dense threshold at 128
  D="--load-format dummy"
  step gptq 120 $T --model random:llama-3.1-8b:gptq --dtype bfloat16 $D --datasets $SETS --json "$OUT/gptq.json"
  step gptq_d128 100 env PAGEDLLM_INT_GEMM_DENSE_MIN_M=128 $T --model random:llama-3.1-8b:gptq --dtype bfloat16 $D --datasets batch-16,sharegpt-shaped --json "$OUT/gptq_d128.json"
  step bf16 100 $T $D --datasets $SETS --json "$OUT/bf16.json"
  ;;
N)  # issue #16, last: decode-/prefill-heavy next to the earlier runs, then `pagedllm serve`'s
  # start-up with the forked engine core (warm Triton cache, as in run M) and its latency
  D="--load-format dummy"
  step bf16 220 $T $D --datasets prefill-heavy,decode-heavy,single-stream --json "$OUT/bf16.json"
  grep -o '"startup": {[^}]*}' "$OUT/bf16.log" | head -1
  step serve 200 python3 benchmarks/gpu_serve.py --rates 10,20 --num-prompts 400 $D --out "$OUT/serve"
  grep "ready in" "$OUT/serve.log"
  ;;
M)  # issue #16 after the runtime split count: a cold start (first engine of a fresh machine),
  # correctness, decode attention, serving latency (dummy weights throughout)
  D="--load-format dummy"
  step bf16 150 $T $D --datasets single-stream,batch-16,sharegpt-shaped --json "$OUT/bf16.json"
  grep -o '"startup": {[^}]*}' "$OUT/bf16.log" | head -1
  step correctness 90 python3 benchmarks/gpu_correctness.py --skip-8b --skip-embed
  grep "PASS\|FAIL\|equal" "$OUT/correctness.log" | tail -3
  step decode_attn 60 python3 benchmarks/gpu_decode_attn.py
  step serve 200 python3 benchmarks/gpu_serve.py --rates 10,20 --num-prompts 400 $D --out "$OUT/serve"
  grep "ready in" "$OUT/serve.log"
  step gptq 60 $T --model random:llama-3.1-8b:gptq --dtype bfloat16 $D --datasets single-stream,batch-16
  ;;
L)  # issue #16 / #13 after phase K's changes (dense GEMV, 64-key split partitions, SiLU fused
  # into the down GEMV): the fused form's check and time, correctness, end to end, a profile
  step gemv_down 120 python3 benchmarks/gpu_gemv.py --kinds bf16,fp8 --shapes down --ms 1,2
  step correctness 90 python3 benchmarks/gpu_correctness.py --skip-8b --skip-embed
  D="--load-format dummy"
  step bf16 120 $T $D --datasets single-stream,batch-16,sharegpt-shaped --json "$OUT/bf16.json"
  step bf16_nofuse 60 env PAGEDLLM_DENSE_GEMV_MAX_M=0 $T $D --datasets single-stream --json "$OUT/bf16_nofuse.json"
  step fp8 60 $T $D --quantization fp8 --datasets single-stream,batch-16 --json "$OUT/fp8.json"
  step gptq 60 $T --model random:llama-3.1-8b:gptq --dtype bfloat16 $D --datasets single-stream,batch-16 --json "$OUT/gptq.json"
  step profile 90 python3 benchmarks/gpu_profile.py $D --batches 1 --prompt-len 600 --top 30
  ;;
K)  # issue #16 / #13: the dense (bf16) GEMV against cuBLAS and small-batch decode attention
  # (split sizes), then end to end, each lever added in turn, dummy weights
  step gemv_bf16 150 python3 benchmarks/gpu_gemv.py --kinds bf16 --ms 1,2 --wide --json "$OUT/gemv_bf16.json"
  step decode_attn 100 python3 benchmarks/gpu_decode_attn.py
  KEYS=$(grep "^| 1 | 768 |" "$OUT/decode_attn.log" | awk -F'|' '{print $7}' | grep -o "k[0-9]*" | tr -d k)
  echo "split-KV min keys from the sweep: ${KEYS:-none}"
  Q="--load-format dummy --datasets single-stream,batch-16"
  G="PAGEDLLM_GEMV_CONFIG=$OUT/gemv_bf16.json"
  step bf16_base 70 $T $Q --json "$OUT/bf16_base.json"
  step bf16_gemv 70 env $G $T $Q --json "$OUT/bf16_gemv.json"
  step bf16_gemv_keys 70 env $G PAGEDLLM_SPLIT_KV_MIN_KEYS=${KEYS:-256} $T $Q --json "$OUT/bf16_gemv_keys.json"
  step fp8_gemv_keys 60 env $G PAGEDLLM_SPLIT_KV_MIN_KEYS=${KEYS:-256} $T $Q --quantization fp8 --json "$OUT/fp8_gemv_keys.json"
  ;;
J)  # issue #13: the wide M <= 2 GEMV sweep (int4 in-place planes, more splits and tiles), then
  # end to end with its winners next to bf16, dummy weights
  step gemv_wide 270 python3 benchmarks/gpu_gemv.py --kinds int4,fp8 --ms 1,2 --wide --json "$OUT/gemv_wide.json"
  export PAGEDLLM_GEMV_CONFIG="$OUT/gemv_wide.json"
  step bf16 100 $T --load-format dummy --datasets single-stream,batch-16 --json "$OUT/bf16.json"
  step fp8 100 $T --load-format dummy --quantization fp8 --datasets single-stream,batch-16 --json "$OUT/fp8.json"
  step gptq 110 $T --model random:llama-3.1-8b:gptq --load-format dummy --dtype bfloat16 --datasets single-stream,batch-16 --json "$OUT/gptq.json"
  ;;
I)  # after the incremental host step: correctness on CUDA, then sharegpt-shaped A/B against
    # an older tree in $OLD (default .gpu/old, e.g. `git archive REV | tar -x -C .gpu/old`)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/pytest-*.whl \
    .whl/pluggy-*.whl .whl/iniconfig-*.whl 2>/dev/null
  step families_gpu 300 python3 -m pytest -q -p no:cacheprovider -rf \
    tests/engine/test_hf_parity_families.py tests/engine/test_sliding_window_kv.py
  grep -E "passed|failed|FAILED" "$OUT/families_gpu.log" | tail -8
  step correctness 120 python3 benchmarks/gpu_correctness.py --skip-8b --skip-embed
  OLD=${OLD:-.gpu/old}
  S="--load-format dummy --datasets sharegpt-shaped,single-stream"
  for r in 1 2; do
    step old_$r 120 env PYTHONPATH=/tmp/site:$OLD python3 $OLD/benchmarks/throughput.py $S --json "$OUT/old_$r.json"
    step new_$r 120 $T $S --json "$OUT/new_$r.json"
  done
  ;;
esac
