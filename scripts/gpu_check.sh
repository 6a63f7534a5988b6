#!/usr/bin/env bash
# Check traduire on a CUDA machine and measure a short Multi30k training run.
#
# Usage (from anywhere; the script works in the repository root):
#   bash scripts/gpu_check.sh
#   DATA_DIR=/path/to/multi30k-en-fr TRAIN_TIME=3m bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
#
# What it does:
#   1. prints nvidia-smi and the torch / CUDA / cuDNN / NCCL versions;
#   2. runs the CUDA unit tests (tests/test_cuda.py) and the model and search tests, then
#      (unless BENCH=0) scripts/gpu_bench.py: Transformer-base/big and the Multi30k model,
#      eager and compiled, on a synthetic corpus (about 8 minutes; its table goes to the log);
#   3. trains configs/multi30k-en-fr.yaml in bf16 for TRAIN_TIME under a one-process
#      torchrun with NCCL (batch_tokens BATCH_TOKENS), then, unless TRAIN2_TIME=0, a second
#      shorter run with batch_tokens BATCH_TOKENS2 for comparison (it reuses the first run's
#      data and tokenizer);
#   4. prints tokens/s, MFU, peak GPU memory and validation loss of each run, taken from
#      RUN/metrics.jsonl, and (unless EVAL=0) the BLEU of the first run on test_2016_flickr.
#
# Environment (all optional):
#   DATA_DIR      folder of aligned train/val.{en,fr} files  [../shared/data/multi30k-en-fr]
#   RUN           run directory of the main run               [runs/gpu-check-<date>]
#   TRAIN_TIME    wall clock of the main run                  [3m]
#   BATCH_TOKENS  tokens per step of the main run             [16384]
#   TRAIN2_TIME   wall clock of the comparison run, 0 = skip  [1m]
#   BATCH_TOKENS2 tokens per step of the comparison run       [4096]
#   EVAL          1: translate test_2016_flickr and score BLEU [1]
#   BENCH         1: run scripts/gpu_bench.py (BENCH_PART: training, loss, attention, all) [1]
#   PYTHON        interpreter                                 [python3]
#
# Installs nothing, except that wheels found in .whl/ (e.g. datasets for a machine without
# network) are unpacked into a temporary folder put first on PYTHONPATH. The checkout's src/
# is put on PYTHONPATH too, so traduire need not be installed. Exit status: 0 when every step
# passed, else 1 (every step runs regardless).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-../shared/data/multi30k-en-fr}
RUN=${RUN:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
TRAIN_TIME=${TRAIN_TIME:-3m}
BATCH_TOKENS=${BATCH_TOKENS:-16384}
TRAIN2_TIME=${TRAIN2_TIME:-1m}
BATCH_TOKENS2=${BATCH_TOKENS2:-4096}
EVAL=${EVAL:-1}
BENCH=${BENCH:-1}
BENCH_PART=${BENCH_PART:-all}
export PYTHONUNBUFFERED=1
export COLUMNS=${COLUMNS:-160}  # rich wraps log lines at 80 columns when not on a terminal

failures=()
section() { printf '\n===== %s (%s) =====\n' "$1" "$(date +%H:%M:%S)"; }
step() {  # step NAME COMMAND...: run it, remember a failure
    local name=$1; shift
    "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "!! $name failed (exit $rc)"
        failures+=("$name (exit $rc)")
    fi
    return "$rc"
}

# --- environment ---------------------------------------------------------------------------
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/traduire-wheels.XXXXXX")
    echo "installing ${#wheels[@]} wheel(s) from .whl/ into $site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "${wheels[@]}" || { echo "installing the wheels failed"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

section "1. GPU and versions"
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi not found"; fi
step versions "$PYTHON" - <<'EOF'
import importlib.metadata as md
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}")
if not torch.cuda.is_available():
    raise SystemExit("CUDA is not available to torch")
p = torch.cuda.get_device_properties(0)
print(f"GPU 0: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.1f} GiB; {torch.cuda.device_count()} GPU(s) visible")
for name in ("datasets", "pyarrow", "fsspec", "huggingface_hub", "dill", "multiprocess",
             "sentencepiece", "sacrebleu", "numpy"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
import traduire, datasets  # noqa: E401 - fail here, not minutes later
print(f"traduire from {traduire.__file__}")
EOF
[ ${#failures[@]} -eq 0 ] || { echo "no usable CUDA/torch/traduire: stopping"; exit 1; }

section "2. unit tests on CUDA"
tests=(tests/test_cuda.py)
for t in tests/test_model.py tests/test_search.py; do [ -f "$t" ] && tests+=("$t"); done
step "pytest" timeout 600 "$PYTHON" -m pytest -q -rfEsP -p no:cacheprovider "${tests[@]}"

if [ "$BENCH" = "1" ]; then
    section "2b. scripts/gpu_bench.py --part $BENCH_PART (synthetic corpus, bf16)"
    step "gpu_bench" timeout -k 30 660 "$PYTHON" scripts/gpu_bench.py --part "$BENCH_PART"
fi

# --- training ------------------------------------------------------------------------------
seconds() { "$PYTHON" -c "from traduire.config import parse_duration as p; print(int(p('$1')))"; }
train() {  # train RUN_DIR TIME BATCH_TOKENS [LAUNCHER...]: bf16 training, killed if it overruns
    local run=$1 time=$2 tokens=$3; shift 3
    local launcher=("$@")
    [ ${#launcher[@]} -gt 0 ] || launcher=("$PYTHON" -m torch.distributed.run --standalone
                                           --nproc_per_node=1 -m traduire)
    # Data preparation and the tokenizer come before the clock starts: allow 4 more minutes.
    timeout -k 30 $(( $(seconds "$time") + 240 )) "${launcher[@]}" \
        train -c configs/multi30k-en-fr.yaml -r "$run" \
        --set data.dir="$DATA_DIR" --set train.precision=bf16 --set train.max_time="$time" \
        --set train.threads=0 --set train.valid_every=500 --set train.log_every=100 \
        --set train.save_every=1000 --set train.batch_tokens="$tokens" \
        --set train.warmup_steps=1000 --set train.progress=false
}

section "3a. train $TRAIN_TIME, bf16, batch_tokens $BATCH_TOKENS, torchrun + NCCL -> $RUN"
if [ ! -f "$DATA_DIR/train.en" ]; then
    echo "no Multi30k data in $DATA_DIR (set DATA_DIR)"
    failures+=("data missing")
else
    if ! step "train $RUN (torchrun)" train "$RUN" "$TRAIN_TIME" "$BATCH_TOKENS" \
            && [ ! -s "$RUN/metrics.jsonl" ]; then
        # It failed before training (e.g. NCCL could not start): measure without torchrun.
        echo "retrying as a single process without torchrun"
        step "train $RUN (no torchrun)" train "$RUN" "$TRAIN_TIME" "$BATCH_TOKENS" \
            "$PYTHON" -m traduire
    fi
    runs=("$RUN")

    if [ "$TRAIN2_TIME" != "0" ] && [ -d "$RUN/encoded" ]; then
        RUN2="$RUN-bt$BATCH_TOKENS2"
        section "3b. train $TRAIN2_TIME, bf16, batch_tokens $BATCH_TOKENS2, torchrun -> $RUN2"
        # Same data and tokenizer: copy those stages instead of redoing them.
        mkdir -p "$RUN2/stages"
        cp -r "$RUN/data" "$RUN/tokenizer" "$RUN/encoded" "$RUN/run.json" "$RUN2/"
        cp "$RUN/stages/data.json" "$RUN/stages/tokenizer.json" "$RUN2/stages/"
        step "train $RUN2" train "$RUN2" "$TRAIN2_TIME" "$BATCH_TOKENS2"
        runs+=("$RUN2")
    fi

    if [ "$EVAL" = "1" ] && [ -f "$RUN/best.pt" ] && [ -f "$DATA_DIR/test_2016_flickr.en" ]; then
        # eval decodes the run's default checkpoint: average.pt where training wrote one
        # (train.average_last, kept only if it validated better), else best.pt.
        section "3c. BLEU of $RUN (average.pt, else best.pt) on test_2016_flickr, beam 5, GPU"
        step "eval" timeout 300 "$PYTHON" -m traduire eval -r "$RUN" --device cuda \
            --src "$DATA_DIR/test_2016_flickr.en" --ref "$DATA_DIR/test_2016_flickr.fr" \
            --output "$RUN/test_2016_flickr.hyp.fr"
    fi

    section "4. summary"
    "$PYTHON" - "${runs[@]}" <<'EOF'
import json, statistics, sys
from pathlib import Path

for run in sys.argv[1:]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        print(f"{run}: no metrics.jsonl")
        continue
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "tok_per_s" in r]
    valid = [r for r in records if "valid_loss" in r]
    print(f"{run}:")
    if train:
        last = train[-1]
        steady = train[1:] or train  # the first window includes start-up and warm-up
        mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
        print(f"  steps {last['step']}, epoch {last['epoch']}, {last['elapsed']:.0f} s of "
              f"training, last train loss {last['loss']:.3f}, skipped steps "
              f"{last.get('skipped_steps', 0)}")
        print(f"  tokens/s (src+tgt): last {last['tok_per_s']:,.0f}, median "
              f"{statistics.median(r['tok_per_s'] for r in steady):,.0f}; target tokens/s: "
              f"median {statistics.median(r['tgt_tok_per_s'] for r in steady):,.0f}")
        print("  MFU: " + (f"last {last['mfu']:.2%}, median {statistics.median(mfu):.2%}"
                           if mfu else "n/a (GPU not in monitor.PEAK_FLOPS)"))
        peak = max((r.get("gpu_mem_gib") or 0) for r in train)
        print(f"  peak GPU memory (max_memory_allocated): {peak:.2f} GiB")
    if valid:
        last, best = valid[-1], min(valid, key=lambda r: r["valid_loss"])
        print(f"  validation: last loss {last['valid_loss']:.3f} (ppl {last['valid_ppl']:.2f}) "
              f"at step {last['step']}; best {best['valid_loss']:.3f} at step {best['step']}")
EOF
fi

section "result"
if [ ${#failures[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed"
else
    printf 'gpu_check: FAILED: %s\n' "${failures[@]}"
    exit 1
fi
