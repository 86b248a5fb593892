"""WF-VAE training with data parallelism: torchrun --nproc_per_node N pretrain_vae.py CONFIG.yaml [overrides]."""

import sys

from megatron_video.training.cli import vae_main

if __name__ == "__main__":
    sys.exit(vae_main())
