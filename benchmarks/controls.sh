#!/usr/bin/env bash
# The controls of the "say what wins" study (benchmarks/README.md), one run at a time; quality.py skips stored runs,
# so the queue can be stopped and started again. Hausa first: it is the tuning language (learning rate, weights).
# Usage: bash benchmarks/controls.sh [LANGS...]   (default: hau)
set -uo pipefail
cd "$(dirname "$0")/.."
LANGS=("${@:-hau}")
Q=(python benchmarks/quality.py --langs "${LANGS[@]}" --scoring dense maxsim-content --per-query)
RECIPE_E100=(--loss reg=100)
NO_OT=(--loss ot_weight=0)
PAPER=(--loss cost=cosine marginals=content debias=false reg=0.1 ot_weight=1 contrastive_weight=0)
step() { echo "=== $(date +%T) $*"; "$@" || echo "=== FAILED: $*"; }
# the systems at the recipe's learning rate (2e-5) and MSE at its tuned one
step "${Q[@]}" --methods ot --tag recipe
step "${Q[@]}" --methods ot --tag recipe-e100 "${RECIPE_E100[@]}"
step "${Q[@]}" --methods ot --tag recipe-no-ot "${NO_OT[@]}"
step "${Q[@]}" --methods ot --tag contrastive+sent100 --loss ot_weight=0 sentence_weight=100
step "${Q[@]}" --methods ot --tag contrastive+sent1000 --loss ot_weight=0 sentence_weight=1000
step "${Q[@]}" --methods mse --tag lr2e-4 --lr 2e-4
step "${Q[@]}" --methods ot --tag paper-ot "${PAPER[@]}"
# the learning-rate grid (2e-5 5e-5 1e-4 2e-4) for every system, on the tuning language
for lr in 5e-5 1e-4 2e-4; do
  [ "$lr" = 5e-5 ] || step "${Q[@]}" --methods ot --tag recipe-lr$lr --lr $lr
  step "${Q[@]}" --methods ot --tag recipe-e100-lr$lr --lr $lr "${RECIPE_E100[@]}"
  step "${Q[@]}" --methods ot --tag recipe-no-ot-lr$lr --lr $lr "${NO_OT[@]}"
  step "${Q[@]}" --methods ot --tag paper-ot-lr$lr --lr $lr "${PAPER[@]}"
done
