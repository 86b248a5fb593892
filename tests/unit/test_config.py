"""Typed config: inheritance, overrides, and every validation error before any process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_video.config import (
    ConfigError,
    ExperimentConfig,
    ParallelConfig,
    RuntimeConfig,
    ShapeConfig,
    build_config,
    field_docs,
    load_config,
)
from megatron_video.config.encoders import VAESection
from megatron_video.config.training import (
    CheckpointConfig,
    ClipConfig,
    LoggingConfig,
    ObjectiveConfig,
    OptimizerConfig,
    TrainingConfig,
)
from megatron_video.data.config import (
    DataConfig,
    FeatureCacheConfig,
    I2VMaskConfig,
    SampleGeometry,
    TextConfig,
)
from megatron_video.models.opensora_dit.config import OpenSoraDiTConfig
from megatron_video.models.suv.config import SUVConfig

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_shipped_configs_load():
    with pytest.raises(ConfigError, match="weights are not downloaded for you"):
        load_config(EXAMPLES / "opensoraplan1.5" / "base.yaml")  # the cluster paths do not exist here
    big = load_config(EXAMPLES / "opensoraplan1.5" / "base.yaml", ["data.data_list=null"])
    assert big.model.hidden_size == 3072 and big.vae.flavor == "wfvae_8x8x8_d32"
    tiny = load_config(EXAMPLES / "tiny" / "base.yaml", ["parallel.tensor_parallel=2"])
    assert tiny.model.num_heads == 4 and tiny.parallel.tensor_parallel == 2


def test_inheritance_and_overrides(tmp_path):
    (tmp_path / "parent.yaml").write_text("model: {flavor: tiny, num_heads: 8}\nshape: {text_length: 16}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nmodel: {sparse_n: [1, 4, 8, 4, 1]}\n")
    cfg = load_config(tmp_path / "child.yaml", ["model.head_dim=32", "runtime.seed=7"])
    assert (cfg.model.num_heads, cfg.model.head_dim, cfg.model.sparse_n) == (8, 32, [1, 4, 8, 4, 1])
    assert cfg.model.num_layers == [2, 2, 2, 2, 2]  # from the flavor
    assert cfg.runtime.seed == 7


def test_inheritance_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


TINY = {"model": {"flavor": "tiny"}, "shape": {"text_length": 16, "height": 64, "width": 64}}


def _build(extra: dict, overrides=()):
    data = {k: dict(v) for k, v in TINY.items()}
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    return build_config(data, list(overrides))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"model": {"num_hedas": 4}}, "did you mean 'num_heads'"),
        ({"parallel": {"tensor_paralel": 2}}, "did you mean 'tensor_parallel'"),
        ({"model": {"num_heads": "four"}}, "'model.num_heads' must be an integer"),
        ({"runtime": {"attention_backend": "xformers"}}, "must be one of"),
        ({"parallel": {"tensor_parallel": 3}}, "num_heads=4 must be divisible by parallel.tensor_parallel"),
        (
            {"parallel": {"tensor_parallel": 2, "context_parallel": 4}},
            "divisible by parallel.tensor_parallel x",
        ),
        ({"model": {"num_heads": 6, "head_dim": 16}, "parallel": {"tensor_parallel": 4}}, "num_heads=6"),
        (
            {"parallel": {"sequence_parallel": True}},
            "sequence_parallel=true needs parallel.tensor_parallel > 1",
        ),
        (
            {"shape": {"num_frames": 17}, "parallel": {"context_parallel": 2}},
            "3 latent frames .* not divisible",
        ),
        ({"shape": {"num_frames": 20}}, "1 \\+ a multiple of the VAE temporal stride 8"),
        ({"shape": {"height": 72}}, "shape.height=72 must be a multiple"),
        ({"model": {"num_layers": [2, 2, 2, 2]}}, "odd number"),
        ({"model": {"sparse_n": [1, 2, 4]}}, "sparse_n has 3 entries"),
        ({"model": {"sparse_n": [1, 2, 4, 4, 1]}}, "must mirror"),
        ({"model": {"head_dim": 24}}, "multiple of 16"),
        ({"model": {"flavor": "70B"}}, "unknown model.flavor"),
        ({"parallel": {"pipeline_parallel": 2, "virtual_pipeline": 3}}, "cannot be split evenly"),
        ({"parallel": {"tensor_parallel": 2, "world_size": 6, "context_parallel": 2}}, "world size 6"),
        ({"shape": {"text_length": 15}, "parallel": {"context_parallel": 2}}, "text_length=15"),
        ({"training": {"global_batch_size": 2, "micro_batch_size": 4}}, "global_batch_size=2 must be >="),
        (
            {"training": {"global_batch_size": 6}, "parallel": {"world_size": 4}},
            "not a multiple of micro_batch",
        ),
        ({"training": {"clip": {"mode": "sometimes"}}}, "must be one of"),
        ({"training": {"optimizer": {"lr": 1e-4, "min_lr": 1e-3}}}, "min_lr <= lr"),
        ({"training": {"ema_decay": 1.5}}, "ema_decay must be in"),
        (
            {"training": {"checkpoint": {"preemption_signals": ["SIGKILL"]}}},
            "'SIGKILL' is not a signal that can",
        ),
        ({"training": {"checkpoint": {"preemption_signals": ["TERM"]}}}, "'TERM' is not a signal"),
    ],
)
def test_validation_errors(extra, message):
    assert not dist.is_initialized() or dist.get_world_size() == 1
    with pytest.raises(ConfigError, match=message):
        _build(extra)


def test_training_stage_checks_virtual_pipeline_before_launch():
    stage = EXAMPLES / "tiny" / "t2v.yaml"
    pp = ["parallel.tensor_parallel=1", "parallel.sequence_parallel=false", "parallel.pipeline_parallel=2"]
    vpp = [*pp, "parallel.virtual_pipeline=5"]
    assert load_config(stage, [*vpp, "parallel.world_size=2"]).parallel.virtual_pipeline == 5
    # 4 samples / (2 per micro-batch x 2 data-parallel ranks): one micro-batch, not a multiple of PP=2
    with pytest.raises(ConfigError, match="interleaved schedule needs the micro-batches"):
        load_config(stage, [*vpp, "parallel.world_size=4"])
    with pytest.raises(ConfigError, match="cannot be split evenly"):
        load_config(stage, [*pp, "parallel.virtual_pipeline=3"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.field=value"):
        _build({}, ["model.num_heads"])


def test_cp_frames_valid_example_from_reference():
    # Stride 8 with CP 4 accepts 57 and 89 frames (8 and 12 latents).
    for frames in (57, 89):
        _build({"shape": {"num_frames": frames}, "parallel": {"context_parallel": 4}})


@pytest.mark.parametrize(
    "cls",
    [
        ExperimentConfig,
        ParallelConfig,
        RuntimeConfig,
        ShapeConfig,
        SUVConfig,
        OpenSoraDiTConfig,
        TrainingConfig,
        ObjectiveConfig,
        OptimizerConfig,
        ClipConfig,
        CheckpointConfig,
        LoggingConfig,
        DataConfig,
        SampleGeometry,
        TextConfig,
        I2VMaskConfig,
        FeatureCacheConfig,
        VAESection,
    ],
)
def test_every_field_is_documented(cls):
    import dataclasses

    docs = field_docs(cls)
    undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"


def test_open_sora_plan_recipe_stages_validate_for_512_devices():
    from megatron_video.training.stage import read_curriculum

    stages, _ = read_curriculum(EXAMPLES / "opensoraplan1.5" / "curriculum.yaml")
    assert [s.name for s in stages][:5] == ["image_s1", "image_s2", "image_s3", "image_s4", "video_s1"]
    layouts = {}
    for spec in stages:
        # The recipe's data lists and weights live on the cluster; validate the layout and batch sizes.
        cfg = load_config(spec.config, ["data.data_list=null", "parallel.world_size=512"])
        layouts[spec.name] = (
            cfg.parallel.tensor_parallel,
            cfg.training.accumulation_steps(512 // cfg.parallel.tensor_parallel),
        )
    assert layouts["video_s1"] == (2, 2) and layouts["video_s3"] == (4, 2) and layouts["video_s4"] == (4, 4)
    assert load_config(EXAMPLES / "opensoraplan1.5" / "image_s4.yaml", ["data.data_list=null"]).model.sparse_n == [
        1, 2, 4, 8, 4, 2, 1,
    ]  # fmt: skip


def test_sample_geometry_is_derived_once_from_vae_parallel_and_training(tmp_path):
    """The data pipeline gets the VAE strides, CP size and micro-batch from one computed value;
    DataConfig holds no copy of them, and changing the source changes what the data sees."""
    import dataclasses

    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    assert not data_fields & {"vae_stride_t", "vae_stride_hw", "context_parallel", "batch_size"}
    cfg = load_config(
        EXAMPLES / "tiny" / "base.yaml", ["training.micro_batch_size=2", "training.global_batch_size=4"]
    )
    assert cfg.sample_geometry == SampleGeometry(
        vae_stride_t=8, vae_stride_hw=8, context_parallel=1, micro_batch_size=2
    )
    v13 = build_config(
        {"model": {"flavor": "tiny"}, "vae": {"flavor": "wfvae_4x8x8_d8"}, "shape": {"num_frames": 17}},
        ["parallel.context_parallel=1"],
    )
    assert (v13.sample_geometry.vae_stride_t, v13.latent_grid) == (4, (5, 32, 32))
    with pytest.raises(ConfigError, match="1 \\+ a multiple of the VAE temporal stride 4"):
        build_config(
            {"model": {"flavor": "tiny"}, "vae": {"flavor": "wfvae_4x8x8_d8"}, "shape": {"num_frames": 15}}
        )


def test_flavor_is_expanded_in_one_place():
    from megatron_video.models.suv.config import FLAVORS, with_flavor

    fields = with_flavor({"flavor": "tiny", "num_heads": 8})
    assert fields == {**FLAVORS["tiny"], "num_heads": 8, "flavor": "tiny"}
    assert SUVConfig.from_flavor("tiny", num_heads=8) == build_config({"model": fields}).model
    with pytest.raises(ConfigError, match="unknown model.flavor"):
        with_flavor({"flavor": "70B"})


def test_model_family_is_a_validated_config_choice(tmp_path):
    """`model.family` picks the config class (flavor and version expanded for it), inherits and
    overrides like any field, and a bad choice or geometry fails before launch naming the field."""
    (tmp_path / "dit.yaml").write_text(
        "model: {family: opensora_dit, flavor: tiny, version: v1.2}\nshape: {num_frames: 1, height: 64, "
        "width: 64, text_length: 8}\nvae: {flavor: tiny}\n"
    )
    cfg = load_config(tmp_path / "dit.yaml", ["model.version=v1.3", "model.num_heads=8"])
    assert isinstance(cfg.model, OpenSoraDiTConfig) and cfg.model.family == "opensora_dit"
    assert (cfg.model.in_channels, cfg.model.sparse_n, cfg.model.num_heads) == (8, 4, 8)  # v1.3 preset
    assert isinstance(load_config(EXAMPLES / "tiny" / "base.yaml").model, SUVConfig)  # suv by default
    with pytest.raises(ConfigError, match="unknown model.family 'dit'"):
        load_config(tmp_path / "dit.yaml", ["model.family=dit"])
    with pytest.raises(ConfigError, match="model.num_heads=4 must be divisible"):
        load_config(tmp_path / "dit.yaml", ["parallel.tensor_parallel=4", "parallel.context_parallel=2"])
    with pytest.raises(ConfigError, match="model.sparse_n=8: Skiparse"):
        load_config(tmp_path / "dit.yaml", ["model.sparse_n=8", "shape.height=32", "shape.width=32"])
    with pytest.raises(ConfigError, match="select no block"):
        load_config(tmp_path / "dit.yaml", ["model.version=v1.3", "model.sparse_start=6"])
    with pytest.raises(ConfigError, match="unknown config key 'model.sparse_n_list'"):
        load_config(tmp_path / "dit.yaml", ["model.sparse_n_list=[1]"])


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        (
            "opensoraplan1.2",
            {
                "s1_1x320x240": ((1, 30, 40), 1), "s2_1x640x480": ((1, 60, 80), 1),
                "s3_29x640x480": ((8, 60, 80), 2), "s4_29x1280x720": ((8, 90, 160), 4),
                "s5_93x1280x720": ((24, 90, 160), 8), "i2v_93x640x480": ((24, 60, 80), 8),
            },
        ),
        (
            "opensoraplan1.3",
            {
                "s1_1x320x320": ((1, 40, 40), 1), "s2_93x320x320": ((24, 40, 40), 1),
                "s3_any93x640x640": ((24, 80, 80), 4), "i2v_any93x640x640": ((24, 60, 60), 4),
            },
        ),
    ],
)  # fmt: skip
def test_dit_recipe_stages_validate_for_512_devices(recipe, expected):
    """Every shipped v1.2 / v1.3 stage validates at its largest shape on 512 devices (the data lists and
    weights live on the cluster), with the release's objective, VAE and Skiparse, and its I2V stage
    builds the release's mask width."""
    from megatron_video.training.denoisers import inpaint_mask_channels
    from megatron_video.training.stage import read_curriculum

    stages, _ = read_curriculum(EXAMPLES / recipe / "curriculum.yaml")
    assert {s.name: s.task for s in stages} == {
        name: ("i2v" if name.startswith("i2v") else "t2v") for name in expected
    }
    for spec in stages:
        d = load_config(spec.config, ["data.data_list=null"]).data
        largest = [
            f"shape.num_frames={d.num_frames}",
            f"shape.height={d.max_height}",
            f"shape.width={d.max_width}",
        ]
        cfg = load_config(spec.config, ["data.data_list=null", "parallel.world_size=512", *largest])
        cfg.data.validate(cfg.sample_geometry)
        assert (cfg.latent_grid, cfg.parallel.context_parallel) == expected[spec.name], spec.name
        m, o = cfg.model, cfg.training.objective
        assert isinstance(m, OpenSoraDiTConfig) and m.hidden_size == 2304 and m.num_layers == 32
        if recipe == "opensoraplan1.2":
            assert (m.version, m.sparse_n, m.in_channels, cfg.vae.kind) == ("v1.2", 1, 4, "causal_vae")
            assert (o.kind, o.zero_terminal_snr, o.noise_offset) == ("epsilon", False, 0.02)
            assert (m.interpolation_scale_h, m.interpolation_scale_w) == (
                (1.5, 2.0) if "1280x720" in spec.name else (1.0, 1.0)
            )
        else:
            assert (m.version, list(m.sparse_blocks), m.in_channels) == ("v1.3", list(range(2, 30)), 8)
            assert (o.kind, o.zero_terminal_snr, cfg.vae.flavor) == ("v_prediction", True, "wfvae_4x8x8_d8")
        assert inpaint_mask_channels(cfg, spec.task) == (4 if spec.task == "i2v" else None)
    last = load_config(stages[-1].config, ["data.data_list=null"])  # v1.3 I2V: Min-Max token resolution
    assert last.data.force_resolution == (recipe == "opensoraplan1.2")
