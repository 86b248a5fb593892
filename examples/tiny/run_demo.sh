#!/usr/bin/env bash
# The CPU demo, end to end on the shipped small data (2 processes, no GPU needed):
#   real clips and images -> tiny WF-VAE (two clips held out) -> T2I (dense, TP=2)
#   -> T2V (SUV, TP=2 + SP) -> I2V (inpainting, Ulysses CP=2) -> samples -> quality figures.
# Leaves under outputs/tiny/: data/, vae/ (+ heldout.json), stages/<stage>/{checkpoints,tensorboard,
# loss_curve.png,metrics.jsonl,samples/,final_*.safetensors}, samples/{t2v,i2v}/*.mp4,
# samples/contact_sheet.png and samples/figures.json. Re-running skips what is already finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-2}
OUT=outputs/tiny
RUN="torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT:-29533}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process (and no torchrun banner about it)
start=$(date +%s)
I2V_CLIP="$OUT/data/media/videos/carphone_talk.mp4"
I2V_PROMPT="A young man in a dark suit and red bow tie talks to the camera from the seat of a moving car; trees pass by the side window."

echo "== 1/6 demo data"
python tools/prepare_demo_data.py "$OUT/data"

echo "== 2/6 tiny WF-VAE (trained without the clips of vae_heldout.txt, measured on them)"
if [ ! -f "$OUT/vae/final_ema.safetensors" ]; then
  $RUN pretrain_vae.py examples/tiny/vae.yaml
fi
python tools/eval_vae.py --weights "$OUT/vae/final_ema.safetensors" --data-list "$OUT/data/vae_heldout.txt" \
  --num-frames 9 --short-side 64 --crop 64 --threads 2 --json "$OUT/vae/heldout.json" | tail -n 4

echo "== 3/6 curriculum: T2I -> T2V -> I2V"
$RUN pretrain_t2v.py --curriculum examples/tiny/curriculum.yaml

echo "== 4/6 text-to-video samples of four training captions (VBench file names)"
$RUN tools/sample_video.py --config examples/tiny/t2v.yaml --weights "$OUT/stages/t2v/final_ema.safetensors" \
  --prompts-file examples/tiny/demo_prompts.txt --prompt-template "{}" --names vbench --steps 20 \
  --guidance-scale 4.0 --out-dir "$OUT/samples/t2v"

echo "== 5/6 image-to-video sample from the first frame of a training clip"
$RUN tools/sample_video.py --config examples/tiny/i2v.yaml --weights "$OUT/stages/i2v/final_ema.safetensors" \
  --prompt "$I2V_PROMPT" --prompt-template "{}" --video "$I2V_CLIP" --condition-frames 1 --steps 20 \
  --guidance-scale 4.0 --out-dir "$OUT/samples/i2v"

echo "== 6/6 quality figures and contact sheet"
python tools/eval_samples.py --config examples/tiny/t2v.yaml --t2v "$OUT/samples/t2v" \
  --prompts-file examples/tiny/demo_prompts.txt --i2v "$OUT/samples/i2v/sample_000.mp4=$I2V_CLIP" \
  --vae-report "$OUT/vae/heldout.json" --json "$OUT/samples/figures.json" --sheet "$OUT/samples/contact_sheet.png"

echo "demo finished in $(( $(date +%s) - start )) s; artefacts under $OUT/"
