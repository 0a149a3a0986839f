"""The KS network-module training API that networks.lora, networks.lora_sd3 and networks.lora_flux share.

The loop (and KS's scripts) call these on any network: hook the LoRA modules into the frozen models, drop a part that
is not trained, set the multiplier, and load tensors already mapped to the network's own names through one checked
path. A network keeps its modules in `text_encoder_loras` and `unet_loras`; each module has `lora_name`,
`multiplier`, `apply_to()` and `restore()`.
"""
from __future__ import annotations

import logging

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)


class KSNetworkAPI:
    text_encoder_loras: list
    unet_loras: list

    def apply_to(self, text_encoders=None, denoiser=None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Hook the modules into the models they were built on; a part not applied is dropped from the network
        (not trained, not saved), as KS does."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()

    def _drop(self, loras: list) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def restore(self) -> None:
        """Undo apply_to: the models compute their base outputs again (the network keeps its weights)."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the modules run inside the checkpointed blocks of the model (KS: a no-op)."""

    def prepare_grad_etc(self, text_encoders=None, denoiser=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoders=None, denoiser=None) -> None:
        self.train()

    def get_trainable_params(self):
        return self.parameters()

    def load_mapped_weights(self, internal: dict[str, torch.Tensor], unknown: list[str], source: str,
                            shape_fix: str, warn: bool = True) -> torch.nn.modules.module._IncompatibleKeys:
        """Load tensors already under the network's own names; a shape that differs is one UserError naming
        `shape_fix`. Returns torch's (missing, unexpected) with the file keys that named no module as unexpected."""
        own = self.state_dict()
        for name, value in internal.items():
            if name in own and own[name].shape != value.shape:
                raise UserError(f"--network_weights: {name} has shape {tuple(value.shape)} in {source} but "
                                f"{tuple(own[name].shape)} in this network; {shape_fix}")
        info = self.load_state_dict(internal, strict=False)
        info = torch.nn.modules.module._IncompatibleKeys(info.missing_keys, info.unexpected_keys + unknown)
        if warn and info.unexpected_keys:
            logger.warning("LoRA weights: %d keys of %s match no module, e.g. %s", len(info.unexpected_keys),
                           source, info.unexpected_keys[:3])
        if warn and info.missing_keys:
            logger.warning("LoRA weights: %d tensors of the network are not in %s, e.g. %s",
                           len(info.missing_keys), source, info.missing_keys[:3])
        return info
