"""The recognizer as a training task (svhn.training.Task): its data (labelled folders and the
project's synthetic numbers, through the crop cache), its batches, its loss (the published
recipe's sum of six cross-entropies) and its validation score (the published accuracy, by
svhn.scoring's rule, sharded over ranks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from model import HEADS, flops_per_image
from svhn import exits
from svhn.dataset import CropSet, batch_tensor, concat, load_folder
from svhn.distributed import Ranks
from svhn.images import CROP, RESIZE, random_input
from svhn.scoring import digits_correct
from svhn.synthetic import STYLES, describe_fonts, make_set, set_name
from svhn.text import printable
from svhn.training import TrainingError, held_out, plain_state_dict


@dataclass(frozen=True)
class DataSpec:
    """Where the recognizer's training data come from (train.py's data flags)."""

    data: tuple[str, ...] = ()
    synthetic: int = 0
    synthetic_style: str = "plain"
    val: str | None = None
    val_fraction: float = 0.1
    val_fold: int = 0
    cache: Path = Path.home() / ".cache" / "svhn-ascend"
    workers: int = 2
    seed: int = 0


def load_crops(spec: DataSpec, ranks: Ranks) -> tuple[CropSet, CropSet]:
    """The training and validation crops (rank 0 builds the cache, the others wait and reuse it)."""
    folders = [Path(d) for d in spec.data]
    val_folder = Path(spec.val) if spec.val else None
    for folder in folders + ([val_folder] if val_folder else []):
        if not folder.is_dir():
            raise TrainingError(f"{printable(folder)}: no such folder")
    report = exits.error if ranks.main else (lambda line: None)
    warn = (lambda line: print(f"warning: {line}", flush=True)) if ranks.main else (lambda line: None)
    if spec.synthetic:
        folders.append(spec.cache / set_name(spec.synthetic, spec.seed, spec.synthetic_style))
        if ranks.main:
            exits.note(f"synthetic house numbers: {spec.synthetic}, seed {spec.seed}, {describe_fonts()}")

    def build() -> list[CropSet]:
        try:
            if spec.synthetic:
                make_set(folders[-1], spec.synthetic, spec.seed, STYLES[spec.synthetic_style])
            return [load_folder(f, spec.cache / "crops", spec.workers, report, warn) for f in folders + ([val_folder] if val_folder else [])]
        except OSError as e:  # a read-only or full cache folder
            raise TrainingError(f"{printable(spec.cache)}: the crop cache cannot be written ({e.strerror or e}); pass --cache DIR on a writable disk") from None

    sets = build() if ranks.main else []  # rank 0 renders and caches; the others then find it all in the cache
    ranks.barrier()
    sets = sets or build()
    if val_folder:
        *sets, val = sets
        train = concat(sets)
    else:
        data = concat(sets)
        val_index, train_index = held_out(len(data), spec.val_fraction, spec.seed, spec.val_fold)
        val, train = subset(data, val_index), subset(data, train_index)
    if len(train) == 0 or len(val) == 0:
        raise TrainingError(f"no usable training or validation images ({len(train)} and {len(val)})")
    return train, val


def subset(data: CropSet, index: np.ndarray) -> CropSet:
    return CropSet(data.crops[index], data.targets[index], [data.files[i] for i in index])


class RecognizerTask:
    """The recognizer's batches, loss and validation for svhn.training."""

    name = "recognizer"
    score_name = "whole-number accuracy"
    checkpoint_prefix = "model"

    def __init__(self, train: CropSet, val: CropSet, batch_size: int, seed: int, ranks: Ranks) -> None:
        self.train, self.val, self.batch_size, self.seed, self.ranks = train, val, batch_size, seed, ranks
        self.sampler = DistributedSampler(range(len(train)), num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = max(1, len(self.sampler) // batch_size)
        self._epoch, self._order = None, None

    def describe(self) -> str:
        return f"{len(self.train)} images, validating on {len(self.val)}"

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A pure function of (seed, step, rank): a DistributedSampler order per epoch, random
        54x54 crops from a generator seeded by the step. So --resume at step k continues exactly
        where step k left off."""
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, np.fromiter(iter(self.sampler), dtype=np.int64)
        index = np.sort(self._order[position * self.batch_size : (position + 1) * self.batch_size])
        if len(index) < self.batch_size:  # fewer images than one batch: repeat them
            index = np.resize(self._order, self.batch_size)
        rng = np.random.default_rng([self.seed, step, self.ranks.rank])
        offsets = rng.integers(0, RESIZE - CROP + 1, size=(len(index), 2))
        return batch_tensor(self.train.crops[index], offsets), torch.from_numpy(self.train.targets[index])

    @staticmethod
    def random_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return random_input(n, seed=0), torch.zeros(n, len(HEADS), dtype=torch.int64)

    @staticmethod
    def loss(logits: tuple[torch.Tensor, ...], targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The sum of the six heads' cross-entropies, as the published recipe trains; and each."""
        losses = [nn.functional.cross_entropy(out.float(), targets[:, i]) for i, out in enumerate(logits)]
        return sum(losses), {h: float(x.detach()) for h, x in zip(HEADS, losses)}

    def validate(self, net: nn.Module, ranks: Ranks, channels_last: bool) -> dict:
        """The published accuracy over every rank's shard of the validation crops (centre 54x54,
        as evaluation crops); counts summed over ranks in float32."""
        net.eval()
        correct = scored = 0
        shard = np.arange(ranks.rank, len(self.val), ranks.world)
        step = max(self.batch_size, 64)
        with torch.inference_mode():
            for start in range(0, len(shard), step):
                index = shard[start : start + step]
                x = batch_tensor(self.val.crops[index]).to(ranks.device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                digits = torch.stack([h.argmax(1) for h in net(x)[1:]], 1).cpu()
                correct += int(digits_correct(digits, torch.from_numpy(self.val.targets[index][:, 1:])).sum())
                scored += len(index)
        net.train()
        correct, scored = ranks.sum([correct, scored])
        return {"score": correct / scored, "counts": {"val_correct": correct, "val_scored": scored}, "summary": f"{int(correct)} of {int(scored)}"}

    @staticmethod
    def checkpoint(model: nn.Module) -> dict:
        """Plain fp32 CPU tensors under the published key names (no module. / _orig_mod.)."""
        return plain_state_dict(model)

    @staticmethod
    def flops_per_image() -> int:
        return flops_per_image()
