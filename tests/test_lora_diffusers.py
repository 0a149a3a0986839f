"""Our LoRA files in diffusers: every module attaches, and three ways of applying the LoRA agree.

For each family: a tiny pipeline, a network with random non-zero up weights, a saved file. Then
  (a) diffusers' pipe.load_lora_weights(file): PEFT injects exactly one LoRA layer per module of the file, no
      warning about unexpected / missing keys;
  (b) a hand merge W + (alpha/rank)·up·down (kohya) or W + B·A (PEFT) of the FILE's tensors into a copy of the
      base weights, written here independently of networks/lora.py's math;
  (c) our LoRANetwork applied to the models;
give the same pipeline output (latents of a 1-step sample with CFG, so text encoders and denoiser both count)
within 1e-4, and that output differs from the base pipeline's.
"""
from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file

from library.tiny_models import build_sd15, build_sd3, build_sdxl
from networks.lora import create_network

CASES = {
    # case: (builder, network_args)
    "sd1": (build_sd15, {}),
    "sd1_locon": (build_sd15, {"conv_dim": "2", "conv_alpha": "3"}),
    "sdxl": (build_sdxl, {}),
    "sdxl_locon": (build_sdxl, {"conv_dim": "2", "conv_alpha": "1"}),
    "sd3": (build_sd3, {}),
}


def denoiser(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def text_encoders(pipe) -> list:
    if hasattr(pipe, "text_encoder_3"):
        return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    if hasattr(pipe, "text_encoder_2"):
        return [pipe.text_encoder, pipe.text_encoder_2]
    return [pipe.text_encoder]


def sample(pipe) -> torch.Tensor:
    """A 1-step sample with CFG: the denoiser's raw outputs (captured by a hook; they carry the full LoRA
    effect, the scheduler step shrinks it) followed by the final latents, flattened."""
    predictions = []

    def keep_output(module, args, output):
        predictions.append((output[0] if isinstance(output, (tuple, list)) else output.sample).detach().clone())

    hook = denoiser(pipe).register_forward_hook(keep_output)
    try:
        with torch.no_grad():
            latents = pipe("a photo of a red cat", negative_prompt="blurry", num_inference_steps=1,
                           guidance_scale=4.0, height=32, width=32, output_type="latent",
                           generator=torch.Generator().manual_seed(0)).images
    finally:
        hook.remove()
    return torch.cat([p.flatten() for p in predictions] + [latents.flatten()])


def randomise_up_weights(network, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.text_encoder_loras + network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * std)


def hand_merge(pipe, network, file_tensors: dict, peft: bool) -> None:
    """W += ΔW from the file's tensors, for the module each network entry wraps (located by component/path)."""
    with torch.no_grad():
        for lora in network.text_encoder_loras + network.unet_loras:
            module = getattr(pipe, lora.component).get_submodule(lora.module_path)
            if peft:
                down = file_tensors[f"{lora.peft_name}.lora_A.weight"]
                up = file_tensors[f"{lora.peft_name}.lora_B.weight"]
                scale = 1.0
            else:
                down = file_tensors[f"{lora.lora_name}.lora_down.weight"]
                up = file_tensors[f"{lora.lora_name}.lora_up.weight"]
                scale = float(file_tensors[f"{lora.lora_name}.alpha"]) / down.shape[0]
            if down.dim() == 4:  # conv: up is 1×1, ΔW[o,i,:,:] = Σ_r up[o,r] down[r,i,:,:]
                delta = (up.flatten(1) @ down.flatten(1)).view(module.weight.shape)
            else:
                delta = up @ down
            module.weight += scale * delta


class CapturedWarnings(logging.Handler):
    """Collects warnings from diffusers / transformers / peft loggers (diffusers' logger does not propagate)."""
    NAMES = ("diffusers", "transformers", "peft")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self._levels = {}
        for name in self.NAMES:
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.WARNING)
            lg.addHandler(self)
        self._warnings = warnings.catch_warnings(record=True)
        self._records = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.messages += [str(w.message) for w in self._records]
        self._warnings.__exit__(*exc)
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(self._levels[name])

    def about_keys(self) -> list[str]:
        return [m for m in self.messages if any(w in m.lower() for w in ("key", "lora", "unexpected", "missing"))]


def count_peft_layers(pipe) -> int:
    from peft.tuners.lora import LoraLayer

    components = [c for c in text_encoders(pipe) + [denoiser(pipe)] if c is not None]
    return sum(isinstance(m, LoraLayer) for c in components for m in c.modules())


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    builder, network_args = CASES[request.param]
    pipe = builder(seed=0)
    pipe.set_progress_bar_config(disable=True)
    base = sample(pipe)
    pipe_diffusers, pipe_merged = copy.deepcopy(pipe), copy.deepcopy(pipe)

    tes = text_encoders(pipe)
    network = create_network(1.0, 4, 2.0, pipe.vae, tes if len(tes) > 1 else tes[0], denoiser(pipe),
                             **network_args)
    network.apply_to(tes, denoiser(pipe))
    randomise_up_weights(network)
    ours = sample(pipe)

    file = str(tmp_path_factory.mktemp(request.param) / "lora.safetensors")
    network.save_weights(file, torch.float32, {"ss_network_dim": "4"})
    return dict(name=request.param, network=network, file=file, base=base, ours=ours,
                pipe_diffusers=pipe_diffusers, pipe_merged=pipe_merged)


def test_diffusers_attaches_every_module_and_matches_hand_merge_and_network(case):
    network, file = case["network"], case["file"]
    n_modules = len(network.text_encoder_loras) + len(network.unet_loras)
    file_tensors = load_file(file)
    peft = network.file_format == "peft"
    n_file_modules = len({k.rsplit(".", 2)[0] for k in file_tensors}) if peft else \
        len({k.split(".")[0] for k in file_tensors})
    assert n_file_modules == n_modules

    pipe = case["pipe_diffusers"]
    with CapturedWarnings() as captured:
        pipe.load_lora_weights(file)
    assert captured.about_keys() == []
    assert count_peft_layers(pipe) == n_modules  # every module in the file attached, none dropped
    with_diffusers = sample(pipe)

    hand_merge(case["pipe_merged"], network, file_tensors, peft)
    merged = sample(case["pipe_merged"])

    assert (case["ours"] - case["base"]).abs().max() > 0.1  # the LoRA changes the output (1000× the tolerance)
    torch.testing.assert_close(with_diffusers, merged, atol=1e-4, rtol=0)
    torch.testing.assert_close(case["ours"], merged, atol=1e-4, rtol=0)


def test_warning_capture_sees_a_dropped_key(tmp_path):
    """The no-warning assertion above can fail: a key naming a module the model lacks is reported."""
    from safetensors.torch import save_file

    pipe = build_sd3(seed=0)
    tensors = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
               "transformer.transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad)
    with CapturedWarnings() as captured:
        pipe.load_lora_weights(bad)
    assert any("transformer_blocks.9" in m for m in captured.about_keys())
    assert count_peft_layers(pipe) == 1
