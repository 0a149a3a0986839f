"""KS `--debug_dataset`: show what training would see, without loading any model.

KS opens a window per image; here each sample of the first epoch is printed as text: its batch, bucket, crop,
flip and the caption after processing (shuffle, dropout, wildcards, token warmup), drawn exactly as training
draws them (same seed, epoch and batch numbers).
"""
from __future__ import annotations

from library.data.dataset import DatasetGroup
from library.data.loader import batch_steps


def describe_epoch(group: DatasetGroup, epoch: int = 1, accumulation_steps: int = 1) -> list[str]:
    """One line per sample of `epoch` (1-based), batch by batch, in training order (one process)."""
    lines = [f"debug_dataset: epoch {epoch}, {group.num_batches_per_epoch} batches, "
             f"{group.num_train_images} training samples"]
    batches = group.make_batches(epoch)
    steps = batch_steps(0, 0, max(accumulation_steps, 1), len(batches))
    for number, (indices, step) in enumerate(zip(batches, steps)):
        batch = group.load_batch(indices, epoch, number, step=step)
        for position, index in enumerate(indices):
            item = group.items[index]
            top, left = batch["crop_top_lefts"][position].tolist()
            lines.append(f"batch {number} step {step} | {item.path} | bucket {item.bucket_wh[0]}x{item.bucket_wh[1]} "
                         f"| crop top {top} left {left} | caption: {batch['captions'][position]!r}")
    return lines
