"""Write a tiny, randomly initialised model for smoke tests and demos (offline, a few MB).

    python tools/make_tiny_model.py --out DIR [--single_file FILE [--model_config_out DIR]] [--family sd1]
                                    [--v2] [--v_prediction] [--seed 0]

sd1 (with --v2: SD2-shaped) writes a diffusers folder and, with --single_file, the same weights as an LDM
(A1111 / ComfyUI layout) .safetensors plus the --model_config folder that describes its architecture:

    python train_network.py --pretrained_model_name_or_path FILE --model_config FILE_config ...

sdxl / sd3 write a diffusers folder only.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library import families  # noqa: E402
from library.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="diffusers folder to write")
    parser.add_argument("--single_file", default=None, help="also write an LDM single-file .safetensors (sd1 only)")
    parser.add_argument("--model_config_out", default=None,
                        help="where the single file's --model_config folder goes (default: <single_file stem>_config)")
    parser.add_argument("--family", default="sd1", choices=families.names())
    parser.add_argument("--v2", action="store_true", help="sd1: an SD2-shaped model (OpenCLIP layout, pad '!')")
    parser.add_argument("--v_prediction", action="store_true", help="sd1: scheduler prediction_type v_prediction")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_tiny_model(out: str, single_file: str | None = None, model_config_out: str | None = None,
                    family: str = "sd1", v2: bool = False, v_prediction: bool = False, seed: int = 0) -> dict:
    """Write the model; returns {"diffusers": DIR, "single_file": FILE | None, "model_config": DIR | None}."""
    if single_file and not single_file.lower().endswith(".safetensors"):
        raise UserError(f"--single_file: '{single_file}' must end in .safetensors")
    entry = families.get_family(family)
    given = {"single_file": single_file, "model_config_out": model_config_out, "v2": v2, "v_prediction": v_prediction}
    for name in ("single_file", "v2", "v_prediction"):
        if given[name] and name not in entry.tiny_model_flags:
            able = " or ".join(f.name for f in families.all_families() if name in f.tiny_model_flags)
            raise UserError(f"--{name}: only supported with --family {able}")
    return entry.write_tiny_model(out, seed=seed, **{k: v for k, v in given.items() if k in entry.tiny_model_flags})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = make_tiny_model(args.out, args.single_file, args.model_config_out, args.family, args.v2,
                                args.v_prediction, args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for kind, path in paths.items():
        if path:
            print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
