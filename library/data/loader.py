"""The torch side: a Dataset whose elements are whole batches, and a sampler that names them (epoch, batch number).

The sampler runs in the main process and reads the group's current epoch and skip, so `group.set_epoch` and
`group.skip_batches` take effect at the next `iter(loader)` even with persistent workers (a worker's copy of
the group would not see them; the key it is handed carries them). DataLoader(batch_size=1) + `unwrap` yields
the batch dicts of `DatasetGroup.load_batch` unchanged.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from torch.utils.data import DataLoader, Dataset, Sampler

from library.data.dataset import DatasetGroup

BatchKey = tuple[int, int]  # (epoch, batch number within the epoch)


class BatchDataset(Dataset):
    """Element (epoch, b) is batch b of that epoch, loaded. An int b means the group's current epoch and counts
    from the first batch not skipped."""

    def __init__(self, group: DatasetGroup) -> None:
        self.group = group

    def __len__(self) -> int:
        return self.group.num_batches_per_epoch - self.group.skipped_batches

    def __getitem__(self, key: BatchKey | int) -> dict[str, Any]:
        if isinstance(key, tuple):
            epoch, batch_number = key
        else:
            if not 0 <= key < len(self):
                raise IndexError(key)
            epoch, batch_number = self.group.epoch, key + self.group.skipped_batches
        batch = self.group.make_batches(epoch)[batch_number]
        return self.group.load_batch(batch, epoch, batch_number)


class EpochBatchSampler(Sampler[BatchKey]):
    """Yields (epoch, b) for the batches of the group's current epoch, from the first one not skipped."""

    def __init__(self, group: DatasetGroup) -> None:
        self.group = group

    def __len__(self) -> int:
        return self.group.num_batches_per_epoch - self.group.skipped_batches

    def __iter__(self) -> Iterator[BatchKey]:
        epoch, first = self.group.epoch, self.group.skipped_batches
        return iter([(epoch, b) for b in range(first, self.group.num_batches_per_epoch)])


def batch_steps(step: int, micro_in_epoch: int, accumulation_steps: int, count: int) -> list[int]:
    """The optimizer step (0-based) each of the next `count` batches of an epoch trains in, when `step` steps are
    done and the epoch is `micro_in_epoch` batches in: a step takes `accumulation_steps` batches, counted from the
    start of the epoch (the last step of an epoch may take fewer). KS token warmup reads it."""
    first = micro_in_epoch % accumulation_steps
    return [step + (first + i) // accumulation_steps for i in range(count)]


def unwrap(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for batch_size=1 over pre-made batches: the one element is already the batch."""
    return samples[0]


def make_dataloader(group: DatasetGroup, num_workers: int = 0, persistent_workers: bool = False) -> DataLoader:
    """The training loader: batch dicts of the group's current epoch in order. `num_workers` is capped at the
    CPU count as KS does with --max_data_loader_n_workers."""
    workers = max(0, min(num_workers, os.cpu_count() or 1))
    return DataLoader(BatchDataset(group), batch_size=1, sampler=EpochBatchSampler(group), collate_fn=unwrap,
                      num_workers=workers, persistent_workers=persistent_workers and workers > 0)

