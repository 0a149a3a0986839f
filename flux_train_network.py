"""LoRA training for Flux.1 (dev / schnell) and, with --model_type chroma, Chroma.

    accelerate launch flux_train_network.py --pretrained_model_name_or_path MODEL --t5xxl T5 --ae AE ...

The recipe: parse the KS flags (and --config_file), validate them before any model loads, run the one loop with
the flux adapter. Everything else lives in library/ and networks/. See docs/flux.md.
"""
from library import train_util
from library.families import get_adapter
from library.training_loop import train


def main(args) -> None:
    train(args, get_adapter("flux"))


if __name__ == "__main__":
    raise SystemExit(train_util.run_cli(main, "flux"))
