"""Layouts of a stage that fit a cluster, ranked by predicted step time.

Candidates vary TP (with SP when TP > 1), Ulysses CP, PP, recompute and the micro-batch; each is
written into a copy of the config and checked by the config's own validation (heads vs TP x CP,
frames vs CP, blocks vs PP, global batch vs micro-batch x DP), so every layout listed launches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

from megatron_video.config.schema import ExperimentConfig
from megatron_video.errors import ConfigError
from megatron_video.planning.devices import Device
from megatron_video.planning.stage import StagePlan, plan_stage

RECOMPUTE_MODES = ("none", "ffn", "full")


def candidate_configs(
    cfg: ExperimentConfig, devices: int, max_tp: int = 8, max_cp: int = 8, max_pp: int = 4
) -> Iterator[ExperimentConfig]:
    """Valid variants of `cfg` over TP, CP, PP, recompute and micro-batch (global batch kept)."""
    sizes = [1, 2, 4, 8, 16]
    gbs = cfg.training.global_batch_size
    for tp in [s for s in sizes if s <= max_tp]:
        for cp in [s for s in sizes if s <= max_cp]:
            for pp in [s for s in sizes if s <= max_pp]:
                if devices % (tp * cp * pp):
                    continue
                dp = devices // (tp * cp * pp)
                for recompute in RECOMPUTE_MODES:
                    for mb in [s for s in (1, 2, 4, 8, 16, 32) if gbs % (s * dp) == 0]:
                        c = copy.deepcopy(cfg)
                        c.parallel.tensor_parallel, c.parallel.context_parallel = tp, cp
                        c.parallel.pipeline_parallel, c.parallel.sequence_parallel = pp, tp > 1
                        c.parallel.virtual_pipeline = None
                        c.parallel.world_size = devices
                        c.model.recompute, c.model.recompute_num_layers = recompute, None
                        c.training.micro_batch_size = mb
                        try:
                            c.validate(check_files=False)
                        except ConfigError:
                            continue
                        yield c


def search_layouts(
    cfg: ExperimentConfig, devices: int, device: Device, top: int = 10
) -> list[tuple[ExperimentConfig, StagePlan]]:
    """The `top` fitting layouts, fastest predicted step first."""
    fitting = []
    for c in candidate_configs(cfg, devices):
        plan = plan_stage(c, devices, device)
        if plan.fits:
            fitting.append((c, plan))
    fitting.sort(key=lambda item: (item[1].step.step_s, item[1].needed_gb))
    return fitting[:top]
