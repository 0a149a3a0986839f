"""networks.lora beyond plain LoRA: LoRA+ learning rates, dropouts only in training, --scale_weight_norms
(KS max-norm), and DoRA (dora_wd=True) with ComfyUI / A1111's `.dora_scale` layout, loaded back by diffusers."""
from __future__ import annotations

import copy

import pytest
import torch

from library.tiny_models import build_sd15, build_sdxl
from networks.lora import DoRAModule, column_norm, create_network, create_network_from_weights


def randomise(network, seed=0, std=0.2, down_std=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.text_encoder_loras + network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * std)
            if down_std is not None:
                lora.lora_down.weight.copy_(torch.randn(lora.lora_down.weight.shape, generator=g) * down_std)


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    return unet(x, torch.tensor([500, 20]), cond).sample


# ---------------------------------------------------------------------------------------------------------
# LoRA+
# ---------------------------------------------------------------------------------------------------------
def test_loraplus_steps_b_at_ratio_times_the_lr_of_a():
    """One SGD step: Δup = −ratio·lr·∇up and Δdown = −lr·∇down, per part (text encoder ratio 4, UNet ratio 16)."""
    pipe = build_sd15(seed=0)
    network = create_network(1.0, 4, 4, None, pipe.text_encoder, pipe.unet, loraplus_unet_lr_ratio="16",
                             loraplus_lr_ratio="4")
    network.apply_to(pipe.text_encoder, pipe.unet)
    randomise(network)
    groups = network.prepare_optimizer_params(1.0, 0.5, 1e-4)  # large steps: fp32 rounding stays far below
    optimizer = torch.optim.SGD(groups, lr=1e-4)
    before = {id(p): p.detach().clone() for p in network.parameters()}
    hidden = pipe.text_encoder(torch.arange(2, 9).unsqueeze(0))[0]
    out = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), hidden).sample
    out.square().mean().backward()
    optimizer.step()
    checked = 0
    for loras, lr, ratio in ((network.text_encoder_loras, 1.0, 4), (network.unet_loras, 0.5, 16)):
        for lora in loras:
            for param, factor in ((lora.lora_up.weight, ratio), (lora.lora_down.weight, 1)):
                if param.grad is None or not param.grad.abs().max() > 0:
                    continue
                step = (param.detach() - before[id(param)]).double()
                expected = -lr * factor * param.grad.double()
                # fp32 rounding of p + Δ: compare the whole step, relative to its size
                assert (step - expected).norm() <= 1e-3 * expected.norm(), lora.lora_name
                checked += 1
    assert checked > 2 * len(network.unet_loras)  # ups and downs of both parts took part


# ---------------------------------------------------------------------------------------------------------
# dropouts
# ---------------------------------------------------------------------------------------------------------
def test_network_dropouts_act_only_in_training():
    pipe = build_sd15(seed=0)
    plain = copy.deepcopy(pipe.unet)
    reference = create_network(1.0, 4, 4, None, None, plain)
    network = create_network(1.0, 4, 4, None, None, pipe.unet, neuron_dropout=0.3, rank_dropout="0.3",
                             module_dropout="0.3")
    assert {(l.dropout, l.rank_dropout, l.module_dropout) for l in network.unet_loras} == {(0.3, 0.3, 0.3)}
    for net, unet in ((reference, plain), (network, pipe.unet)):
        net.apply_to(None, unet, False, True)
        randomise(net, down_std=0.2)  # the same weights in both
    with torch.no_grad():
        network.eval()
        torch.testing.assert_close(unet_output(pipe.unet), unet_output(plain), rtol=0, atol=0)  # eval: none
        network.train()
        torch.manual_seed(0)
        first = unet_output(pipe.unet)
        torch.manual_seed(1)
        second = unet_output(pipe.unet)
    assert (first - unet_output(plain)).abs().max() > 1e-3 and (first - second).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# --scale_weight_norms
# ---------------------------------------------------------------------------------------------------------
def ks_max_norm(state_dict: dict, max_norm: float):
    """KS LoRANetwork.apply_max_norm_regularization, restated on a state dict (the oracle)."""
    scaled, norms = 0, []
    for key in [k for k in state_dict if k.endswith("lora_down.weight")]:
        down, up = state_dict[key], state_dict[key.replace("lora_down", "lora_up")]
        alpha = state_dict[key.replace("lora_down.weight", "alpha")]
        if down.dim() == 4 and down.shape[2:] == (3, 3):
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        elif down.dim() == 4:
            updown = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
        else:
            updown = up @ down
        updown = updown * alpha / down.shape[0]
        norm = updown.norm().clamp(min=max_norm / 2)
        ratio = torch.clamp(norm, max=max_norm) / norm
        if ratio != 1:
            scaled += 1
            state_dict[key.replace("lora_down", "lora_up")] = up * ratio ** 0.5
            state_dict[key] = down * ratio ** 0.5
        norms.append((updown.norm() * ratio).item())
    return scaled, sum(norms) / len(norms), max(norms)


def test_scale_weight_norms_bounds_every_module_like_ks():
    pipe = build_sd15(seed=0)
    network = create_network(1.0, 4, 2, None, pipe.text_encoder, pipe.unet, conv_dim="2")
    network.apply_to(pipe.text_encoder, pipe.unet)
    randomise(network, std=0.3, down_std=0.3)
    with torch.no_grad():  # one module far below the bound: it must stay untouched
        network.unet_loras[0].lora_up.weight.mul_(1e-4)
    small = network.unet_loras[0].lora_up.weight.detach().clone()
    loras = network.text_encoder_loras + network.unet_loras
    before = torch.stack([l.delta_weight().norm() for l in loras]).detach()
    max_norm = float(before.median())
    oracle_sd = {k: v.detach().clone().float() for k, v in network.state_dict().items()}
    expected = ks_max_norm(oracle_sd, max_norm)

    keys_scaled, mean_norm, top = network.apply_max_norm_regularization(max_norm, "cpu")
    after = torch.stack([l.delta_weight().norm() for l in loras]).detach()
    print(f"max_norm {max_norm:.4f}: norms before max {before.max():.4f}, after max {after.max():.4f}, "
          f"{keys_scaled}/{len(loras)} modules scaled")
    assert keys_scaled == int((before > max_norm).sum()) == expected[0] and 0 < keys_scaled < len(loras)
    assert after.max() <= max_norm * (1 + 1e-5)
    torch.testing.assert_close(after[before <= max_norm], before[before <= max_norm])  # the rest unchanged
    torch.testing.assert_close(after[before > max_norm], torch.full_like(after[before > max_norm], max_norm))
    assert mean_norm == pytest.approx(expected[1], rel=1e-5) and top == pytest.approx(expected[2], rel=1e-5)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value.float(), oracle_sd[key], rtol=1e-5, atol=1e-7)
    assert torch.equal(network.unet_loras[0].lora_up.weight, small)


# ---------------------------------------------------------------------------------------------------------
# DoRA
# ---------------------------------------------------------------------------------------------------------
def comfy_weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """ComfyUI comfy/weight_adapter/base.py weight_decompose (dora_scale on the input axis; A1111's
    apply_weight_decompose is the same): W' = (W + α·ΔW) · m / ‖W + α·ΔW‖_c, result W + s·(W' − W)."""
    weight_calc = weight + lora_diff * alpha
    weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                   .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    weight_calc = weight_calc * (dora_scale / weight_norm)
    return weight + strength * (weight_calc - weight)


def dora_network(seed=0, multiplier=1.0):
    pipe = build_sd15(seed=0)
    base = copy.deepcopy(pipe.unet)
    network = create_network(multiplier, 4, 2, None, pipe.text_encoder, pipe.unet, conv_dim="2", dora_wd="True")
    network.apply_to(pipe.text_encoder, pipe.unet)
    return pipe, base, network


def test_dora_starts_as_identity_and_matches_comfyui_merge(tmp_path):
    pipe, base, network = dora_network()
    assert all(isinstance(l, DoRAModule) for l in network.text_encoder_loras + network.unet_loras)
    with torch.no_grad():
        torch.testing.assert_close(unet_output(pipe.unet), unet_output(base), rtol=0, atol=1e-5)  # m = ‖W‖_c
    randomise(network)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lora in network.unet_loras:  # a trained magnitude differs from ‖W‖_c
            lora.dora_scale.mul_(1 + 0.2 * torch.rand(lora.dora_scale.shape, generator=g))
    network.set_multiplier(0.7)
    path = str(tmp_path / "dora.safetensors")
    network.save_weights(path, torch.float32, {})
    from safetensors.torch import load_file
    tensors = load_file(path)
    # hand merge of the FILE's tensors with ComfyUI's formula at strength 0.7
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for lora in network.unet_loras:
            name = lora.lora_name
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
            dora_scale = tensors[f"{name}.dora_scale"]
            module = merged.get_submodule(lora.module_path)
            in_features = module.weight.shape[1]
            assert dora_scale.shape == (1, in_features, *[1] * (module.weight.dim() - 2))
            diff = (up.flatten(1) @ down.flatten(1)).view(module.weight.shape)
            module.weight.copy_(comfy_weight_decompose(dora_scale, module.weight, diff, scale, 0.7))
        ours, want = unet_output(pipe.unet), unet_output(merged)
    assert (ours - unet_output(base)).abs().max() > 0.05
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-4)

    # and the file loads back (DoRA modules from .dora_scale) to the same outputs
    pipe2 = build_sd15(seed=0)
    loaded, weights = create_network_from_weights(0.7, path, None, pipe2.text_encoder, pipe2.unet)
    assert all(isinstance(l, DoRAModule) for l in loaded.unet_loras)
    loaded.apply_to(pipe2.text_encoder, pipe2.unet)
    loaded.load_state_dict(weights)
    with torch.no_grad():
        torch.testing.assert_close(unet_output(pipe2.unet), ours, rtol=0, atol=1e-5)


def test_dora_trains_magnitude_and_direction():
    pipe, base, network = dora_network()
    groups = network.prepare_optimizer_params(None, 1e-2, 1e-2)
    optimizer = torch.optim.AdamW(groups)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    for _ in range(2):
        optimizer.zero_grad()
        unet_output(pipe.unet).square().mean().backward()
        optimizer.step()
    after = network.state_dict()
    changed = {k.split(".")[1] for k in after if not torch.equal(after[k], before[k])}
    assert {"dora_scale", "lora_up", "lora_down"} <= changed


@pytest.mark.slow
def test_dora_file_loads_in_diffusers_and_changes_the_image(tmp_path):
    """diffusers 0.42 loads a kohya DoRA file for SD/SDXL and applies its LoRA part: it warns and drops the
    `.dora_scale` keys (lora_pipeline.lora_state_dict). The image changes, and equals W + scale·up·down."""
    from tests.test_lora_diffusers import CapturedWarnings, count_peft_layers, hand_merge, sample

    pipe = build_sdxl(seed=0)
    pipe.set_progress_bar_config(disable=True)
    base = sample(pipe)
    merged = copy.deepcopy(pipe)
    tes = [pipe.text_encoder, pipe.text_encoder_2]
    network = create_network(1.0, 4, 2, None, tes, pipe.unet, dora_wd="True")
    network.apply_to(tes, pipe.unet)
    randomise(network)
    ours = sample(pipe)
    network.restore()
    path = str(tmp_path / "dora.safetensors")
    network.save_weights(path, torch.float32, {})
    from safetensors.torch import load_file
    tensors = load_file(path)
    assert sum(k.endswith(".dora_scale") for k in tensors) == len(network.unet_loras + network.text_encoder_loras)
    with CapturedWarnings() as captured:
        pipe.load_lora_weights(path)
    assert count_peft_layers(pipe) == len(network.unet_loras + network.text_encoder_loras)
    with_diffusers = sample(pipe)
    assert (with_diffusers - base).abs().max() > 0.05  # the image changes
    hand_merge(merged, network, tensors, peft=False)
    torch.testing.assert_close(with_diffusers, sample(merged), atol=1e-4, rtol=0)
    assert any("dora_scale" in m for m in captured.messages)
    assert (ours - with_diffusers).abs().max() > 1e-4  # our DoRA output is not diffusers' (magnitude dropped)


@pytest.mark.slow
def test_trainer_scale_weight_norms_bounds_the_saved_file(tmp_path, monkeypatch):
    """--scale_weight_norms 0.02 with a large lr: every module of the saved file has ‖scale·up·down‖ <= 0.02,
    the loop logs KS's max_norm/keys_scaled each step, and without the flag the norms exceed the bound."""
    from safetensors.torch import load_file

    from library import training_loop
    from tests.train_helpers import base_argv, make_images, run_inprocess, save_tiny_sd15

    model = save_tiny_sd15(str(tmp_path / "sd15"))
    make_images(str(tmp_path / "data" / "2_sks photo"), 2)
    logged = []
    real = training_loop._scale_weight_norms
    monkeypatch.setattr(training_loop, "_scale_weight_norms", lambda run: logged.append(real(run)) or logged[-1])

    def norms(path):
        tensors = load_file(path)
        out = []
        for key in [k for k in tensors if k.endswith("lora_down.weight")]:
            down, up = tensors[key].float(), tensors[key.replace("lora_down", "lora_up")].float()
            alpha = float(tensors[key.replace("lora_down.weight", "alpha")])
            out.append((up.flatten(1) @ down.flatten(1)).norm() * alpha / down.shape[0])
        return torch.stack(out)

    bounded = run_inprocess("sd1", base_argv(model, str(tmp_path / "data"), str(tmp_path / "a"), steps=3,
                                             learning_rate=0.05, scale_weight_norms=0.02))
    free = run_inprocess("sd1", base_argv(model, str(tmp_path / "data"), str(tmp_path / "b"), steps=3,
                                          learning_rate=0.05))
    print(f"max module norm: {norms(free).max():.4f} without, {norms(bounded).max():.4f} with the bound 0.02")
    assert norms(bounded).max() <= 0.02 * (1 + 1e-4) < norms(free).max()
    assert [bool(logs) for logs in logged] == [True] * 3 + [False] * 3 and logged[2]["max_norm/keys_scaled"] > 0
    assert logged[2]["max_norm/max_key_norm"] == pytest.approx(0.02, rel=1e-4)


def test_dora_on_fp8_stored_base_weights_uses_the_dequantized_weight():
    """--fp8_base stores W as per-channel scaled fp8: DoRA's m and ‖W + ΔW‖_c must use the dequantized W."""
    from library.memory_modes import base_weight, store_weights_fp8

    pipe = build_sd15(seed=0)
    pipe.unet.requires_grad_(False)
    store_weights_fp8(pipe.unet, torch.float32)
    network = create_network(1.0, 4, 2, None, None, pipe.unet, dora_wd="True")
    network.apply_to(None, pipe.unet, False, True)
    randomise(network)
    with torch.no_grad():
        for lora in network.unet_loras[:5]:
            weight = base_weight(lora.org_module)
            torch.testing.assert_close(lora.dora_scale, column_norm(weight) * 1.0)
            want = comfy_weight_decompose(lora.dora_scale, weight, lora.delta_weight() / lora.scale, lora.scale, 1.0)
            torch.testing.assert_close(lora.decomposed_delta(), want - weight, rtol=1e-4, atol=1e-6)


def test_lycoris_refuses_fp8_base_before_loading():
    from library.errors import UserError
    from networks import network_args as network_args_lib

    with pytest.raises(UserError, match="--fp8_base"):
        network_args_lib.validate("lycoris.kohya", ["algo=lokr"], "sdxl", fp8_base=True)
