"""--lora_format (a family flag, SD3: peft | kohya): which key style the network writes (docs/lora-format.md).

A network module that can write both has `set_file_format(value)` (networks.lora_sd3). Any other network writes
its own format: the flag is accepted when it names that format and refused otherwise, never ignored.
"""
from __future__ import annotations

from library.errors import UserError


def apply(network, args) -> None:
    """Hand --lora_format (when the family has the flag) to the network; refuse a format it cannot write."""
    value = getattr(args, "lora_format", None)
    if value is None:
        return
    if hasattr(network, "set_file_format"):
        network.set_file_format(value)
        return
    own = getattr(network, "file_format", None)
    if own != value:
        raise UserError(f"--lora_format {value}: --network_module {args.network_module} writes "
                        f"{own or 'its own'} keys only; for KS's SD3 keys (lora_unet_joint_blocks_*) use "
                        "--network_module networks.lora_sd3, or drop --lora_format")
