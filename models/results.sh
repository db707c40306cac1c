#!/usr/bin/env bash
# The runs behind docs/results.md: three reference models, five policies, three seeds,
# each a `tfhfp8 train` run (skipped when its results.json exists), then the tables.
#
#   models/results.sh [OUTPUT_ROOT]      (default: results/)
#
# Sized for a shared 2-core CPU: Fashion-MNIST subsets of 3,000 training and 2,000 test
# images for 2 epochs. For full-size runs, drop --limit/--test_limit and raise --epochs.
set -euo pipefail
root="${1:-results}"
tfhfp8="${TFHFP8:-tfhfp8}"
policies=float32,bfloat16,fp8,hfp8,int16_dfp

run() {  # run OUTPUT_DIR ARGS...
  local out="$1"; shift
  [ -f "$out/results.json" ] || "$tfhfp8" train --policies="$policies" --output_dir="$out" "$@"
}

for seed in 0 1 2; do
  run "$root/transformer_rotten_tomatoes/seed$seed" --model=transformer_classifier \
    --dataset=rotten_tomatoes --epochs=3 --batch_size=64 --seed="$seed"
  for model in resnet20 mobilenet_v2; do
    run "$root/${model}_fashion_mnist/seed$seed" --model="$model" --dataset=fashion_mnist \
      --limit=3000 --test_limit=2000 --epochs=2 --batch_size=128 --seed="$seed"
  done
done
python models/results_table.py "$root"
