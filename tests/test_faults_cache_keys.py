"""Issue 13 #13: the latent cache key and the text-encoder cache key change with every input that changes what
was cached (and only the latent key ignores the VAE decoder), on SDXL and SD3."""
import types

import pytest
import torch

from library.data.latent_cache import text_encoder_cache_key, vae_cache_key
from library.tiny_models import build_sd3, build_sdxl


@pytest.fixture(scope="module")
def pipes():
    return {"sdxl": build_sdxl(seed=0), "sd3": build_sd3(seed=0, with_t5=True)}


def _options(**overrides):
    base = dict(clip_skip=None, max_token_length=None, t5xxl_max_token_length=256)
    return types.SimpleNamespace(**{**base, **overrides})


def _encoders(pipe):
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None], \
        [getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in names if getattr(pipe, n, None) is not None]


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_latent_key_follows_the_encoder_weights_dtype_and_scaling(pipes, family):
    vae = pipes[family].vae
    key = vae_cache_key(family, vae)
    assert vae_cache_key(family, vae) == key  # deterministic
    with torch.no_grad():
        # a different decoder (e.g. sd-vae-ft-mse) encodes the same latents: same key
        first_decoder = next(p for n, p in vae.named_parameters() if n.startswith("decoder."))
        original = first_decoder.detach().clone()
        first_decoder.add_(1.0)
        assert vae_cache_key(family, vae) == key
        first_decoder.copy_(original)
        # the encoder's last conv and quant_conv: any change is a new key
        for prefix in ("encoder.conv_out", "quant_conv", "encoder.conv_in"):
            named = [(n, p) for n, p in vae.named_parameters() if n.startswith(prefix)]
            if not named:
                continue
            _, param = named[0]
            original = param.detach().clone()
            param.view(-1)[-1] += 0.5  # one element, the last one: the digest samples it
            assert vae_cache_key(family, vae) != key, prefix
            param.copy_(original)
    assert vae_cache_key(family, vae) == key
    assert vae_cache_key(family, vae.to(torch.bfloat16)) != key
    vae.to(torch.float32)
    old = vae.config.scaling_factor
    vae.register_to_config(scaling_factor=old * 2)
    assert vae_cache_key(family, vae) != key
    vae.register_to_config(scaling_factor=old)
    assert vae_cache_key("other", vae) != key


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_text_encoder_key_follows_weights_options_and_encoders(pipes, family):
    encoders, tokenizers = _encoders(pipes[family])
    key = text_encoder_cache_key(family, encoders, tokenizers, _options())
    assert text_encoder_cache_key(family, encoders, tokenizers, _options()) == key
    changed = {
        "max_token_length": _options(max_token_length=225),
        "clip_skip": _options(clip_skip=2),
        "t5xxl_max_token_length": _options(t5xxl_max_token_length=77),
        "apply_t5_attn_mask": _options(apply_t5_attn_mask=True),
    }
    for what, options in changed.items():
        assert text_encoder_cache_key(family, encoders, tokenizers, options) != key, what
    # another base model: every text encoder's weights count, the last one too
    for encoder in encoders:
        param = list(encoder.parameters())[-1]
        original = param.detach().clone()
        with torch.no_grad():
            param.view(-1)[0] += 0.25
        assert text_encoder_cache_key(family, encoders, tokenizers, _options()) != key
        with torch.no_grad():
            param.copy_(original)
    assert text_encoder_cache_key(family, encoders, tokenizers, _options()) == key
    encoders[0].to(torch.bfloat16)
    assert text_encoder_cache_key(family, encoders, tokenizers, _options()) != key
    encoders[0].to(torch.float32)
    if family == "sd3":  # T5 off: the same CLIPs, no T5
        assert text_encoder_cache_key(family, encoders[:2], tokenizers[:2], _options()) != key
