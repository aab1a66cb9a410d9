#!/usr/bin/env bash
# Training on GPUs with examples/train_distributed.py: one GPU (the baseline), then FSDP2, FSDP2 in bf16 mixed
# precision (no decode), tensor parallel, vocabulary-parallel tensor parallel and, from 4 GPUs, 2-D (tensor
# parallel over pairs, FSDP2 across them, vocabulary-parallel) on NPROC GPUs with the same global batches; each
# parallel run prints its largest and median loss difference to the baseline and whether its greedy decode
# (before training) gave the baseline's tokens. A last one-GPU run
# measures how far two runs of the same layout drift apart (bf16 autocast, non-deterministic kernels).
#   bash benchmarks/multi_gpu.sh OUTDIR [NPROC=2] [more train_distributed.py options]
# Default model: recipes/hybrid-bamba-1b.yaml (1.2B), global batch 8 x 2048 tokens, 50 steps,
# lr 3e-4, bf16 autocast, gradient checkpointing.
set -uo pipefail  # a failed run does not stop the others
out=${1:?usage: multi_gpu.sh OUTDIR [NPROC] [options]}
nproc=${2:-2}
shift $(($# < 2 ? $# : 2))
mkdir -p "$out"
args=(--device cuda --recipe hybrid-bamba-1b --batch 8 --seqlen 2048 --steps 50 --lr 3e-4 --autocast --gradient-checkpointing "$@")
run() { torchrun --standalone --nproc_per_node "$1" examples/train_distributed.py "${@:2}"; }
run 1 --parallel none "${args[@]}" --metrics "$out/one_gpu.json" 2>&1 | tee "$out/one_gpu.log"
layouts=("fsdp:--parallel fsdp" "fsdp_bf16:--parallel fsdp --param-dtype bf16 --decode 0" "tp:--parallel tp"
    "tp_vocab:--parallel tp --vocab-parallel")
((nproc >= 4)) && layouts+=("2d:--parallel 2d --tp-size 2 --vocab-parallel")
for layout in "${layouts[@]}"; do
    name=${layout%%:*}
    read -ra options <<<"${layout#*:}"
    run "$nproc" "${options[@]}" "${args[@]}" --metrics "$out/$name.json" --baseline "$out/one_gpu.json" \
        2>&1 | tee "$out/$name.log"
done
run 1 --parallel none "${args[@]}" --metrics "$out/one_gpu_again.json" --baseline "$out/one_gpu.json" \
    2>&1 | tee "$out/one_gpu_again.log"
