"""LoRA training for SD3 (rectified flow).

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path MODEL --train_data_dir DATA --output_dir OUT ...

The recipe: parse the KS flags (and --config_file), validate them before any model loads, run the one loop with
the sd3 adapter. Everything else lives in library/ and networks/.
"""
from library import train_util
from library.families import get_adapter
from library.training_loop import train


def main(args) -> None:
    train(args, get_adapter("sd3"))


if __name__ == "__main__":
    raise SystemExit(train_util.run_cli(main, "sd3"))
