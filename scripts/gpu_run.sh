#!/usr/bin/env bash
# One device call: set up the carried wheels, run the GPU test suite, the GPU bench and the tuning benchmark.
# Usage on the device machine (repo root):  bash scripts/gpu_run.sh [tests|tests1|tests2|focus|bench|tune|model|all]...
# (the dispatch overhead, about 4 minutes: dispatchab benchq accelq; see the case list below for the rest)
# (model: `layerzero bench --model llama --device cuda`, eager and compiled, ~8 minutes; not part of all)
# Results land in $OUT (or benchmarks/results/ when OUT is unset).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo unknown)
echo "card: $card"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
# the compiled hot path (layerzero._accel), built against this machine's Python and torch as pip install would
python3 setup.py -q build_ext --inplace >/tmp/accel_build.log 2>&1 || { echo "accel build failed:"; tail -20 /tmp/accel_build.log; }
python3 -c "import layerzero.accel as a; print('hot path:', a.status())"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
for step in "${steps[@]}"; do
  case "$step" in
    tests|all)
      echo "== pytest -m gpu"
      timeout 330 python3 -m pytest -q -rf --tb=line -m gpu -p no:cacheprovider --continue-on-collection-errors --timeout 120 tests 2>&1 | tee "$OUT/gpu_tests_${card}.log" | tail -40
      ;;
  esac
  case "$step" in
    tests1|tests2)
      # the GPU suite in two halves (the whole one outgrew one call): test files a-k, then l-z; failures
      # named as they come (-rf at the end may never print when a timeout cuts the run)
      if [ "$step" = tests1 ]; then files=(tests/test_[a-k]*.py); else files=(tests/test_[l-z]*.py); fi
      echo "== pytest -m gpu (${step}: ${#files[@]} files)"
      timeout 330 python3 -m pytest -v -rf --tb=line -m gpu -p no:cacheprovider --continue-on-collection-errors \
        --timeout 60 "${files[@]}" 2>&1 | tee "$OUT/gpu_${step}_${card}.log" | grep -E "FAILED|ERROR|passed|failed" | tail -40
      ;;
  esac
  case "$step" in
    focus)
      # the GPU tests of the files named in LZ_FOCUS (space-separated), e.g. a change's own tests
      echo "== pytest -m gpu ${LZ_FOCUS:-}"
      timeout 300 python3 -m pytest -q -rf --tb=short -m gpu -p no:cacheprovider --timeout 120 ${LZ_FOCUS:-} 2>&1 \
        | tee "$OUT/gpu_focus_${card}.log" | tail -30
      ;;
  esac
  case "$step" in
    bench|all)
      echo "== layerzero bench --device cuda"
      python3 -m layerzero.cli bench --device cuda --no-import --json "$OUT/bench_${card}.json" 2>&1 \
        | tee "$OUT/bench_${card}.md" | tail -40
      ;;
  esac
  case "$step" in
    varlen|all)
      if [ -f scripts/gpu_varlen_paged.py ]; then
        echo "== scripts/gpu_varlen_paged.py"
        timeout 300 python3 scripts/gpu_varlen_paged.py --quick 2>&1 | tee "$OUT/gpu_varlen_paged_${card}.log" | tail -40
      fi
      ;;
  esac
  case "$step" in
    benchq)
      echo "== layerzero bench --device cuda --quick"
      timeout 240 python3 -m layerzero.cli bench --device cuda --quick --no-import --json "$OUT/bench_${card}.json" 2>&1 \
        | tee "$OUT/bench_${card}.md" | tail -40
      ;;
  esac
  case "$step" in
    accel)
      echo "== the compiled hot path: tests/test_accel.py, then GPU tests through it"
      timeout 300 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/test_accel.py tests/test_accel_dispatch.py tests/test_ops_api.py \
        tests/test_dispatch_gpu.py tests/test_cuda_graphs.py tests/test_faults.py tests/test_compile_public_ops.py 2>&1 \
        | tee "$OUT/gpu_accel_tests_${card}.log" | tail -8
      ;;
  esac
  case "$step" in
    accelq)
      echo "== the compiled hot path's own tests (lz.* and dispatch) and the GPU dispatch tests"
      timeout 200 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/test_accel.py tests/test_accel_dispatch.py \
        tests/test_dispatch_gpu.py 2>&1 | tee "$OUT/gpu_accelq_tests_${card}.log" | tail -6
      ;;
  esac
  case "$step" in
    dispatchab)
      echo "== scripts/dispatch_ab.py: the dispatchers' compiled method vs their Python method, CUDA tensors"
      timeout 200 python3 scripts/dispatch_ab.py --device cuda --json "$OUT/dispatch_ab_${card}.json" 2>&1 \
        | tee "$OUT/dispatch_ab_${card}.md" | tail -12
      ;;
  esac
  case "$step" in
    benchqcpu)
      echo "== layerzero bench --device cpu --quick (CPU tensors on the GPU host)"
      timeout 240 python3 -m layerzero.cli bench --device cpu --quick --no-import --no-memory --json "$OUT/bench_cpu_on_${card}.json" 2>&1 \
        | tee "$OUT/bench_cpu_on_${card}.md" | tail -40
      ;;
  esac
  case "$step" in
    lce)
      echo "== scripts/lce_memory.py (H200 shape)"
      timeout 180 python3 scripts/lce_memory.py --device cuda --dtype bfloat16 --rows 8192 --hidden 2048 --vocab 128256 \
        --kernel torch_linear_cross_entropy_chunked --kernel liger_linear_cross_entropy \
        --kernel torch_linear_cross_entropy_naive --time 2>&1 | tee "$OUT/lce_memory_${card}.log" | tail -20
      ;;
  esac
  case "$step" in
    newtests)
      echo "== pytest -m gpu (compile, variants, flex, varlen, linear cross-entropy, patch)"
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 tests/test_compile_native.py \
        tests/test_compile.py tests/test_backends_flex.py tests/test_flex_compile.py tests/test_attention_variants.py \
        tests/test_integration_transformers_variants.py tests/test_integration_transformers.py \
        tests/test_linear_cross_entropy.py tests/test_patch_causal_lm.py tests/test_varlen_paged.py 2>&1 \
        | tee "$OUT/gpu_newtests_${card}.log" | tail -15
      ;;
  esac
  case "$step" in
    compile)
      echo "== scripts/compile_cpu_check.py --device cuda (compiled training step, 8 layers)"
      timeout 300 python3 scripts/compile_cpu_check.py --device cuda --dtype bfloat16 --hidden 2048 --heads 32 \
        --kv-heads 8 --layers 8 --batch 4 --seq 1024 --rounds 20 2>&1 | tee "$OUT/compile_check_${card}.log" | tail -12
      ;;
  esac
  case "$step" in
    model)
      echo "== layerzero bench --model llama --device cuda"
      timeout 560 python3 -m layerzero.cli bench --model llama --device cuda --json "$OUT" --budget-s 380 2>&1 \
        | tee "$OUT/model_bench_${card}.md" | tail -40
      ;;
  esac
  case "$step" in
    ops)
      echo "== scripts/gpu_model_ops.py (every kernel of the patched ops at the Llama shapes)"
      timeout 200 python3 scripts/gpu_model_ops.py --out "$OUT" 2>&1 | tee "$OUT/gpu_model_ops_${card}.log" | tail -30
      ;;
  esac
  case "$step" in
    tuned)
      echo "== layerzero tune at the Llama shapes (forward buckets), then the op breakdown and model19 on that database"
      export LAYERZERO_PERF_DB=/tmp/lz_tuned.db
      timeout 120 python3 -m layerzero.cli tune --ops rms_norm --shapes rows=8192,hidden=2048 --dtype bf16 2>&1 | tail -6
      timeout 120 python3 -m layerzero.cli tune --ops swiglu --shapes rows=8192,hidden=8192 --dtype bf16 2>&1 | tail -6
      timeout 120 python3 -m layerzero.cli tune --ops rope --shapes rows=262144,hidden=64,b=4,d=64 \
        --shapes rows=65536,hidden=64,b=4,d=64 --dtype bf16 2>&1 | tail -8
      timeout 200 python3 scripts/gpu_model_ops.py --out "$OUT" --tag tuned 2>&1 | grep -v Warning | tee "$OUT/gpu_model_ops_tuned_${card}.log" | tail -20
      ;;
  esac
  case "$step" in
    tunedgrad)
      echo "== layerzero tune at the Llama shapes, inference and training buckets (grad=0 and grad=1)"
      export LAYERZERO_PERF_DB=/tmp/lz_tuned.db
      timeout 150 python3 -m layerzero.cli tune --ops rms_norm --shapes rows=8192,hidden=2048 \
        --shapes rows=8192,hidden=2048,grad=1 --dtype bf16 2>&1 | tail -10
      timeout 150 python3 -m layerzero.cli tune --ops swiglu --shapes rows=8192,hidden=8192 \
        --shapes rows=8192,hidden=8192,grad=1 --dtype bf16 2>&1 | tail -8
      ;;
  esac
  case "$step" in
    online)
      echo "== online tuning on (LAYERZERO_ONLINE_TUNING=1, an empty performance database): the next model19 tunes as it runs"
      export LAYERZERO_ONLINE_TUNING=1 LAYERZERO_PERF_DB=/tmp/lz_online.db
      ;;
  esac
  case "$step" in
    model19)
      echo "== layerzero bench --model llama --device cuda, eager, issue-19 config (vocabulary 128256, 4 x 2048)"
      timeout 570 python3 -m layerzero.cli bench --model llama --device cuda --modes eager --workloads train,prefill \
        --vocab 128256 --seq 2048 --rounds 4 --json "$OUT" --budget-s 430 2>&1 \
        | tee "$OUT/model_bench_eager_llama128k_${card}.md" | tail -40
      tag=${LAYERZERO_PERF_DB:+_tuned}; [ -n "${LAYERZERO_ONLINE_TUNING:-}" ] && tag=_online
      ls src/layerzero/tuning/shipped/*.json >/dev/null 2>&1 && [ -z "$tag" ] && tag=_shipped
      mv -f "$OUT/model_bench_${card}.json" "$OUT/model_bench_eager_llama128k${tag}_${card}.json"
      ;;
  esac
  case "$step" in
    compiledtp)
      echo "== layerzero bench --model llama --device cuda, torch.compile(model): train + prefill, 4 rounds, no Liger"
      timeout 570 python3 -m layerzero.cli bench --model llama --device cuda --modes compiled --no-liger \
        --workloads train,prefill --rounds "${COMPILED_ROUNDS:-4}" --json "$OUT" --budget-s "${COMPILED_BUDGET_S:-420}" \
        2>&1 | grep -v -E "^[WIE][0-9]{4} |^USDT" | tee "$OUT/model_bench_compiled_${card}.md" | tail -30
      mv -f "$OUT/model_bench_${card}.json" "$OUT/model_bench_compiled_${card}.json"
      ;;
    compiledall)
      echo "== layerzero bench --model llama --device cuda, torch.compile(model): train, prefill, decode b1 (StaticCache)"
      timeout 560 python3 -m layerzero.cli bench --model llama --device cuda --modes compiled --no-liger \
        --workloads train,prefill,decode_b1 --rounds "${COMPILED_ROUNDS:-3}" --json "$OUT" \
        --budget-s "${COMPILED_BUDGET_S:-430}" 2>&1 | grep -v -E "^[WIE][0-9]{4} |^USDT" \
        | tee "$OUT/model_bench_compiled_all_${card}.md" | tail -30
      mv -f "$OUT/model_bench_${card}.json" "$OUT/model_bench_compiled_all_${card}.json"
      ;;
    compileddec)
      echo "== layerzero bench --model llama --device cuda, torch.compile(model): decode b1 + b8 (StaticCache), no Liger"
      timeout 570 python3 -m layerzero.cli bench --model llama --device cuda --modes compiled --no-liger \
        --workloads decode_b1,decode_b8 --rounds "${COMPILED_ROUNDS:-3}" --json "$OUT" \
        --budget-s "${COMPILED_BUDGET_S:-300}" 2>&1 | grep -v -E "^[WIE][0-9]{4} |^USDT" \
        | tee "$OUT/model_bench_compiled_decode_${card}.md" | tail -30
      mv -f "$OUT/model_bench_${card}.json" "$OUT/model_bench_compiled_decode_${card}.json"
      ;;
    modelc)
      echo "== layerzero bench --model llama --device cuda, compiled per layer (train, prefill, decode b1)"
      timeout 570 python3 -m layerzero.cli bench --model llama --device cuda --modes compiled --compile-scope layers \
        --workloads train,prefill,decode_b1 --rounds 3 --json "$OUT" --budget-s "${MODELC_BUDGET_S:-400}" 2>&1 \
        | tee "$OUT/model_bench_compiled_layers_${card}.md" | tail -40
      mv -f "$OUT/model_bench_${card}.json" "$OUT/model_bench_compiled_layers_${card}.json"
      ;;
  esac
  case "$step" in
    ship)
      echo "== shipped measurements: online-tuned model runs and row-op grids into one database, exported"
      ( export LAYERZERO_PERF_DB=/tmp/lz_ship.db LAYERZERO_ONLINE_TUNING=1
        timeout 300 python3 -m layerzero.cli bench --model llama --device cuda --modes eager --workloads train,prefill \
          --vocab 128256 --seq 2048 --rounds 1 --json /tmp/ship_a --budget-s 200 2>&1 | tail -12
        timeout 300 python3 -m layerzero.cli bench --model llama --device cuda --modes eager \
          --workloads train,prefill,decode_b1,decode_b8 --rounds 1 --json /tmp/ship_b --budget-s 200 2>&1 | tail -12
        unset LAYERZERO_ONLINE_TUNING
        mkdir -p "$OUT/shipped"
        python3 scripts/export_shipped.py /tmp/lz_ship.db --out "$OUT/shipped"
        for grad in "" ",grad=1"; do
          # the model bench's own row-op buckets, measured by the tuner (online tuning's short runs misjudge
          # Triton kernels with a backward; export_shipped.py drops their one-sample rows)
          timeout 150 python3 -m layerzero.cli tune --ops rms_norm,swiglu --shapes "rows=8192,hidden=2048$grad" \
            --shapes "rows=8192,hidden=8192$grad" --shapes "rows=4096,hidden=2048$grad" \
            --shapes "rows=4096,hidden=8192$grad" --dtype bf16 2>&1 | tail -6
          timeout 150 python3 -m layerzero.cli tune --ops rope --shapes "rows=4096,hidden=64,b=1,d=64$grad" \
            --shapes "rows=65536,hidden=64,b=4,d=64$grad" --shapes "rows=262144,hidden=64,b=4,d=64$grad" \
            --shapes "rows=262144,hidden=128,b=4,d=128$grad" --dtype bf16 2>&1 | tail -4
          args=(); for n in 1 16 256 4096 65536; do args+=(--shapes "rows=$n,hidden=1024$grad" --shapes "rows=$n,hidden=4096$grad"); done
          timeout 240 python3 -m layerzero.cli tune --ops rms_norm "${args[@]}" --dtype bf16 2>&1 | tail -4
          args=(); for n in 1 16 256 4096 65536; do args+=(--shapes "rows=$n,hidden=4096$grad" --shapes "rows=$n,hidden=16384$grad"); done
          timeout 240 python3 -m layerzero.cli tune --ops swiglu "${args[@]}" --dtype bf16 2>&1 | tail -4
        done
        mkdir -p "$OUT/shipped"
        python3 scripts/export_shipped.py /tmp/lz_ship.db --out "$OUT/shipped"
        mkdir -p src/layerzero/tuning/shipped
        cp "$OUT"/shipped/*.json src/layerzero/tuning/shipped/ )
      ;;
  esac
  case "$step" in
    ablation)
      echo "== scripts/gpu_patch_ablation.py: the training step with one part of patch() off at a time"
      timeout 300 python3 scripts/gpu_patch_ablation.py --vocab 128256 --seq 2048 \
        --variants "${ABLATION:-liger,lz,lz:norms=0,lz:rope=0,lz:mlp=0,lz:loss=0,lz@rms_norm=liger_rms_norm,liger}" 2>&1 \
        | grep -v "^USDT\|W1203" | tee "$OUT/gpu_patch_ablation_${card}.log" | tail -20
      ;;
  esac
  case "$step" in
    probe)
      echo "== scripts/gpu_training_probe.py: tuner inflation, linear cross-entropy chunking, memory-lean MLP"
      timeout 300 python3 scripts/gpu_training_probe.py --out "$OUT" --parts "${PROBE_PARTS:-tuner,lce,mlp}" 2>&1 \
        | grep -v "^USDT\|W1203" | tee "$OUT/gpu_training_probe_${card}.log" | tail -60
      ;;
  esac
  case "$step" in
    profile19)
      echo "== scripts/gpu_profile_model.py: eager, issue-19 config (vocabulary 128256, 4 x 2048)"
      timeout 300 python3 scripts/gpu_profile_model.py --vocab 128256 --seq 2048 --mode eager \
        --variants sdpa,layerzero+patch,liger --json "$OUT/gpu_profile_eager_llama128k_${card}.json" 2>&1 \
        | grep -v "^USDT\|W1203" | tee "$OUT/gpu_profile_eager_llama128k_${card}.log" | tail -120
      ;;
  esac
  case "$step" in
    profile16)
      echo "== scripts/gpu_profile_model.py: compiled per layer (vocabulary 32000, 4 x 1024)"
      timeout 400 python3 scripts/gpu_profile_model.py --vocab 32000 --seq 1024 --mode compiled \
        --variants sdpa,layerzero,layerzero+patch --json "$OUT/gpu_profile_compiled_layers_${card}.json" 2>&1 \
        | grep -v "^USDT\|W1203" | tee "$OUT/gpu_profile_compiled_layers_${card}.log" | tail -120
      ;;
  esac
  case "$step" in
    ctune)
      echo "== compiled-mode tuning (Inductor vs Liger in the pinned op) at the model bench's shapes, + its GPU tests"
      timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_compiled_tuning.py 2>&1 | tail -5
      timeout 420 python3 scripts/gpu_compiled_tuning.py --db /tmp/lz_compiled.db --json "$OUT" 2>&1 \
        | grep -v -E "^[WIE][0-9]{4} |^USDT" | tee "$OUT/compiled_tuning_${card}.log" | tail -30
      cp -f /tmp/lz_compiled.db "$OUT/lz_compiled_${card}.db" 2>/dev/null || true
      ;;
    compiledtuned)
      echo "== compiled model bench on the compiled-mode tuned database (train, prefill, decode b1)"
      [ -f /tmp/lz_compiled.db ] || cp -f .whl/lz_compiled.db /tmp/lz_compiled.db 2>/dev/null || true
      LAYERZERO_PERF_DB=/tmp/lz_compiled.db timeout 560 python3 -m layerzero.cli bench --model llama --device cuda \
        --modes compiled --no-liger --workloads train,prefill,decode_b1 --rounds "${COMPILED_ROUNDS:-3}" --json "$OUT" \
        --budget-s "${COMPILED_BUDGET_S:-430}" 2>&1 | grep -v -E "^[WIE][0-9]{4} |^USDT" \
        | tee "$OUT/model_bench_compiled_tuned_${card}.md" | tail -30
      mv -f "$OUT/model_bench_${card}.json" "$OUT/model_bench_compiled_tuned_${card}.json"
      ;;
  esac
  case "$step" in
    tune|all)
      if [ -f scripts/gpu_bench.py ]; then
        echo "== scripts/gpu_bench.py"
        python3 scripts/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench_${card}.log" | tail -60
      fi
      ;;
  esac
done
