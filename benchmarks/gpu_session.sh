#!/usr/bin/env bash
# One prepared benchmark session for the GPU machine (one H100/H200, 16 cores, no internet), run from
# the repository root:
#
#     bash benchmarks/gpu_session.sh           # GPU sizes, about 11 minutes in all (BUDGET_S=540 skips the last steps;
#                                              # ONLY="their names" runs them in a second call)
#     bash benchmarks/gpu_session.sh --smoke   # tiny sizes: runs on a CPU in a few minutes (a test)
#
# (a) installs the wheels in .whl (made here by ../shared/gpu/wheels.sh) into /tmp/site, as
#     /work/shared/gpu/README.md says; without .whl it uses this Python's packages;
# (b) runs each benchmark under its own `timeout`, most important first: a tiny cache and `gsae verify` of it
#     (store_check: where it fails, as with zarr 3.4 on 2026-11-28, every other step is skipped), the CUDA tests alone,
#     cache_throughput (writer threads, gsae's default, and encoder processes), end_to_end, a small cache and
#     the feed (fresh stream and after an epoch) and stream ratios, cache_throughput into memory (also with 8
#     writer threads, and with the checksum holding the GIL), cache_write, the writer by threads (and with the
#     checksum holding the GIL), compressing alone by threads, where the writer holds the GIL (py-spy), the
#     rest of the stream and training steps, sparsify_speed, then the whole test suite with CUDA visible (232 s
#     on the H200 machine with -n 14: give it a call of its own); torch.compile and the Gram sweep only when
#     ONLY names them; SKIP_TESTS=1 leaves the
#     suite out; every script prints its figures as they exist; a step that fails or times out does not
#     stop the others; a step whose time is not left in the budget is skipped; at the end the key lines
#     are printed again together.
# Environment: PYTHON (default python3), BUDGET_S (seconds for the whole script), GSAE_SESSION_DIR (work
# folder, default a fresh one under /tmp, removed at the end), OUT (if set: a copy of the log and of
# each step's output goes there), ONLY (step names to run, e.g. "end_to_end feed": a second call on a warm
# machine; the model and the small cache are made whenever a step needs them).
set -u
cd "$(dirname "$0")/.." || exit 2
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_session.sh [--smoke]"; exit 2 ;;
esac
START=$SECONDS
PY=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3}"; exit 2; }
if [ $SMOKE = 1 ]; then BUDGET=${BUDGET_S:-1500}; else BUDGET=${BUDGET_S:-540}; fi
# sparsify takes its Triton decoder wherever triton imports (a CUDA build of torch brings it), which fails on a
# CPU ("0 active drivers"): its eager decoder in the smoke run, which checks the steps run, not their figures
[ $SMOKE = 1 ] && export SPARSIFY_DISABLE_TRITON=${SPARSIFY_DISABLE_TRITON:-1}
RESERVE=8  # seconds kept for the summary and the clean-up
if [ -n "${GSAE_SESSION_DIR:-}" ]; then
  W=$GSAE_SESSION_DIR; mkdir -p "$W"
else
  W=$(mktemp -d /tmp/gsae-session.XXXXXX) || exit 2
  trap 'rm -rf "$W"' EXIT
fi
mkdir -p "$W/bin" "$W/logs"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then exec > >(tee -a "$OUT/gpu_session.log") 2>&1; fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

echo "== gpu_session $([ $SMOKE = 1 ] && echo --smoke) — $(date -u +%FT%TZ), budget ${BUDGET}s, work folder $W"

# ---------------------------------------------------------------- (a) wheels
if ls .whl/*.whl >/dev/null 2>&1; then
  t0=$SECONDS
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 3
  echo "== wheels: $(ls .whl/*.whl | wc -l) from .whl installed into /tmp/site in $((SECONDS - t0)) s"
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  echo "== wheels: no .whl folder: using the packages of $PY"
fi
"$PY" - <<'EOF'
import importlib, os, platform
import torch
gpu = f"{torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" \
    if torch.cuda.is_available() else "no CUDA device"
print(f"== python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}, "
      f"{os.cpu_count()} cores", flush=True)
found = []
for name in ("transformers", "zarr", "numcodecs", "dask", "datasets", "einops", "triton", "sparsify"):
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:
        found.append(f"{name} MISSING ({type(exc).__name__})")
print("== packages: " + ", ".join(found), flush=True)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
df -h /tmp . 2>/dev/null | tail -n +2 | sort -u | awk '{print "== disk " $6 ": " $4 " free"}'

# gsae through a wrapper on PATH (timeout cannot run a shell function)
cat > "$W/bin/gsae" <<EOF
#!/bin/sh
exec "$PY" -c 'import sys; sys.argv[0] = "gsae"; import cli; cli.main()' "\$@"
EOF
chmod +x "$W/bin/gsae"
export PATH="$W/bin:$PATH"

# ---------------------------------------------------------------- (b) the steps
ORDER=()
step() {  # step NAME MAX_SECONDS COMMAND...: run under timeout, bounded by what is left of the budget
  local name=$1 max=$2; shift 2
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  local limit=$((max < left ? max : left))
  local always="model store_check small_cache"
  [[ " ${ONLY:-} " == *" train_"* ]] && always+=" group_small"  # the train steps need its grouping
  if [ -n "${ONLY:-}" ] && [[ " $always $ONLY " != *" ${name%_summary} "* ]]; then return 0; fi
  ORDER+=("$name")
  if [ "$limit" -lt 20 ]; then
    echo "== $name: SKIPPED (${left}s of the budget left)" | tee "$W/logs/$name.log"
    return 0
  fi
  echo
  echo "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$W/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "== $name: TIMED OUT after ${limit}s" | tee -a "$W/logs/$name.log"
  elif [ "$rc" != 0 ]; then
    echo "== $name: FAILED (exit $rc)" | tee -a "$W/logs/$name.log"
  fi
  echo "== $name: $((SECONDS - t0)) s (session at $((SECONDS - START)) s of ${BUDGET})"
}

if [ $SMOKE = 1 ]; then
  MODEL_ARGS=(--layers 3 --hidden 64 --heads 4 --context-length 64)
  CORPUS_TOKENS=40000
  E2E_ARGS=(--tokens 8192 --batch-size 1024 --context-length 64 --expansion 8 --k 8)
  WRITE_ARGS=(--layers 3 --d-model 64 --chunks 4 --repeats 1 --batch-rows 1000 --forward-ms 5 --writer-pending 2)
  CACHE_ARGS=(--tokens 30000 --context-length 64 --batch-size 16 --chunk-tokens 500)
  STREAM_ARGS=(--chunks 8 --group-size 2 --batch-size 1024 --repeats 1)
  FEED_ARGS=(--group-size 2 --expansion 8 --k 8 --batch-size 1024 --steps 3 --repeats 1)
  TRAIN_ARGS=(--tokens 8192 --batch-size 1024 --expansion 8 --k 8)
  THROUGHPUT_ARGS=(--tokens 4000 --batch-size 8 --context-length 64)
  THROUGHPUT_LONG_TOKENS=16000
  SPEED_SHAPES=("64 8 8" "96 8 8 16")   # d_in expansion k...
  SPEED_ARGS=(--batch-size 1024 --warmup 1 --steps 2 --repeats 1)
  FRESH_ARGS=(--gib 1 --file-gib 1)
  T_E2E=600 T_WRITE=120 T_CACHE=120 T_STREAM=120 T_FEED=120 T_THROUGHPUT=120 T_SPEED=180 T_COMPILE=180 T_TESTS=600
else
  MODEL_ARGS=()   # Pythia-70M's shape: 6 layers, d 512, 8 heads, intermediate 2048, rotary_pct 0.25
  CORPUS_TOKENS=2300000  # cache_throughput_long caches 2M
  E2E_ARGS=()     # 1M tokens per SAE, batch 8192 (32 × 256), 512 → 8192, k 32
  # 64 chunks: 8 batches of 32 × 1023 rows; the host idles 37 ms a batch, the bare forward's time for one on
  # the H200; 4 in flight is the writer's rule before it kept a whole batch's chunks
  WRITE_ARGS=(--layers 6 --d-model 512 --chunks 64 --repeats 2 --batch-rows 32736 --forward-ms 37 --writer-pending 4)
  CACHE_ARGS=(--tokens 300000 --context-length 256 --batch-size 32)
  STREAM_ARGS=(--chunks 32 --batch-size 8192 --scaling)
  FEED_ARGS=(--expansion 16 --k 32 --batch-size 8192 --steps 12)
  TRAIN_ARGS=(--tokens 1007616 --batch-size 8192 --expansion 16 --k 32)  # as end_to_end.py's G* run
  THROUGHPUT_ARGS=(--tokens 500000 --batch-size 32 --context-length 1024)
  THROUGHPUT_LONG_TOKENS=2000000  # 4 × as long: ~6 s of cache, the start-up a quarter of what it was
  SPEED_SHAPES=("512 16 32" "768 16 32 128" "2048 16 64")
  SPEED_ARGS=(--batch-size 8192)
  FRESH_ARGS=(--gib 4 --file-gib 2)
  T_E2E=240 T_WRITE=100 T_CACHE=60 T_STREAM=45 T_FEED=75 T_THROUGHPUT=60 T_SPEED=45 T_COMPILE=90 T_TESTS=280
fi

# the model (Pythia-70M-shaped, random weights) and the repeated pydoc corpus, shared by the steps
step model 90 "$PY" benchmarks/end_to_end.py --only-build-model "$W/model" --corpus-out "$W/corpus.jsonl" \
    --cache-tokens "$CORPUS_TOKENS" ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"}

# a tiny cache and its read-back first (seconds): where the store does not work with that machine's packages
# (2026-11-28: zarr 3.4 there, 3.1 on the CPU machines; every cache failed), the steps after it would each
# fail on it, so they are skipped and the budget is kept
step store_check 60 env GSAE_DEBUG=1 sh -c 'gsae cache --model "$1" --dataset "$2" --cache "$3" --tokens 4096 \
    --context-length 64 --batch-size 8 --chunk-tokens 1024 && gsae verify --cache "$3" && echo "store check: ok"' \
    store_check "$W/model" "$W/corpus.jsonl" "$W/check"
if grep -q "SKIPPED" "$W/logs/store_check.log" 2>/dev/null || [ ! -e "$W/logs/store_check.log" ]; then
  :  # skipped for the budget: nothing is known about the store
elif ! grep -q "^store check: ok" "$W/logs/store_check.log"; then
  echo "== the store does not work here$([ -d "$W/model" ] || echo ", or the model was not built") (store_check above): the other steps are skipped"
  BUDGET=$((SECONDS - START))
fi
rm -rf "$W/check"

# 0. the CUDA tests alone first (a minute): the CUDA paths changed since the last full suite there
step tests_cuda_quick 90 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_cuda.py tests/test_sae.py

# 1. stage one: cache throughput ÷ bare forward, same model, windows and batch (into the disk, into memory),
#    over the whole run and over its second half (without the start-up), with the seconds spent making the
#    chunk buffers. gsae cache writes with threads (--writer auto); the encoder processes were slower on
#    2026-11-28 (2.81 against 2.12 s), the forward as slow beside either: cache_throughput_processes
step cache_throughput "$T_THROUGHPUT" "$PY" benchmarks/cache_throughput.py --model "$W/model" \
    --dataset "$W/corpus.jsonl" ${THROUGHPUT_ARGS[@]+"${THROUGHPUT_ARGS[@]}"}
# the same, 4 × as long (2026-11-28: 0.546 over 2.12 s, of which ~0.7 s making the ring at start-up): whether
# the ratio is the start-up's or the steady state's
step cache_throughput_long $((T_THROUGHPUT + 40)) "$PY" benchmarks/cache_throughput.py --model "$W/model" \
    --dataset "$W/corpus.jsonl" ${THROUGHPUT_ARGS[@]+"${THROUGHPUT_ARGS[@]}"} --tokens "$THROUGHPUT_LONG_TOKENS"
step cache_throughput_processes "$T_THROUGHPUT" "$PY" benchmarks/cache_throughput.py --model "$W/model" \
    --dataset "$W/corpus.jsonl" ${THROUGHPUT_ARGS[@]+"${THROUGHPUT_ARGS[@]}"} --writer processes
# the chunk buffers made in the hooks as they are needed, as before (gsae makes them on a thread of their own)
step cache_throughput_no_ahead "$T_THROUGHPUT" "$PY" benchmarks/cache_throughput.py --model "$W/model" \
    --dataset "$W/corpus.jsonl" ${THROUGHPUT_ARGS[@]+"${THROUGHPUT_ARGS[@]}"} --no-buffers-ahead
# the writer threads at the model thread's priority, as before (gsae lowers theirs by 10 beside a GPU)
step cache_throughput_nice0 "$T_THROUGHPUT" "$PY" benchmarks/cache_throughput.py --model "$W/model" \
    --dataset "$W/corpus.jsonl" ${THROUGHPUT_ARGS[@]+"${THROUGHPUT_ARGS[@]}"} --worker-nice 0
# 4a. a small cache of the model, then store-fed ÷ memory-fed steps (a fresh stream over 12 and 48 steps, and 48
#     steps after the stream has handed out an epoch: its buffers made and touched, as in a long run), and the
#     training stream ÷ plain decode (with the decode on threads and in chunk processes, gsae train's default
#     on a GPU)
step small_cache "$T_CACHE" gsae cache --model "$W/model" --dataset "$W/corpus.jsonl" --cache "$W/cache" ${CACHE_ARGS[@]+"${CACHE_ARGS[@]}"}
FEED_DEVICE=(--device "$([ $SMOKE = 1 ] && echo cpu || echo cuda)")
if [ -f "$W/cache/zarr.json" ]; then
  step feed_steady "$T_FEED" "$PY" benchmarks/train_speed.py feed --cache "$W/cache" ${FEED_ARGS[@]+"${FEED_ARGS[@]}"} \
      --steps 48 --after-epoch ${FEED_DEVICE[@]+"${FEED_DEVICE[@]}"}
  step feed_steady_threads "$T_FEED" "$PY" benchmarks/train_speed.py feed --cache "$W/cache" ${FEED_ARGS[@]+"${FEED_ARGS[@]}"} \
      --steps 48 --after-epoch ${FEED_DEVICE[@]+"${FEED_DEVICE[@]}"} --reader threads
  # the decode at the training thread's priority, as before (gsae lowers it by 10 on a GPU)
  step feed_steady_nice0 "$T_FEED" "$PY" benchmarks/train_speed.py feed --cache "$W/cache" ${FEED_ARGS[@]+"${FEED_ARGS[@]}"} \
      --steps 48 --after-epoch ${FEED_DEVICE[@]+"${FEED_DEVICE[@]}"} --worker-nice 0
fi

# 1b. end to end: gsae cache + baseline / + group + G*, against sparsify live (the headline ratios, met on
#     2026-11-28; after the open figures above)
step end_to_end "$T_E2E" "$PY" benchmarks/end_to_end.py --model "$W/model" --workdir "$W/e2e" --sparsify-runs 2 \
    ${E2E_ARGS[@]+"${E2E_ARGS[@]}"}
rm -rf "$W/e2e"

if [ -f "$W/cache/zarr.json" ]; then
  # a fresh stream (its start-up included)
  step feed "$T_FEED" "$PY" benchmarks/train_speed.py feed --cache "$W/cache" ${FEED_ARGS[@]+"${FEED_ARGS[@]}"} ${FEED_DEVICE[@]+"${FEED_DEVICE[@]}"}
  # 12 steps of 8,192 rows stay inside the stream's first window (8 chunks × 4 layers), decoded at the warm-up;
  # 48 cross three window switches (2026-11-28: 1.805 with processes, 1.714 with threads, runs of 5-10 ms)
  step feed_long "$T_FEED" "$PY" benchmarks/train_speed.py feed --cache "$W/cache" ${FEED_ARGS[@]+"${FEED_ARGS[@]}"} \
      --steps 48 ${FEED_DEVICE[@]+"${FEED_DEVICE[@]}"}
  step stream "$T_STREAM" "$PY" benchmarks/train_speed.py stream --cache "$W/cache" ${STREAM_ARGS[@]+"${STREAM_ARGS[@]}"}
  step stream_processes "$T_STREAM" "$PY" benchmarks/train_speed.py stream --cache "$W/cache" \
      ${STREAM_ARGS[@]+"${STREAM_ARGS[@]}"} --reader processes
fi


# 1c. the cache into memory, with 8 writer threads, and with the checksum holding the GIL (as before 2026-11-28)
step cache_throughput_memory "$T_THROUGHPUT" "$PY" benchmarks/cache_throughput.py --model "$W/model" \
    --dataset "$W/corpus.jsonl" ${THROUGHPUT_ARGS[@]+"${THROUGHPUT_ARGS[@]}"} --folder /dev/shm
step cache_throughput_w8 "$T_THROUGHPUT" "$PY" benchmarks/cache_throughput.py --model "$W/model" \
    --dataset "$W/corpus.jsonl" ${THROUGHPUT_ARGS[@]+"${THROUGHPUT_ARGS[@]}"} --folder /dev/shm --writer threads \
    --write-threads "$([ $SMOKE = 1 ] && echo 1 || echo 8)"
step cache_throughput_crc_held "$T_THROUGHPUT" "$PY" benchmarks/cache_throughput.py --model "$W/model" \
    --dataset "$W/corpus.jsonl" ${THROUGHPUT_ARGS[@]+"${THROUGHPUT_ARGS[@]}"} --folder /dev/shm --checksum-gil held \
    --writer threads

# 2b. what fresh memory costs in this VM (first touch against memory touched again, a file written once
#     and again, and with O_DIRECT): is the 1.3 GB/s plain write the host backing new guest pages?
step fresh_memory 60 "$PY" benchmarks/fresh_memory.py ${FRESH_ARGS[@]+"${FRESH_ARGS[@]}"} --folder "$W"

# 3. the cache writer alone (GB/s of float16 with 1, 2 and all threads, and the cache's host side), into
#    the disk and into memory (/dev/shm): what the machine's memory gives as well as what its disk gives
step cache_write "$T_WRITE" "$PY" benchmarks/cache_write.py ${WRITE_ARGS[@]+"${WRITE_ARGS[@]}"}
step cache_write_memory "$T_WRITE" "$PY" benchmarks/cache_write.py ${WRITE_ARGS[@]+"${WRITE_ARGS[@]}"} --folder /dev/shm
# 3b. the writer by threads and by encoder processes (1, 2, 4, 8, all) into memory, with a GIL probe beside
#     it (a thread of tiny torch ops, as the model's thread launching kernels: its pace ÷ alone), then where
#     the threads hold the GIL (py-spy, from .whl): on the H200 machine 16 writer threads kept only 4 cores
#     busy, and 16 raw writers wrote 20.9 GB/s
step writer_threads "$T_WRITE" "$PY" benchmarks/cache_write.py ${WRITE_ARGS[@]+"${WRITE_ARGS[@]}"} --writer-only \
    --threads 1,2,4,8,all --folder /dev/shm --probe
# all the writers at nice 10 (gsae's beside a GPU), the probe beside them
step writer_nice "$T_WRITE" "$PY" benchmarks/cache_write.py ${WRITE_ARGS[@]+"${WRITE_ARGS[@]}"} --writer-only \
    --threads all --folder /dev/shm --probe --nice 10
# 3b'. the same 16 writer threads with the chunk checksum holding the GIL, as before 2026-11-28 (gsae now
#     releases it where a process has more than 2 cores: compressing alone by 16 threads on the H200 machine
#     went from 4.67 to 8.10 GB/s)
step writer_crc_held "$T_WRITE" "$PY" benchmarks/cache_write.py ${WRITE_ARGS[@]+"${WRITE_ARGS[@]}"} --writer-only \
    --threads all --folder /dev/shm --checksum-gil held --writers threads
# 3c. compressing alone by threads, five ways (numcodecs with google_crc32c, the writer before 2026-11-28;
#     numcodecs with the crc32c package's GIL-free checksum, the writer since; the same blosc into reused
#     buffers through ctypes with either checksum; raw writes)
if [ $SMOKE = 1 ]; then COMPRESS_ARGS=(--threads 1,2 --chunks 4 --repeats 1); else COMPRESS_ARGS=(--threads 1,2,4,8,16 --chunks 128 --repeats 1); fi
step compress_threads "$T_WRITE" "$PY" benchmarks/compress_threads.py ${COMPRESS_ARGS[@]+"${COMPRESS_ARGS[@]}"}
SPY=$(command -v py-spy || ls /tmp/site/bin/py-spy 2>/dev/null)
gil_profile() {  # gil_profile NAME COMMAND...: py-spy --gil over COMMAND, then the summary of its samples
  local name=$1; shift
  [ -n "$SPY" ] || { echo "== $name: SKIPPED (no py-spy)"; return 0; }
  local t0=$SECONDS
  step "$name" 60 "$SPY" record --gil --rate 250 --format raw -o "$W/logs/$name.raw" -- "$@"
  [ -s "$W/logs/$name.raw" ] && step "${name}_summary" 20 "$PY" benchmarks/gil_summary.py "$W/logs/$name.raw" \
      --seconds $((SECONDS - t0))
}
gil_profile writer_gil "$PY" benchmarks/cache_write.py ${WRITE_ARGS[@]+"${WRITE_ARGS[@]}"} --writer-only --threads all \
    --repeats 4 --folder /dev/shm --writers threads
# the same writer with a 0.5 ms GIL switch interval (CPython's is 5 ms): is the 16-thread writer held back
# by threads waiting to get the GIL back after each C call (the convoy effect)?
step writer_switch "$T_WRITE" "$PY" benchmarks/cache_write.py ${WRITE_ARGS[@]+"${WRITE_ARGS[@]}"} --writer-only \
    --threads all --folder /dev/shm --switch-interval 0.0005 --writers threads

# 4b. the rest of the stream's and training's figures on the small cache (made in 4a)
if [ -f "$W/cache/zarr.json" ]; then
  step stream_crc_held "$T_STREAM" "$PY" benchmarks/train_speed.py stream --cache "$W/cache" ${STREAM_ARGS[@]+"${STREAM_ARGS[@]}"} \
      --checksum-gil held  # the decode as before 2026-11-28, against `stream`
  step feed_long_threads "$T_FEED" "$PY" benchmarks/train_speed.py feed --cache "$W/cache" ${FEED_ARGS[@]+"${FEED_ARGS[@]}"} \
      --steps 48 ${FEED_DEVICE[@]+"${FEED_DEVICE[@]}"} --reader threads
  # the same with the checksum holding the GIL, as then
  step feed_long_crc_held "$T_FEED" "$PY" benchmarks/train_speed.py feed --cache "$W/cache" ${FEED_ARGS[@]+"${FEED_ARGS[@]}"} \
      --steps 48 ${FEED_DEVICE[@]+"${FEED_DEVICE[@]}"} --checksum-gil held --reader threads
  # where the decode threads hold the GIL (the plain decode peaked at 8 threads there)
  gil_profile stream_gil "$PY" benchmarks/train_speed.py stream --cache "$W/cache" ${STREAM_ARGS[@]+"${STREAM_ARGS[@]}"} \
      --repeats 1
  step stream_switch "$T_STREAM" "$PY" benchmarks/train_speed.py stream --cache "$W/cache" ${STREAM_ARGS[@]+"${STREAM_ARGS[@]}"} \
      --switch-interval 0.0005
  # gsae train at G = 2 on the small cache, with CPython's GIL switch interval (5 ms) and with 0.5 ms: on
  # the H200 a step at G* took 11.5 ms per SAE against 3.3-3.7 ms in `feed`; do the decode threads keep
  # the training loop waiting for the GIL? (wall_seconds: steps, waiting_for_data)
  # (and `train_threads`: the default interval with the decode on threads, where train_switch_0.005 takes
  # gsae's default on a GPU, chunk processes)
  step group_small 60 gsae group --cache "$W/cache"
  for variant in 0.005 0.0005 threads; do
    interval=$([ $variant = threads ] && echo 0.005 || echo $variant)
    name=$([ $variant = threads ] && echo train_threads || echo "train_switch_$variant")
    step "$name" 90 "$PY" -c "import sys; sys.setswitchinterval($interval); sys.argv[0] = 'gsae'; import cli; cli.main()" \
        train --cache "$W/cache" --groups 2 --out "$W/runs/g2-$variant" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} \
        $([ $variant = threads ] && echo "--reader threads")
    [ -f "$W/runs/g2-$variant/summary.json" ] && "$PY" -c "import json, sys; s = json.load(open(sys.argv[1])); \
print('train G=2,', sys.argv[2], 's: wall s', {k: round(v, 2) for k, v in s['wall_seconds'].items()}, \
'per SAE tok/s', [round(r['tokens_per_s']) for r in s['saes']])" "$W/runs/g2-$variant/summary.json" \
        "$([ $variant = threads ] && echo 'decode threads, GIL switch interval 0.005' || echo "GIL switch interval $variant")" \
        | tee -a "$W/logs/$name.log"
  done
  # gsae group's distances ÷ reading their chunks, and with one torch thread per Dask task (16 × 16 threads?)
  # (products on the GPU as `gsae group` now runs them there, against the same on the CPU)
  step group_speed 60 "$PY" benchmarks/group_speed.py --cache "$W/cache" --compare-cpu --one-torch-thread --no-rss
  # only with ONLY=gram_sweep: the Gram product's steps in n on this host's CPU (measured 2026-11-27: padding
  # to a multiple of 8 helped on the development CPU, hurt here; gsae group no longer pads)
  [[ " ${ONLY:-} " == *" gram_sweep "* ]] && step gram_sweep 30 "$PY" benchmarks/group_speed.py --gram-sweep --widths 512
else
  echo "== stream, feed: SKIPPED (no cache)"
fi

# 6. gsae's TopK step ÷ sparsify's, per shape
#    The first shape also with 2% and 18% of the latents dead (AuxK on): end_to_end's SAEs had that many
#    (a 400k-token CPU run of that shape had that many), and its steps took 11.4-11.5 ms where this step alone took 3.2
SPEED_DEVICE=(--device "$([ $SMOKE = 1 ] && echo cpu || echo cuda)")
# (0.2%: 16 dead latents, where the dense decode does the most work per latent drawn)
DEAD=(--dead-fraction 0.002 0.02 0.18 --other-auxk)  # --other-auxk: also the AuxK decode gsae does not pick (the gather on CUDA)
for shape in "${SPEED_SHAPES[@]}"; do
  set -- $shape
  d=$1 e=$2; shift 2
  # the first shape runs 3 dead fractions, each also with the other AuxK decode, besides: 2 × the limit
  step "sparsify_speed_d$d" "$((${#DEAD[@]} > 0 ? 2 * T_SPEED : T_SPEED))" "$PY" benchmarks/sparsify_speed.py --d-in "$d" --expansion "$e" --k "$@" \
      ${SPEED_ARGS[@]+"${SPEED_ARGS[@]}"} ${SPEED_DEVICE[@]+"${SPEED_DEVICE[@]}"} ${DEAD[@]+"${DEAD[@]}"}
  DEAD=()
done

# 7. only with ONLY=compile_default / compile_reduce-overhead: torch.compile of gsae's forward at the first
#    shape (measured twice on the H200, 0.77-1.02 and 0.93-1.31 × eager: not adopted)
set -- ${SPEED_SHAPES[0]}
for mode in default reduce-overhead; do
  [ $SMOKE = 1 ] && [ $mode = reduce-overhead ] && continue  # CUDA graphs need CUDA
  [[ " ${ONLY:-} " == *" compile_$mode "* ]] || [ $SMOKE = 1 ] || continue
  step "compile_$mode" "$T_COMPILE" "$PY" benchmarks/sparsify_speed.py --d-in "$1" --expansion "$2" --k "$3" \
      ${SPEED_ARGS[@]+"${SPEED_ARGS[@]}"} --repeats 1 --compile "$mode" ${SPEED_DEVICE[@]+"${SPEED_DEVICE[@]}"}
done

# 8. the whole suite with CUDA visible, last: it passed on the H200 machine on 2026-11-28 (232 s with
#    -n 14), and tests_cuda_quick runs the CUDA paths first (pytest-xdist where it is installed)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$([ $SMOKE = 1 ] && echo 2 || echo 14)")
[ "${SKIP_TESTS:-0}" = 1 ] || step tests_cuda "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -rfE ${XDIST[@]+"${XDIST[@]}"} tests

# 9. if time is left: end to end again with gsae's SAE forward under bfloat16 autocast (sparsify's
#    SparseCoder always autocasts to bfloat16 on such a GPU)
if [ $SMOKE = 0 ]; then
  step end_to_end_bf16 180 "$PY" benchmarks/end_to_end.py --model "$W/model" --workdir "$W/e2e" --precision bfloat16 \
      ${E2E_ARGS[@]+"${E2E_ARGS[@]}"}
  rm -rf "$W/e2e"
fi

# ---------------------------------------------------------------- summary
echo
echo "== summary (session $((SECONDS - START)) s of ${BUDGET})"
for name in "${ORDER[@]}"; do
  grep -h -E "ratio|÷|compile|GB/s|group \(D\)|read only|passed|failed|FAILED|G\* =|^\[|^  [0-9] |^ *[0-9]+( \+AuxK)?( [0-9.]+% dead)? +([0-9,]+ +[0-9,]+|gsae with AuxK)|^(raw|numcodecs|reused)|SKIPPED|TIMED OUT|FAILED|failed|GIL held|GIL probe|by thread:|^ +[0-9.]+%  |by phase|switch interval" \
      "$W/logs/$name.log" 2>/dev/null | grep -v '│' | sed "s/^/$name: /"
done
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then tar czf "$OUT/gpu_session_logs.tgz" -C "$W" logs 2>/dev/null; fi  # one file: $OUT takes 8
