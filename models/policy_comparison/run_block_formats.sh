#!/usr/bin/env bash
# The block-format runs behind docs/results.md ("Block-scaled formats"): ResNet-20 on a
# Fashion-MNIST subset and the Transformer classifier on a Rotten Tomatoes subset under
# float32, hfp8 and the OCP MX / NVFP4 presets, three seeds, each a `tfhfp8 train` run
# (skipped when its results.json exists), then the tables.
#
#   models/policy_comparison/run_block_formats.sh [OUTPUT_ROOT]   (default: results/)
#
# Sized for a shared 2-core CPU under heavy load (the defaults below: ResNet-20 on the
# first 256 Fashion-MNIST training images, the Transformer on the first 256 reviews, one
# epoch each, batch 32 (8 steps), 300 test examples each: a smoke-level comparison);
# the sizes are environment variables,
# e.g. RESNET_LIMIT=60000 RESNET_EPOCHS=5 TEXT_LIMIT=10201 TEST_LIMIT=10000 for full
# sets. STUDIES="transformer" or "resnet" runs one of the two.
seeds="${SEEDS:-0 1 2}"
set -euo pipefail
root="${1:-results}"
tfhfp8="${TFHFP8:-tfhfp8}"
policies="${POLICIES:-float32,hfp8,mxfp8,mxfp6,mxfp4,nvfp4}"
studies="${STUDIES:-transformer resnet}"
resnet_limit="${RESNET_LIMIT:-256}"
resnet_epochs="${RESNET_EPOCHS:-1}"
text_limit="${TEXT_LIMIT:-256}"
text_epochs="${TEXT_EPOCHS:-1}"
test_limit="${TEST_LIMIT:-300}"

run() {  # run OUTPUT_DIR ARGS...
  local out="$1"; shift
  [ -f "$out/results.json" ] || "$tfhfp8" train --policies="$policies" --output_dir="$out" "$@"
}

for seed in $seeds; do
  for study in $studies; do
    if [ "$study" = transformer ]; then
      run "$root/transformer_rotten_tomatoes_mx/seed$seed" --model=transformer_classifier \
        --dataset=rotten_tomatoes --limit="$text_limit" --test_limit="$test_limit" \
        --epochs="$text_epochs" --batch_size=32 --seed="$seed"
    else
      run "$root/resnet20_fashion_mnist_mx/seed$seed" --model=resnet20 \
        --dataset=fashion_mnist --limit="$resnet_limit" --test_limit="$test_limit" \
        --epochs="$resnet_epochs" --batch_size=32 --seed="$seed"
    fi
  done
done
python -m models.policy_comparison --root="$root"
