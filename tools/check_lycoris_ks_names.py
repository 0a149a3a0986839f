"""Compare our SDXL LyCORIS file names with the ones KS writes, on the full-size models (no weights: meta tensors).

    python tools/check_lycoris_ks_names.py --ks_unet /path/to/sd-scripts/library/sdxl_original_unet.py

KS trains SDXL on its own SAI-layout UNet (sd-scripts library/sdxl_original_unet.py). This builds that UNet and
our diffusers SDXL UNet (configs/models/sdxl) on the meta device, gives both to LyCORIS's kohya create_network,
renames ours as networks/lycoris_support.py writes files, and prints per algorithm and per LyCORIS preset (ours
translated for diffusers UNets as the trainer does, networks/lycoris_support.create_network): the modules only one
side has, and the tensors whose key or shape differ. Needs einops (KS's UNet imports it). DoRA is skipped (LyCORIS reads
the frozen weight at construction, which meta tensors do not have).
"""
from __future__ import annotations

import argparse
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALGOS = {"locon": {}, "lokr": {"factor": "8"}, "loha": {}, "locon + train_norm": {"train_norm": "True"}}
# LyCORIS 3.4.0's built-in presets this trainer documents (docs/networks.md), each with algo=locon
PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only", "unet-convblock-only")
ROWS = {**ALGOS, **{f"locon, preset={preset}": {"preset": preset} for preset in PRESETS}}


def load_ks_unet_module(path: str) -> types.ModuleType:
    """KS's sdxl_original_unet.py without its logging helper (its `library` package is not ours)."""
    source = open(path, encoding="utf-8").read()
    source = source.replace("from library.utils import setup_logging", "setup_logging = lambda *a, **k: None")
    module = types.ModuleType("ks_sdxl_original_unet")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def tensor_shapes(network, names: dict[str, str] | None = None) -> dict[str, tuple]:
    out = {}
    for key, value in network.state_dict().items():
        module, _, rest = key.partition(".")
        out[f"{(names or {}).get(module, module)}.{rest}"] = tuple(value.shape)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch
    from diffusers import UNet2DConditionModel
    from lycoris.kohya import create_network as ks_create_network

    from networks.lycoris_support import create_network, file_names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks_unet", required=True, help="sd-scripts library/sdxl_original_unet.py")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--conv_dim", type=int, default=4)
    args = parser.parse_args(argv)

    ks = load_ks_unet_module(args.ks_unet)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = UNet2DConditionModel.load_config(os.path.join(root, "configs", "models", "sdxl"), subfolder="unet")
    with torch.device("meta"):
        ks_unet, ours = ks.SdxlUNet2DConditionModel(), UNet2DConditionModel.from_config(config)
    print("| algo | KS modules | ours | only ours | only KS | tensors of shared modules differing in key or shape |")
    print("|---|---|---|---|---|---|")
    for label, extra in ROWS.items():
        kwargs = dict(algo=label.split()[0].rstrip(","), conv_dim=str(args.conv_dim), conv_alpha="1", **extra)
        networks = []
        for unet, create in ((ks_unet, ks_create_network), (ours, create_network)):
            network = create(1.0, args.dim, 1, None, None, unet, **kwargs)
            network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
            networks.append(network)
        theirs = tensor_shapes(networks[0])
        mine = tensor_shapes(networks[1], file_names(networks[1], ours))
        modules = [{k.split(".")[0] for k in t} for t in (theirs, mine)]
        both = modules[0] & modules[1]
        keys = [{k for k in t if k.split(".")[0] in both} for t in (theirs, mine)]
        differing = len(keys[0] ^ keys[1]) + sum(theirs[k] != mine[k] for k in keys[0] & keys[1])
        print(f"| {label} | {len(modules[0])} | {len(modules[1])} | {', '.join(sorted(modules[1] - modules[0]))} | "
              f"{', '.join(sorted(modules[0] - modules[1])) or '-'} | {differing} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
