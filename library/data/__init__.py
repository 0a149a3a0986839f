"""KS-compatible data pipeline: folders / dataset TOML -> scanned, bucketed images -> batch dicts.

    options = DatasetOptions.from_args(args)
    group = build_dataset_group(options)          # every data problem is reported here, before models load
    group.cache_latents(encode_fn, to_disk, cache_key, batch_size, device)   # optional
    loader = make_dataloader(group, options.max_data_loader_n_workers)
    for epoch in range(first_epoch, last_epoch + 1):
        group.set_epoch(epoch)                     # 1-based, as KS
        if resuming_in_this_epoch: group.skip_batches(batches_done)
        for batch in loader: ...

See docs/datasets.md for the user-facing behaviour.
"""
from library.data.blueprint import DatasetConfig, SubsetConfig
from library.data.captions import subset_has_random_captions
from library.data.dataset import CacheStats, DatasetGroup, ImageItem, build_dataset_group
from library.data.loader import BatchDataset, EpochBatchSampler, make_dataloader, unwrap
from library.data.options import DatasetOptions, parse_resolution

__all__ = [
    "BatchDataset", "CacheStats", "DatasetConfig", "DatasetGroup", "DatasetOptions", "EpochBatchSampler",
    "ImageItem", "SubsetConfig", "build_dataset_group", "make_dataloader", "parse_resolution",
    "subset_has_random_captions", "unwrap",
]
