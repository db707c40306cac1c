#!/usr/bin/env bash
# The runs behind docs/results.md: three reference models, five policies, three seeds,
# each a `tfhfp8 train` run (skipped when its results.json exists), then the tables.
# About 3 hours on a 2-core CPU.
#
#   models/policy_comparison/run.sh [OUTPUT_ROOT]      (default: results/)
#
# Sized for a shared 2-core CPU: ResNet-20 for one epoch on the full Fashion-MNIST; both
# CNNs for 2 epochs on subsets of 2,000 training and 2,000 test images, batch 32 (enough
# steps for the BatchNorm moving statistics to settle: with batch 128, MobileNetV2
# stayed at chance accuracy in inference mode). For longer runs, raise --epochs.
seeds="${SEEDS:-0 1 2}"
set -euo pipefail
root="${1:-results}"
tfhfp8="${TFHFP8:-tfhfp8}"
policies=float32,bfloat16,fp8,hfp8,int16_dfp

run() {  # run OUTPUT_DIR ARGS...
  local out="$1"; shift
  [ -f "$out/results.json" ] || "$tfhfp8" train --policies="$policies" --output_dir="$out" "$@"
}

for seed in $seeds; do
  run "$root/transformer_rotten_tomatoes/seed$seed" --model=transformer_classifier \
    --dataset=rotten_tomatoes --epochs=3 --batch_size=64 --seed="$seed"
  run "$root/resnet20_fashion_mnist_full/seed$seed" --model=resnet20 --dataset=fashion_mnist \
    --epochs=1 --batch_size=128 --seed="$seed"
  for model in resnet20 mobilenet_v2; do
    run "$root/${model}_fashion_mnist/seed$seed" --model="$model" --dataset=fashion_mnist \
      --limit=2000 --test_limit=2000 --epochs=2 --batch_size=32 --seed="$seed"
  done
done
python -m models.policy_comparison --root="$root"
