#!/usr/bin/env bash
# The LDM rows of the Fashion-MNIST grid: plain, D4M and MGD³ on a class-conditional latent UNet
# (`mgd3 pretrain --arch unet`), distilled and evaluated with exactly the flags of
# benchmarks/fmnist_table.py (batch 50, at most 1000 real images per class for modes/prototypes,
# 50 DDPM steps, CPU, one thread per job; `mgd3 evaluate --protocol dc`), plus --model and --cfg.
#
# usage: benchmarks/ldm_fmnist.sh MODEL ROOT "IPCS" "METHODS" [CFG] [EVAL_SEEDS]
#   e.g. benchmarks/ldm_fmnist.sh /work/models/fmnist-unet runs/ldm-fmnist "10" "plain d4m mgd3" 1.5 0
# Each cell: ROOT/sets/ldm-<method>-ipc<N>-s0 and its evals/dc.json; wall times go to ROOT/run.log.
# Cells run as parallel jobs (one per method); a finished cell is skipped on a re-run.
set -euo pipefail
MODEL=$1 ROOT=$2 IPCS=$3 METHODS=$4 CFG=${5:-1.5} SEEDS=${6:-0}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$ROOT/sets"
log() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$ROOT/run.log"; }

distill() {  # method ipc
    local set="$ROOT/sets/ldm-$1-ipc$2-s0" t
    [ -f "$set/manifest.json" ] && return 0
    t=$(date +%s)
    $PY -m mgd3 distill --data fashion-mnist --model "$MODEL" --method "$1" --ipc "$2" --seed 0 --cfg "$CFG" \
        --out "$set" --batch-size 50 --max-real-per-class 1000 --quiet --device cpu
    log "done distill ldm-$1-ipc$2-s0 in $(( $(date +%s) - t )) s"
}

evaluate() {  # method ipc
    local set="$ROOT/sets/ldm-$1-ipc$2-s0" t
    [ -f "$set/evals/dc.json" ] && return 0
    mkdir -p "$set/evals"
    t=$(date +%s)
    # shellcheck disable=SC2086
    $PY -m mgd3 evaluate "$set" --protocol dc --seeds $SEEDS --threads 1 --out "$set/evals/dc.json" --quiet \
        --device cpu
    log "done evaluate ldm-$1-ipc$2-s0 dc seeds $SEEDS in $(( $(date +%s) - t )) s"
}

for ipc in $IPCS; do
    # distill: plain beside the first method that encodes the real data (it fills the encoding
    # cache alone, as the grid does), then the rest; then every evaluation as its own job
    pids=() rest=() first=""
    for m in $METHODS; do
        if [ "$m" = plain ]; then distill "$m" "$ipc" & pids+=($!)
        elif [ -z "$first" ]; then first=$m
        else rest+=("$m"); fi
    done
    [ -n "$first" ] && distill "$first" "$ipc"
    for m in "${rest[@]}"; do distill "$m" "$ipc" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p"; done
    pids=()
    for m in $METHODS; do evaluate "$m" "$ipc" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p"; done
done
