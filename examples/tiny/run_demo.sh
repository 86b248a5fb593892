#!/usr/bin/env bash
# The CPU demo, end to end on the shipped small data (2 processes, no GPU needed):
#   real clips and images -> tiny WF-VAE (two clips held out) -> T2I (dense, TP=2 + SP)
#   -> T2V (SUV, DP=2) -> I2V (inpainting, DP=2) -> quality figures.
# Leaves under outputs/tiny/: data/, vae/ (+ heldout.json), stages/<stage>/{checkpoints,tensorboard,
# loss_curve.png,metrics.jsonl,samples/step_XXXXXXX/,final_*.safetensors}, samples/contact_sheet.png
# and samples/figures.json. The T2V and I2V stages sample their EMA weights at their last step (four
# training captions of four different scenes; the first frame of carphone_talk.mp4): those are the
# samples scored at the end.
# Re-running skips what is already finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-2}
OUT=outputs/tiny
RUN="torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT:-29533}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process (and no torchrun banner about it)
start=$(date +%s)

echo "== 1/4 demo data"
python tools/prepare_demo_data.py "$OUT/data"

echo "== 2/4 tiny WF-VAE (trained without the clips of vae_heldout.txt, measured on them at 96 x 96)"
if [ ! -f "$OUT/vae/final_ema.safetensors" ]; then
  $RUN pretrain_vae.py examples/tiny/vae.yaml
fi
python tools/eval_vae.py --weights "$OUT/vae/final_ema.safetensors" --data-list "$OUT/data/vae_heldout.txt" \
  --num-frames 9 --short-side 96 --crop 96 --threads "$NPROC" --json "$OUT/vae/heldout.json" | tail -n 4

echo "== 3/4 curriculum: T2I -> T2V -> I2V, with validation losses and EMA samples"
$RUN pretrain_t2v.py --curriculum examples/tiny/curriculum.yaml

echo "== 4/4 quality figures and contact sheet"
last_samples() { ls -d "$OUT/stages/$1/samples/step_"* | tail -n 1; }
T2V_DIR=$(last_samples t2v)
I2V_SAMPLE=$(ls "$(last_samples i2v)"/*-0.mp4)
python tools/eval_samples.py --config examples/tiny/t2v.yaml --t2v "$T2V_DIR" \
  --prompts-file examples/tiny/demo_prompts.txt --i2v "$I2V_SAMPLE=$OUT/data/media/videos/carphone_talk.mp4" \
  --vae-report "$OUT/vae/heldout.json" --json "$OUT/samples/figures.json" --sheet "$OUT/samples/contact_sheet.png"

echo "demo finished in $(( $(date +%s) - start )) s; artefacts under $OUT/"
