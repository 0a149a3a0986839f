"""LoRA training for Chroma (flux_train_network.py --model_type chroma does the same).

    accelerate launch chroma_train_network.py --pretrained_model_name_or_path MODEL --t5xxl T5 --ae AE ...

The recipe: parse the KS flags (and --config_file), validate them before any model loads, run the one loop with
the chroma adapter. Everything else lives in library/ and networks/. See docs/flux.md.
"""
from library import train_util
from library.families import get_adapter
from library.training_loop import train


def main(args) -> None:
    train(args, get_adapter("chroma"))


if __name__ == "__main__":
    raise SystemExit(train_util.run_cli(main, "chroma"))
