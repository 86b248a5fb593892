"""The entry scripts' checks that run before any process group starts."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_video.training.cli import main

ROOT = Path(__file__).parents[2]


def test_missing_vae_checkpoint_fails_before_process_groups(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    initialised = dist.is_initialized()
    code = main("t2v", ["examples/tiny/t2v.yaml", f"vae.checkpoint={tmp_path / 'nope.safetensors'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "vae.checkpoint=" in err and "does not exist" in err and "pretrain_vae.py" in err
    assert dist.is_initialized() == initialised  # nothing was started


def test_missing_init_from_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data.txt"
    data.write_text("")
    code = main(
        "t2v",
        [
            "examples/tiny/t2v.yaml",
            "vae.checkpoint=null",
            f"data.data_list={data}",
            f"training.checkpoint.init_from={tmp_path / 'missing'}",
        ],
    )
    assert code == 2 and "training.checkpoint.init_from=" in capsys.readouterr().err


def test_curriculum_outputs_of_earlier_stages_need_not_exist(tmp_path, capsys, monkeypatch):
    from megatron_video.training.cli import check_inputs
    from megatron_video.training.stage import stage_configs

    monkeypatch.chdir(ROOT)
    data = tmp_path / "data.txt"
    data.write_text("")
    stages = stage_configs("examples/tiny/curriculum.yaml", ["vae.checkpoint=null", f"data.data_list={data}"])
    produced: tuple[Path, ...] = ()
    for _, cfg, stage_dir in stages:
        check_inputs(cfg, produced)  # later stages start from files the earlier ones will write
        produced += (stage_dir,)
    assert len(stages) >= 3


def test_checkpoint_paths_that_name_something_else_fail_before_process_groups(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data.txt"
    data.write_text("")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "events.txt").write_text("x")
    (tmp_path / "save" / "iter_0000003").mkdir(parents=True)  # a save that never finished
    base = ["examples/tiny/t2v.yaml", "vae.checkpoint=null", f"data.data_list={data}"]
    initialised = dist.is_initialized()
    for override, words in [
        (f"training.checkpoint.load_dir={data}", "is not a checkpoint: found a file of 0 B"),
        (f"training.checkpoint.load_dir={tmp_path / 'logs'}", "found a folder holding events.txt"),
        (f"training.checkpoint.load_dir={tmp_path / 'save'}", "only unfinished saves (iter_0000003"),
        (f"training.checkpoint.init_from={tmp_path / 'logs'}", "is neither weights nor a checkpoint"),
        (
            f"training.checkpoint.save_dir={tmp_path / 'save' / 'iter_0000003'}",
            "is one checkpoint, not a save dir",
        ),
    ]:
        assert main("t2v", [*base, override]) == 2
        err = capsys.readouterr().err
        assert override.split("=")[0] in err and words in err, err
    assert dist.is_initialized() == initialised
