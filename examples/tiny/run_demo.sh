#!/usr/bin/env bash
# The CPU demo, end to end on the shipped small data (2 processes, no GPU needed):
#   real clips and images -> tiny WF-VAE -> T2I (dense, TP=2) -> T2V (SUV, TP=2 + SP)
#   -> I2V (inpainting, Ulysses CP=2) -> sample videos.
# Leaves under outputs/tiny/: data/, vae/, stages/<stage>/{checkpoints,tensorboard,loss_curve.png,
# metrics.jsonl,final_*.safetensors}, samples/*.mp4. Re-running skips what is already finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process (torchrun otherwise sets it, with a banner)
OUT=outputs/tiny
RUN="torchrun --nproc_per_node ${NPROC} --master_port ${MASTER_PORT:-29533}"
start=$(date +%s)

echo "== 1/5 demo data"
python tools/prepare_demo_data.py "$OUT/data"

echo "== 2/5 tiny WF-VAE"
if [ ! -f "$OUT/vae/final_ema.safetensors" ]; then
  $RUN pretrain_vae.py examples/tiny/vae.yaml
fi

echo "== 3/5 curriculum: T2I -> T2V -> I2V"
$RUN pretrain_t2v.py --curriculum examples/tiny/curriculum.yaml

echo "== 4/5 text-to-video sample"
$RUN tools/sample_video.py --config examples/tiny/t2v.yaml --weights "$OUT/stages/t2v/final_ema.safetensors" \
  --prompt "a street with parked bicycles and passing cars" --steps 20 --guidance-scale 4.0 \
  --out-dir "$OUT/samples/t2v"

echo "== 5/5 image-to-video sample"
$RUN tools/sample_video.py --config examples/tiny/i2v.yaml --weights "$OUT/stages/i2v/final_ema.safetensors" \
  --prompt "a street with parked bicycles" --image "$OUT/data/media/images/astronaut.jpg" --steps 20 \
  --guidance-scale 4.0 --out-dir "$OUT/samples/i2v"

echo "demo finished in $(( $(date +%s) - start )) s; artefacts under $OUT/"
