"""Memory modes (library/memory_modes.py): fp8 base weights, --full_bf16 with stochastic rounding, gradient
checkpointing of the denoiser (with CPU offload) and the text encoders, and their validation."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from library import memory_modes as mm
from library.errors import UserError

FP8_REL = 2.0 ** -4   # half an fp8 e4m3 step, relative, for normal values


def _tiny_unet_and_text_encoder():
    """The tiny SD1 UNet and CLIP text encoder (without building a whole pipeline)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    from library.tiny_models import TINY_SD_UNET, clip_text_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SD_UNET).requires_grad_(False)
    return unet, CLIPTextModel(clip_text_config(100)).requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# fp8 base weights
# ----------------------------------------------------------------------------------------------------------------
def _frozen(layer):
    return layer.requires_grad_(False)


def test_quantize_fp8_keeps_every_weight_within_fp8_rounding():
    """Per-channel scaling: every weight (even ones far below fp8's unscaled normal range 2^-6) keeps a relative
    error <= 2^-4 (half of e4m3's 2^-3 mantissa step), except where a channel spans > 2^9 in magnitude."""
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.003          # typical base-model weights; a plain fp8 cast flushes many to 0
    w8, scale = mm.quantize_fp8(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = mm.dequantize_fp8(w8, scale, torch.float32)
    normal = w.abs() >= w.abs().amax(1, keepdim=True) * 2.0 ** -8
    rel = ((back - w).abs() / w.abs())[normal]
    assert rel.max() <= FP8_REL + 1e-6
    plain = w.to(torch.float8_e4m3fn).float()
    assert ((plain - w).abs() / w.abs())[normal].max() > 0.2     # what the scale buys over KS's plain cast


def test_fp8_linear_and_conv_forward_and_input_grad_equal_the_upcast_reference():
    torch.manual_seed(1)
    for layer, x_shape in ((torch.nn.Linear(48, 24), (3, 5, 48)), (torch.nn.Conv2d(6, 8, 3, stride=2, padding=1),
                                                                   (2, 6, 9, 9))):
        layer = _frozen(layer)
        fp32_weight = layer.weight.detach().clone()
        assert mm.store_weights_fp8(torch.nn.Sequential(layer), torch.bfloat16) == 1
        assert layer.weight.dtype == torch.float8_e4m3fn and "weight" not in dict(layer.named_parameters())
        reference_weight = layer.weight.to(torch.bfloat16) * layer.weight_scale.to(torch.bfloat16)
        x = torch.randn(x_shape, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        if isinstance(layer, torch.nn.Linear):
            ref = F.linear(x_ref.bfloat16(), reference_weight, layer.bias.bfloat16())
        else:
            ref = F.conv2d(x_ref.bfloat16(), reference_weight, layer.bias.bfloat16(), 2, 1)
        out = layer(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        (out.float() ** 2).sum().backward()
        (ref.float() ** 2).sum().backward()
        assert x.grad.dtype == torch.float32
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=2 ** -6, atol=1e-2)
        # and the fp8 weight is within fp8 rounding of the original fp32 weight
        rel = (reference_weight.float() - fp32_weight).abs() / fp32_weight.abs().clamp_min(1e-3)
        assert rel.max() <= FP8_REL + 2.0 ** -7     # fp8 rounding, plus bf16's for the product


def test_lora_wrapping_an_fp8_layer_adds_its_update_to_the_upcast_output():
    from networks.lora import LoRAModule

    torch.manual_seed(2)
    layer = _frozen(torch.nn.Linear(32, 16))
    mm.store_weights_fp8(torch.nn.Sequential(layer), torch.bfloat16)
    lora = LoRAModule("lora_unet_x", layer, lora_dim=4, alpha=4).to(torch.bfloat16)
    torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    base = layer(x)
    lora.apply_to()
    out = layer(x)
    expected = base + lora.lora_up(lora.lora_down(x)) * lora.scale
    torch.testing.assert_close(out, expected)
    assert (out - base).abs().max() > 1e-2       # the update is really there
    out.float().sum().backward()
    assert lora.lora_up.weight.grad.dtype == torch.bfloat16 and lora.lora_up.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_fp8_unet_stores_linear_and_conv_weights_in_fp8_at_about_half_the_bf16_bytes():
    unet = _tiny_unet_and_text_encoder()[0].to(torch.bfloat16)
    bf16_bytes = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert mm.store_weights_fp8(unet, torch.bfloat16) == len(layers)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert unet.dtype == torch.bfloat16               # diffusers reads the first parameter: a bias, not fp8
    weight_bytes = lambda dt: sum(m.weight.numel() * torch.finfo(dt).bits // 8 for m in layers)  # noqa: E731
    fp8_store = sum(m.weight.numel() + m.weight_scale.numel() * 4 for m in layers)
    assert fp8_store <= 0.55 * weight_bytes(torch.bfloat16)
    total_after = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    assert total_after < 0.6 * bf16_bytes


def test_modules_a_model_keeps_in_fp32_are_not_stored_in_fp8():
    """T5 casts its FFN input to `wo.weight.dtype`: those layers (its _keep_in_fp32_modules) stay as they are."""
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                 feed_forward_proj="gated-gelu")).requires_grad_(False).to(torch.bfloat16)
    mm.store_weights_fp8(t5, torch.bfloat16)
    ff = t5.encoder.block[0].layer[-1].DenseReluDense
    assert ff.wi_0.weight.dtype == torch.float8_e4m3fn and ff.wo.weight.dtype == torch.bfloat16
    out = t5(input_ids=torch.tensor([[1, 5, 7, 2]])).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_fp8_refuses_patched_or_trainable_layers():
    layer = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="trainable"):
        mm.store_weights_fp8(torch.nn.Sequential(layer), torch.bfloat16)
    layer.requires_grad_(False)
    layer.forward = layer.forward
    with pytest.raises(RuntimeError, match="already patched"):
        mm.store_weights_fp8(torch.nn.Sequential(layer), torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Stochastic rounding
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased_and_returns_a_neighbour(dtype):
    g = torch.Generator().manual_seed(0)
    lo = torch.tensor(1.0, dtype=dtype)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=dtype))
    x = torch.full((200_000,), lo.float() + 0.3 * (hi.float() - lo.float()))   # 30 % of the way up
    r = mm.stochastic_round(x, dtype, g)
    assert r.dtype == dtype and set(r.float().unique().tolist()) == {lo.item(), hi.item()}
    assert abs((r == hi).float().mean().item() - 0.3) < 0.005       # binomial sd ~0.001
    exact = torch.tensor([0.0, -1.5, 3.0, 1024.0])
    assert torch.equal(mm.stochastic_round(exact, dtype, g).float(), exact)
    neg = mm.stochastic_round(-x, dtype, g)
    assert set(neg.float().unique().tolist()) == {-lo.item(), -hi.item()}


def _sgd_with_rounding(rounding: bool, steps=100):
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = torch.optim.SGD([p], lr=1.0)
    if rounding:
        mm.StochasticRounding(opt, seed=3)
    for _ in range(steps):
        p.grad = torch.full_like(p, 2.0 ** -12)   # 1/32 of a bf16 step at 1.0: lost by round-to-nearest
        opt.step()
        assert p.dtype == torch.bfloat16
    return p


def test_stochastic_rounding_keeps_updates_below_the_bf16_step():
    assert torch.all(_sgd_with_rounding(False) == 1.0)
    p = _sgd_with_rounding(True)
    expected = 1.0 - 100 * 2.0 ** -12        # 0.9756; one bf16 step below 1 is 2^-8
    assert abs(p.float().mean().item() - expected) < 0.002


def test_stochastic_rounding_state_round_trips_in_fp32():
    """Adam state is fp32 (the optimizer steps on fp32 copies) and survives state_dict/load_state_dict with bf16
    parameters; the next step after loading equals the next step of the original."""
    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
        opt = torch.optim.AdamW([p], lr=1e-3)
        mm.StochasticRounding(opt, seed=5)
        return p, opt

    p, opt = make()
    for i in range(3):
        p.grad = torch.full_like(p, 0.1 * (i + 1))
        opt.step()
    saved = opt.state_dict()
    assert saved[mm.StochasticRounding.STATE_KEY] == 3
    assert saved["state"][0]["exp_avg"].dtype == torch.float32
    q, opt2 = make()
    with torch.no_grad():
        q.copy_(p)
    opt2.load_state_dict(copy.deepcopy(saved))   # as read back from disk: no shared tensors
    assert q.dtype == torch.bfloat16 and opt2.state[q]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"], rtol=0, atol=0)
    for param, o in ((p, opt), (q, opt2)):
        param.grad = torch.full_like(param, 0.4)
        o.step()
    assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------
def _lora_grads(models, network, run):
    network.zero_grad(set_to_none=True)
    run().float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_checkpointing_with_cpu_offload_and_text_encoders_gives_the_same_lora_gradients():
    from networks import lora

    unet, te = _tiny_unet_and_text_encoder()
    network = lora.create_network(1.0, 4, 4, None, te, unet)
    network.apply_to(te, unet, True, True)
    for p in network.parameters():   # non-zero up weights so every LoRA module has a gradient
        torch.nn.init.normal_(p, std=0.05)
    models = SimpleNamespace(denoiser=unet, text_encoders=[te])
    ids = torch.randint(0, te.config.vocab_size, (2, 77))
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])

    def run():
        return unet(latents, t, te(ids)[0]).sample

    unet.train(), te.train()
    plain = _lora_grads(models, network, run)
    options = mm.MemoryOptions(gradient_checkpointing=True, cpu_offload_checkpointing=True)
    mm.enable_gradient_checkpointing(models, network, options, train_text_encoder=True)
    assert any(getattr(m, "_gradient_checkpointing_func", None) is mm._offloading_gradient_checkpointing_func
               and m.gradient_checkpointing for m in unet.modules())
    assert any(getattr(m, "gradient_checkpointing", False) for m in te.modules())
    checkpointed = _lora_grads(models, network, run)
    assert plain.keys() == checkpointed.keys()
    assert any(k.startswith("text_encoder") or "_te_" in k for k in plain)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def _args(**kw):
    base = dict(mixed_precision="no", full_fp16=False, full_bf16=False, stochastic_rounding=False, fp8_base=False,
                fp8_base_unet=False, gradient_checkpointing=False, cpu_offload_checkpointing=False)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw, message", [
    (dict(mixed_precision="fp16"), "--mixed_precision fp16: needs a GPU"),
    (dict(mixed_precision="bf16", full_fp16=True), "--full_fp16: needs --mixed_precision fp16"),
    (dict(full_bf16=True), "--full_bf16: needs --mixed_precision bf16"),
    (dict(mixed_precision="bf16", full_bf16=True, full_fp16=True), "exclude each other"),
    (dict(mixed_precision="bf16", stochastic_rounding=True), "--stochastic_rounding: .* add --full_bf16"),
    (dict(fp8_base=True), "--fp8_base: .* add --mixed_precision bf16"),
    (dict(fp8_base_unet=True), "--fp8_base_unet: .* add --mixed_precision"),
    (dict(cpu_offload_checkpointing=True), "--cpu_offload_checkpointing: .* add --gradient_checkpointing"),
])
def test_memory_flags_are_validated_with_the_fix_named(kw, message):
    with pytest.raises(UserError, match=message):
        mm.MemoryOptions.from_args(_args(**kw), accelerator_available=False)


def test_memory_options_from_valid_flags():
    o = mm.MemoryOptions.from_args(_args(mixed_precision="bf16", full_bf16=True, stochastic_rounding=True,
                                         fp8_base=True, fp8_base_unet=True), accelerator_available=False)
    assert (o.full_dtype, o.stochastic_rounding, o.fp8_denoiser, o.fp8_text_encoders, o.compute_dtype) == \
        (torch.bfloat16, True, True, False, torch.bfloat16)       # --fp8_base_unet wins for the text encoders (KS)
    o = mm.MemoryOptions.from_args(_args(mixed_precision="fp16", full_fp16=True, fp8_base=True),
                                   accelerator_available=True)
    assert (o.full_dtype, o.fp8_text_encoders, o.compute_dtype) == (torch.float16, True, torch.float16)


def test_fp16_on_cpu_is_refused_before_any_model_loads(tmp_path):
    from library import train_util, training_loop
    from library.families import get_adapter

    (tmp_path / "1_x").mkdir()
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "missing"), "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path), "--mixed_precision", "fp16"]
    if mm.has_accelerator():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="--mixed_precision fp16"):
        training_loop.validate(train_util.parse_args("sd1", argv), get_adapter("sd1"))


def test_full_fp16_lets_the_grad_scaler_unscale_fp16_gradients():
    """accelerate's GradScaler refuses fp16 gradients; --full_fp16 allows them (KS patch_accelerator_for_fp16_training).
    Checked with torch's CPU GradScaler: grad 2 scaled by 4, unscaled back to 2, SGD lr 0.5 takes 1 to 0."""
    def scaled_step(scaler):
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
        optimizer = torch.optim.SGD([p], lr=0.5)
        scaler.scale((p.float() * 2).sum()).backward()
        return p, optimizer

    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    p, optimizer = scaled_step(scaler)
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    mm.prepare_accelerator(SimpleNamespace(scaler=scaler), mm.MemoryOptions(full_dtype=torch.float16))
    p, optimizer = scaled_step(scaler)
    scaler.step(optimizer)
    assert torch.equal(p.grad, torch.full_like(p, 2.0)) and torch.equal(p, torch.zeros_like(p))


@pytest.mark.parametrize("weight_dtype,no_half_vae,force_upcast,expected", [
    (torch.float32, False, False, torch.float32),
    (torch.bfloat16, False, True, torch.bfloat16),   # KS: the mixed-precision dtype; bf16 has fp32's range
    (torch.bfloat16, True, False, torch.float32),    # --no_half_vae
    (torch.float16, False, False, torch.float16),    # an fp16-fixed VAE (force_upcast: false)
    (torch.float16, False, True, torch.float32),     # the SDXL 1.0 VAE would overflow
    (torch.float16, True, False, torch.float32),
])
def test_vae_dtype_follows_ks_except_where_fp16_overflows(weight_dtype, no_half_vae, force_upcast, expected):
    assert mm.vae_dtype(weight_dtype, no_half_vae, force_upcast) == expected


@pytest.mark.slow
@pytest.mark.parametrize("no_half_vae", [False, True])
def test_latents_are_cached_by_a_bf16_vae_unless_no_half_vae(sd15, dataset, tmp_path, monkeypatch, no_half_vae):
    from accelerate.state import AcceleratorState

    from library import training_loop
    from tests.train_helpers import base_argv, run_inprocess

    seen = []
    original = training_loop._cache_latents

    def cache_latents(args, adapter, models, group, accelerator):
        seen.append(next(models.vae.parameters()).dtype)
        original(args, adapter, models, group, accelerator)

    monkeypatch.setattr(training_loop, "_cache_latents", cache_latents)
    extra = {"no_half_vae": True} if no_half_vae else {}
    AcceleratorState._reset_state(True)  # bf16: other tests of this process set up accelerate without it
    try:
        run_inprocess("sd1", base_argv(sd15, dataset, str(tmp_path), steps=1, cache_latents=True,
                                       mixed_precision="bf16", **extra))
    finally:
        AcceleratorState._reset_state(True)
    assert seen == [torch.float32 if no_half_vae else torch.bfloat16]
