"""Image-to-video training (inpainting conditioning): torchrun --nproc_per_node N pretrain_i2v.py CONFIG.yaml."""

import sys

from megatron_video.training.cli import main

if __name__ == "__main__":
    sys.exit(main(task="i2v"))
