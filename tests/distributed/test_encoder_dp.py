"""Encoder data parallel gives exactly the batches of encoding on every rank, with real data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_video.testing.distributed import run_distributed

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.distributed


def _batches(rank, world_size, data_list, encoder_dp, count):
    from megatron_video.config import load_config
    from megatron_video.data.batches import EncodedBatches
    from megatron_video.data.dataset import VideoTextDataset
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import init_distributed
    from megatron_video.training.stage import build_text_encoder, build_vae, encoder_group

    cfg = load_config(
        ROOT / "examples/tiny/t2v.yaml",
        [
            "vae.checkpoint=null",
            f"data.data_list={data_list}",
            # the two ranks form one tensor-parallel replica, whose encoders the option splits
            "parallel.tensor_parallel=2",
            "parallel.sequence_parallel=true",
            f"training.encoder_data_parallel={encoder_dp}",
        ],
    )
    rt = setup_parallel(cfg, init_distributed(cfg.runtime))
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, rt.device)
    text = build_text_encoder(cfg, rt.device)
    source = EncodedBatches(
        cfg,
        VideoTextDataset(cfg.data, cfg.sample_geometry),
        vae,
        text,
        rt.data_parallel_rank,
        rt.data_parallel,
        "t2v",
        encoder_group=encoder_group(cfg, rt.plan),
    )
    out = []
    for _ in range(count):
        b = source.next_batch()
        out.append({"x0": b.x0_BCTHW, **b.cond})
    return out, source.state_dict()


@pytest.fixture(scope="module")
def demo_list(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    subprocess.run(
        [sys.executable, "tools/prepare_demo_data.py", str(out)], cwd=ROOT, check=True, capture_output=True
    )
    return str(out / "data.txt")


def test_encoder_data_parallel_matches_plain_encoding(demo_list):
    count = 5  # more than one exchange round, odd so the last round is only partly consumed
    plain = run_distributed(_batches, 2, demo_list, False, count, timeout_s=400)
    shared = run_distributed(_batches, 2, demo_list, True, count, timeout_s=400)
    for rank in range(2):
        (p_batches, p_state), (s_batches, s_state) = plain[rank], shared[rank]
        assert p_state == s_state
        for pb, sb in zip(p_batches, s_batches):
            assert set(pb) == set(sb)
            for key in pb:
                torch.testing.assert_close(sb[key], pb[key], rtol=0, atol=0)
    # Both TP ranks of the replica hold the same batches.
    for a, b in zip(shared[0][0], shared[1][0]):
        assert torch.equal(a["x0"], b["x0"])
