"""Quality outputs without a model: VBench file names, the warning filter, contact sheets, the
held-out split, loss-curve smoothing, the ETA line and the config checks of validation and samples."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_video.config import build_config
from megatron_video.data.annotations import Entry
from megatron_video.data.holdout import split_entries
from megatron_video.errors import ConfigError
from megatron_video.inference.contact_sheet import SheetRow, contact_sheet, evenly_spaced
from megatron_video.inference.naming import (
    NAME_MAX_BYTES,
    prompt_from_file_name,
    video_file_name,
    write_manifest,
)
from megatron_video.platform import quiet
from megatron_video.training.metrics import MetricsLogger, format_duration, scalar_tag, smoothed

ROUND_TRIP_PROMPTS = [
    "A person is riding a bike, close-up. Slow-motion!",
    "cats & dogs: 50% off? (yes) [no] {maybe} 'quoted' \"double\" #1 ~tilde~ $5 ^_^",
    "a/b/c path-like prompt with ../.. and a trailing slash/",
    "Ünïcødé café — 猫がピアノを弾く 🎹 Ελληνικά русский",
    "tab\tnew\nline and nul\x00 and del\x7f",
    "prompt ending in a number-3",
    "%2F is not a slash, %% is two percents",
    ".hidden-looking prompt",
]


@pytest.mark.parametrize("prompt", ROUND_TRIP_PROMPTS)
def test_vbench_name_round_trips(prompt, tmp_path):
    for index in (0, 4, 24):
        name = video_file_name(prompt, index)
        assert "/" not in name and "\x00" not in name and len(name.encode()) <= NAME_MAX_BYTES
        assert prompt_from_file_name(name) == (prompt, index)
        (tmp_path / name).write_bytes(b"x")  # a name the file system accepts
        assert prompt_from_file_name(str(tmp_path / name)) == (prompt, index)
    assert len({video_file_name(prompt, i) for i in range(5)}) == 5


def test_vbench_standard_names_are_the_prompt_verbatim():
    # VBench's standard mode looks up exactly f"{prompt}-{index}.mp4" for each prompt of its suite.
    for prompt in ("A person is riding a bike", "a cute happy Corgi playing in park, sunset, animated style"):
        assert video_file_name(prompt, 3) == f"{prompt}-3.mp4"
        # and its custom-input mode reads the prompt back as the stem without the trailing -<number>
        assert re.sub(r"-\d+$", "", Path(video_file_name(prompt, 3)).stem) == prompt


def test_long_prompts_are_cut_tagged_and_listed_in_the_manifest(tmp_path):
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    names = [video_file_name(p, 0) for p in (long_a, long_b, "猫" * 120)]
    assert all(len(n.encode()) <= NAME_MAX_BYTES for n in names) and len(set(names)) == 3
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(ValueError, match="manifest"):
            prompt_from_file_name(name)
    manifest = write_manifest(
        tmp_path / "manifest.json", [{"file": names[0], "prompt": long_a, "index": 0, "seed": 7}]
    )
    assert json.loads(manifest.read_text())[0]["prompt"] == long_a


def test_warning_filter_hides_known_notices_and_keeps_others(monkeypatch):
    monkeypatch.setattr(quiet, "_installed", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        quiet.install_output_filters()
        quiet.install_output_filters()  # idempotent
        warnings.warn(
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn(
            "`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn(
            "full scope is deprecated. Use empty cuda_graph_scope to capture", UserWarning, stacklevel=1
        )
        warnings.warn("something new that a user should see", UserWarning, stacklevel=1)
        warnings.warn(
            "Transformer Engine and Apex are not installed. Falling back", DeprecationWarning, stacklevel=1
        )
    shown = [(str(w.message), w.category) for w in caught]
    assert shown == [
        ("something new that a user should see", UserWarning),
        ("Transformer Engine and Apex are not installed. Falling back", DeprecationWarning),  # other category
    ]
    assert quiet.is_known_notice("Transformer Engine and Apex are not installed. Falling back to x")
    assert not quiet.is_known_notice("Transformer Engine failed to load: libcuda.so")
    leaf = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad"
    assert quiet.is_known_notice(leaf, UserWarning, "megatron.core.optimizer.optimizer")
    # the same text raised from our own code still prints
    assert not quiet.is_known_notice(leaf, UserWarning, "megatron_video.training.loop")


def test_contact_sheet_places_reference_above_generated_and_condition_first():
    rng = np.random.default_rng(0)
    generated = rng.integers(0, 255, (9, 8, 10, 3), dtype=np.uint8)
    reference = rng.integers(0, 255, (9, 8, 10, 3), dtype=np.uint8)
    condition = np.full((8, 10, 3), 200, dtype=np.uint8)
    rows = [SheetRow("a prompt", generated, reference, condition, "PSNR 21.3 dB")]
    sheet = np.asarray(contact_sheet(rows, frames_per_row=3, scale=1))
    assert evenly_spaced(9, 3) == [0, 4, 8] and evenly_spaced(2, 5) == [0, 1]

    def find(tile):
        h, w = tile.shape[:2]
        hits = [
            (y, x)
            for y in range(sheet.shape[0] - h + 1)
            for x in range(sheet.shape[1] - w + 1)
            if np.array_equal(sheet[y : y + h, x : x + w], tile)
        ]
        assert len(hits) == 1, len(hits)
        return hits[0]

    cond_at, gen_first, gen_last = find(condition), find(generated[0]), find(generated[8])
    ref_first = find(reference[0])
    assert cond_at[0] == gen_first[0] == gen_last[0] and cond_at[1] < gen_first[1] < gen_last[1]
    assert ref_first[0] < gen_first[0] and ref_first[1] == gen_first[1]  # reference above its frame


def test_holdout_split_is_stable_and_order_free():
    entries = [Entry(f"/data/clip{i}.mp4", ("c",), 64, 64, False, 9, 8.0) for i in range(10)]
    train, held = split_entries(entries, 0.25, seed=42)
    assert len(held) == 3 and len(train) == 7 and not {e.path for e in held} & {e.path for e in train}
    train_r, held_r = split_entries(entries[::-1], 0.25, seed=42)
    assert [e.path for e in held_r] == [e.path for e in held]  # same entries, same order
    assert {e.path for e in split_entries(entries, 0.25, seed=43)[1]} != {e.path for e in held}
    assert len(split_entries(entries[:2], 0.01, seed=0)[1]) == 1
    with pytest.raises(ConfigError, match="at least 2 entries"):
        split_entries(entries[:1], 0.5, seed=0)


def test_smoothing_eta_and_tags(tmp_path, capsys):
    assert smoothed([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    assert smoothed([0.0, 2.0], 0.5) == pytest.approx([0.0, (0.25 * 0 + 0.5 * 2) / 0.75])
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"
    assert scalar_tag("val_loss_ema") == "val/loss_ema" and scalar_tag("loss") == "train/loss"
    log = MetricsLogger(True, None, 1, str(tmp_path / "m.jsonl"), total_steps=10)
    log.log(1, {"loss": 2.0})
    log.log(2, {"loss": 1.5, "val_loss": 1.2, "val_loss_ema": 1.3})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 1/10 | loss 2.0000") and "eta" in out[0]
    assert "val_loss 1.2000" in out[1] and "val_loss_ema 1.3000" in out[1] and "eta" in out[1]
    png = log.close(str(tmp_path / "curve.png"))
    assert Image.open(png).size[0] > 100
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[1])["val_loss"] == 1.2


def _cfg(**training):
    data = {"model": {"flavor": "tiny"}, "training": training}
    return build_config(data)


def test_validation_and_samples_config_checks():
    with pytest.raises(ConfigError, match="needs validation samples"):
        _cfg(validation={"interval": 5})
    with pytest.raises(ConfigError, match=r"points must be .* in \(0, 1\)"):
        _cfg(validation={"points": [0.0, 0.5]})
    with pytest.raises(ConfigError, match="needs an EMA"):
        build_config(
            {
                "model": {"flavor": "tiny"},
                "data": {"validation_fraction": 0.2},
                "training": {"validation": {"interval": 5}, "ema_decay": None},
            }
        )
    with pytest.raises(ConfigError, match="needs training.samples.prompts"):
        _cfg(samples={"interval": 5})
    with pytest.raises(ConfigError, match="one per prompt"):
        _cfg(samples={"interval": 5, "prompts": ["a", "b"], "condition_images": ["x.jpg"]})
    with pytest.raises(ConfigError, match="validation_fraction and data.validation_data_list"):
        build_config(
            {
                "model": {"flavor": "tiny"},
                "data": {"data_list": "d.txt", "validation_fraction": 0.2, "validation_data_list": "v.txt"},
            }
        )
    with pytest.raises(ConfigError, match="pipeline_parallel"):
        build_config(
            {
                "model": {"flavor": "tiny"},
                "parallel": {"pipeline_parallel": 2},
                "training": {"samples": {"interval": 5, "prompts": ["a"]}},
            }
        )
    cfg = build_config(
        {
            "model": {"flavor": "tiny"},
            "data": {"validation_fraction": 0.2},
            "training": {"validation": {"interval": 5, "points": [0.25, 0.75]}},
        }
    )
    assert cfg.training.validation.points == [0.25, 0.75] and cfg.data.has_validation_split


def test_checkpoint_samples_use_the_training_shift_and_the_prompts_as_written():
    from megatron_video.diffusion.flow import resolution_shift
    from megatron_video.training.checkpoint_samples import sampling_config

    with pytest.raises(ConfigError, match="samples.shift must be > 0"):
        _cfg(samples={"interval": 5, "prompts": ["a"], "shift": 0.0})
    with pytest.raises(ConfigError, match="has no '\\{\\}'"):
        _cfg(samples={"interval": 5, "prompts": ["a"], "prompt_template": "high quality"})
    data = {"max_height": 96, "max_width": 64, "num_frames": 9}
    cfg = build_config(
        {"model": {"flavor": "tiny"}, "data": data, "training": {"samples": {"prompts": ["a"]}}}
    )
    sc = sampling_config(cfg)
    # 96 x 64 pixels -> a 12 x 8 latent (WF-VAE 8x8x8) -> 24 tokens of patch 2: the shift training draws with.
    assert sc.shift == pytest.approx(resolution_shift(12, 8, 2)) and 1.5 < sc.shift < 1.6
    assert sc.prompt_template == "{}" and (sc.height, sc.width, sc.num_frames) == (96, 64, 9)
    fixed = build_config(
        {
            "model": {"flavor": "tiny"},
            "data": data,
            "training": {"objective": {"shift": 3.0}, "samples": {"prompts": ["a"]}},
        }
    )
    assert sampling_config(fixed).shift == 3.0
    own = build_config(
        {
            "model": {"flavor": "tiny"},
            "data": data,
            "training": {"samples": {"prompts": ["a"], "shift": 7.0, "prompt_template": "high quality, {}"}},
        }
    )
    assert (sampling_config(own).shift, sampling_config(own).prompt_template) == (7.0, "high quality, {}")
