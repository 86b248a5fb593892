"""Text-to-video training on Megatron core: torchrun --nproc_per_node N pretrain_t2v.py CONFIG.yaml [overrides]."""

import sys

from megatron_video.training.cli import main

if __name__ == "__main__":
    sys.exit(main(task="t2v"))
