"""Checkpoints you can trust: checksums at save, verification (and fall-back) at load, no unpickling of
crafted files, the `verify` command.

Each test saves two checkpoints of the tiny model (iterations 1 and 2, different weights), damages
or rewrites the newest one, and checks what every reader does: the resume (`load_checkpoint` on the
save dir) falls back to iteration 1 or refuses under strict_integrity; an explicit folder, init_from
(`checkpoint_weights`), checkpoint-to-flat and sample_video's weight loading refuse; a crafted pickle
never runs (its marker file is never created).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch

from megatron_video.platform.launch import Runtime
from megatron_video.testing.models import build_model, randomize, tiny_config
from megatron_video.training import checkpoint as ckpt
from megatron_video.training.checkpoint_files import (
    META_FILE,
    CheckpointIntegrityError,
    file_checksum,
    verify_checkpoint,
)
from megatron_video.training.ema import ParamEMA
from megatron_video.training.loop import wrap_ddp
from megatron_video.training.safe_load import UnsafeCheckpointError, loads_plain

pytestmark = pytest.mark.usefixtures("megatron_single")

TOOLS = Path(__file__).parents[2] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_thread_count():
    """The tools' runtime set-up resizes this process's thread pool; put it back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def saved(tmp_path):
    """save_dir with iterations 1 and 2; the raw weights of each."""
    cfg = tiny_config()
    model = build_model(cfg)
    ema = ParamEMA(model, 0.5)
    weights = {}
    for iteration in (1, 2):
        weights[iteration] = randomize(model, seed=iteration)
        ema.shadow.update({k: v.detach().clone().float() for k, v in model.named_parameters()})
        state = {
            "step": iteration,
            "consumed_samples": 4 * iteration,
            "clip": {"mu": 0.5, "initialized": True},
        }
        ckpt.save_checkpoint(
            tmp_path / "ckpt", iteration, [wrap_ddp(model, model.plan, False)], None, None, state, ema=ema
        )
    return tmp_path / "ckpt", weights


def _fresh():
    model = build_model(tiny_config())
    return model, ParamEMA(model, 0.5)


def _load(path, **kwargs):
    model, ema = _fresh()
    state = ckpt.load_checkpoint(path, [wrap_ddp(model, model.plan, False)], ema=ema, **kwargs)
    return state, model


def _biggest_shard(folder: Path) -> Path:
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _damage(folder: Path, how: str) -> str:
    shard = _biggest_shard(folder)
    if how == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    elif how == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.unlink()
    return shard.name


def _rehash(folder: Path, drop_checksums: bool = False) -> None:
    """Rewrite META_FILE's checksums for the folder as it is now (what someone handing it over could do)."""
    meta = json.loads((folder / META_FILE).read_text())
    if drop_checksums:
        meta.pop("checksums", None)
    else:
        for name, entry in meta["checksums"].items():
            entry.update(size=(folder / name).stat().st_size, digest=file_checksum(folder / name))
    (folder / META_FILE).write_text(json.dumps(meta))


def test_save_records_a_checksum_of_every_file_and_a_json_train_state(saved):
    save_dir, _ = saved
    folder = save_dir / "iter_0000002"
    meta = json.loads((folder / META_FILE).read_text())
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {META_FILE}
    assert set(meta["checksums"]) == files and {".metadata", "common.pt"} <= files
    common = torch.load(folder / "common.pt", weights_only=True)
    assert isinstance(common["train_state"], str) and json.loads(common["train_state"])["step"] == 2
    assert verify_checkpoint(folder).state == "ok"
    assert "checksums" not in ckpt.read_checkpoint_metadata(save_dir)


@pytest.mark.parametrize("how", ["flip", "truncate", "missing"])
def test_damaged_newest_checkpoint_falls_back_or_is_refused(saved, how, caplog, capsys):
    save_dir, weights = saved
    newest = save_dir / "iter_0000002"
    shard = _damage(newest, how)

    # Resume from the save dir: the previous checkpoint, with a warning naming the file.
    with caplog.at_level(logging.WARNING):
        state, model = _load(save_dir)
    assert state["step"] == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights[1].items())
    assert any(shard in r.getMessage() and "iter_0000002" in r.getMessage() for r in caplog.records)

    # strict_integrity, an explicit folder, init_from: refused, naming the file.
    for call in (
        lambda: _load(save_dir, strict_integrity=True),
        lambda: _load(newest),
        lambda: _load(save_dir, iteration=2),
        lambda: ckpt.checkpoint_weights(newest),
        lambda: ckpt.checkpoint_weights(save_dir),
    ):
        with pytest.raises(CheckpointIntegrityError, match=shard):
            call()

    # `verify` reports each checkpoint and fails because the newest is bad.
    assert _tool("convert_checkpoint").main(["verify", str(save_dir)]) == 1
    out = capsys.readouterr().out
    assert f"iter_0000002: corrupt ({shard}" in out and "iter_0000001: ok" in out


@pytest.mark.parametrize("how", ["truncate", "missing"])
def test_damaged_checkpoint_without_checksums_is_caught_by_the_metadata(saved, how, caplog):
    """A checkpoint from before checksums: a short or missing shard is found from torch's metadata."""
    save_dir, weights = saved
    newest = save_dir / "iter_0000002"
    _rehash(newest, drop_checksums=True)
    shard = _damage(newest, how)
    with caplog.at_level(logging.WARNING):
        state, model = _load(save_dir)
    assert state["step"] == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights[1].items())
    assert any(shard in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointIntegrityError, match=shard):
        _load(newest)


def test_verify_reports_incomplete_and_unchecked_checkpoints(saved, capsys):
    save_dir, _ = saved
    (save_dir / "iter_0000002" / META_FILE).unlink()  # a folder the save never finished
    _rehash(save_dir / "iter_0000001", drop_checksums=True)
    assert _tool("convert_checkpoint").main(["verify", str(save_dir)]) == 1
    out = capsys.readouterr().out
    assert "iter_0000002: incomplete" in out and "iter_0000001: no checksums" in out


def test_verify_in_a_fresh_process_accepts_a_good_checkpoint(saved):
    """The tool's check must not depend on megatron.core having registered NumPy's array classes."""
    import subprocess
    import sys

    save_dir, _ = saved
    done = subprocess.run(
        [sys.executable, str(TOOLS / "convert_checkpoint.py"), "verify", str(save_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "iter_0000002: ok" in done.stdout and "unsafe" not in done.stdout


def test_checkpoint_without_checksums_and_pickled_train_state_loads_with_warning(saved, caplog, capsys):
    """What checkpoints written before this change look like: no checksums, train_state pickled."""
    save_dir, weights = saved
    folder = save_dir / "iter_0000002"
    common = torch.load(folder / "common.pt", weights_only=True)
    common["train_state"] = pickle.dumps(json.loads(common["train_state"]))
    torch.save(common, folder / "common.pt")
    _rehash(folder, drop_checksums=True)
    with caplog.at_level(logging.WARNING):
        state, model = _load(save_dir)
    assert state["step"] == 2 and state["clip"] == {"mu": 0.5, "initialized": True}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights[2].items())
    assert any("no checksums" in r.getMessage() for r in caplog.records)
    assert _tool("convert_checkpoint").main(["verify", str(save_dir)]) == 0
    assert "iter_0000002: no checksums" in capsys.readouterr().out


class _Payload:
    """Unpickling this runs `code` (what a crafted checkpoint file does)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _craft(folder: Path, where: str, marker: Path) -> None:
    payload = _Payload(f"open({str(marker)!r}, 'w').close()")
    if where == "metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(payload))
    elif where == "train_state":
        common = torch.load(folder / "common.pt", weights_only=True)
        common["train_state"] = pickle.dumps({"step": 2, "x": payload})
        torch.save(common, folder / "common.pt")
    _rehash(folder)  # the checksums match: only the unpickling rules stop it


@pytest.mark.parametrize("where", ["metadata", "train_state"])
def test_crafted_pickles_never_run(saved, where, tmp_path, keep_thread_count):
    save_dir, _ = saved
    marker = tmp_path / "marker"
    _craft(save_dir / "iter_0000002", where, marker)
    assert verify_checkpoint(save_dir / "iter_0000002").state == "ok"  # checksums alone accept it

    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        _load(save_dir)  # never falls back over a crafted file
    with pytest.raises(UnsafeCheckpointError):
        ckpt.checkpoint_weights(save_dir / "iter_0000002")
    with pytest.raises(UnsafeCheckpointError):
        _tool("convert_checkpoint").main(
            ["checkpoint-to-flat", str(save_dir / "iter_0000002"), str(tmp_path / "flat"), "--ema"]
        )
    sample_video = _tool("sample_video")
    model, _ = _fresh()
    runtime = Runtime(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0, plan=model.plan)
    with pytest.raises(UnsafeCheckpointError):
        sample_video.has_inpainting_weights(str(save_dir))
    with pytest.raises(UnsafeCheckpointError):
        sample_video.load_weights(model, runtime, str(save_dir), raw=False)
    assert not marker.exists()
    assert not (tmp_path / "flat.safetensors").exists()


def test_plain_unpickler_admits_builtins_only(tmp_path):
    value = {"a": [1, 2.5, (3, "x"), None, True], "b": {"c": b"d"}}
    assert loads_plain(pickle.dumps(value), "test") == value
    marker = tmp_path / "marker"
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        loads_plain(pickle.dumps(_Payload(f"open({str(marker)!r}, 'w').close()")), "test")
    with pytest.raises(UnsafeCheckpointError, match="collections.OrderedDict"):
        import collections

        loads_plain(pickle.dumps(collections.OrderedDict(a=1)), "test")
    assert not marker.exists()


def test_new_settings_default_and_validate():
    from megatron_video.errors import ConfigError

    training = tiny_config().training
    assert training.max_consecutive_skipped_steps == 20 and training.checkpoint.strict_integrity is False
    training.max_consecutive_skipped_steps = 0
    with pytest.raises(ConfigError, match="max_consecutive_skipped_steps"):
        training.validate()
