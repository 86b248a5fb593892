"""The validation split: which annotation entries are held out of training.

`data.validation_fraction` holds out a fraction of `data.data_list`, chosen by a hash of each entry's
media path and cut (and `data.seed`), so the split does not depend on the order of the annotation
files, on the layout or on a resume; `data.validation_data_list` names a separate list instead.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from megatron_video.data.annotations import Entry, load_annotations
from megatron_video.data.config import DataConfig
from megatron_video.errors import ConfigError


def _score(entry: Entry, seed: int) -> str:
    """A stable, order-free key of an entry (its path and cut), salted by the data seed."""
    return hashlib.sha256(f"{seed}|{entry.path}|{entry.cut}".encode()).hexdigest()


def split_entries(entries: Sequence[Entry], fraction: float, seed: int) -> tuple[list[Entry], list[Entry]]:
    """(training, held out): the ceil(fraction x N) entries with the smallest keys are held out, in
    key order; at least one when fraction > 0, and at least one entry stays for training."""
    if not 0 < fraction < 1:
        return list(entries), []
    if len(entries) < 2:
        raise ConfigError(
            f"data.validation_fraction={fraction} needs at least 2 entries in data.data_list, found "
            f"{len(entries)}; use data.validation_data_list or more data"
        )
    count = min(len(entries) - 1, max(1, math.ceil(fraction * len(entries))))
    ranked = sorted(range(len(entries)), key=lambda i: _score(entries[i], seed))
    held = set(ranked[:count])
    return [e for i, e in enumerate(entries) if i not in held], [entries[i] for i in ranked[:count]]


def training_entries(cfg: DataConfig) -> list[Entry] | None:
    """The entries training reads when a fraction is held out; None: all of `data_list` (read as usual)."""
    if cfg.validation_fraction <= 0:
        return None
    entries, _ = load_annotations(cfg.data_list, check_files_exist=cfg.check_files_exist)
    return split_entries(entries, cfg.validation_fraction, cfg.seed)[0]


def validation_entries(cfg: DataConfig) -> list[Entry]:
    """The validation entries: the held-out fraction of `data_list`, or every entry of `validation_data_list`."""
    if cfg.validation_data_list:
        entries, _ = load_annotations(cfg.validation_data_list, check_files_exist=cfg.check_files_exist)
        if not entries:
            raise ConfigError(f"data.validation_data_list={cfg.validation_data_list} lists no readable entry")
        return entries
    if cfg.validation_fraction <= 0:
        raise ConfigError("no validation samples: set data.validation_fraction or data.validation_data_list")
    entries, _ = load_annotations(cfg.data_list, check_files_exist=cfg.check_files_exist)
    return split_entries(entries, cfg.validation_fraction, cfg.seed)[1]
