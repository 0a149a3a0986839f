"""Streamed single-file loading (library/streamed_load.py): tensor by tensor, bit-identical to the whole-file load
for every family and file format that streams (SD1/SD2, SDXL, SD3/SD3.5 with separate text-encoder files, Flux and
Chroma BFL files), fp32 and fp16 files."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from library import streamed_load, tiny_flux
from library.errors import UserError
from library.families import flux, loading, sd1, sd3, sdxl
from library.families.base import ModelOptions
from library.tiny_models import build_sd35
from tests.fixtures.tiny import tiny_sd1_paths
from tests.fixtures.tiny_sd3 import save_model_config, save_single_file, write_tiny_sd3
from tests.fixtures.tiny_sdxl import write_tiny_sdxl


def _in_dtype(path: str, out: str, dtype: torch.dtype) -> str:
    """A copy of a .safetensors file with its floating-point tensors in `dtype`."""
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}, out)
    return out


def _load_both(load, monkeypatch) -> tuple:
    """(streamed, whole-file) Models from the same `load()`; the streamed one must read every file lazily."""
    opened = []
    lazy = streamed_load.lazy_safetensors
    monkeypatch.setattr(streamed_load, "lazy_safetensors", lambda path: opened.append(path) or lazy(path))
    streamed = load()
    assert opened, "nothing was streamed"
    with streamed_load.whole_files():
        count = len(opened)
        eager = load()
        assert len(opened) == count
    return streamed, eager, opened


def _assert_identical_models(streamed, eager, dtype: torch.dtype = torch.float32) -> None:
    pairs = [(streamed.denoiser, eager.denoiser), (streamed.vae, eager.vae),
             *zip(streamed.text_encoders, eager.text_encoders, strict=True)]
    for a, b in pairs:
        assert next(a.parameters()).dtype == dtype
        # CPU kernels pick their vector paths by alignment (training_loop._own_weight_memory): streamed weights
        # own aligned memory
        assert all(p.data_ptr() % 64 == 0 for p in a.parameters())
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16])
def test_sd1_sd2_streamed_load_is_bit_identical(tmp_path, monkeypatch, v2, file_dtype):
    paths = tiny_sd1_paths(v2=v2, v_prediction=v2)
    path = _in_dtype(paths["single_file"], str(tmp_path / "model.safetensors"), file_dtype)
    opts = sd1.SD1Options(path, model_config=paths["model_config"], v2=v2, v_parameterization=v2)
    _assert_identical_models(*_load_both(lambda: sd1.ADAPTER.load(opts), monkeypatch)[:2])


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return write_tiny_sdxl(str(tmp_path_factory.mktemp("stream_sdxl")))


@pytest.mark.parametrize("file_dtype,weight_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                     (torch.float16, torch.bfloat16)])
def test_sdxl_streamed_load_is_bit_identical(tiny_sdxl, tmp_path, monkeypatch, file_dtype, weight_dtype):
    path = _in_dtype(tiny_sdxl.single_file, str(tmp_path / "sdxl.safetensors"), file_dtype)
    opts = ModelOptions(path, model_config=tiny_sdxl.config_dir, weight_dtype=weight_dtype)
    _assert_identical_models(*_load_both(lambda: sdxl.ADAPTER.load(opts), monkeypatch)[:2], weight_dtype)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """SD3 medium-shaped single files (with T5, and CLIP/T5 as separate files), SD3.5 medium and large."""
    root = str(tmp_path_factory.mktemp("stream_sd3"))
    files = write_tiny_sd3(root)
    pipe = files.pipe
    out = {"sd3": (files.single_file, files.config_dir, {}),
           "sd3_separate_encoders": (files.single_file_no_t5, files.config_dir, {
               "clip_l": os.path.join(root, "clip_l.safetensors"), "clip_g": os.path.join(root, "clip_g.safetensors"),
               "t5xxl": os.path.join(root, "t5xxl.safetensors")})}
    save_file(pipe.text_encoder.state_dict(), out["sd3_separate_encoders"][2]["clip_l"])
    save_file(pipe.text_encoder_2.state_dict(), out["sd3_separate_encoders"][2]["clip_g"])
    save_file({k: v for k, v in pipe.text_encoder_3.state_dict().items() if k != "encoder.embed_tokens.weight"},
              out["sd3_separate_encoders"][2]["t5xxl"])   # files store T5's tied embedding once, as shared.weight
    for variant in ("sd35_medium", "sd35_large"):
        pipe = build_sd35(variant)
        out[variant] = (save_single_file(pipe, os.path.join(root, f"{variant}.safetensors")),
                        save_model_config(pipe, os.path.join(root, f"{variant}_config")), {})
    return out


@pytest.mark.parametrize("case", ["sd3", "sd3_separate_encoders", "sd35_medium", "sd35_large"])
def test_sd3_streamed_load_is_bit_identical(tiny_sd3, tmp_path, monkeypatch, case):
    single_file, config_dir, encoder_files = tiny_sd3[case]
    files = {name: _in_dtype(path, str(tmp_path / f"{name}.safetensors"), torch.float16)
             for name, path in {"model": single_file, **encoder_files}.items()}
    opts = sd3.SD3Options(files.pop("model"), model_config=config_dir, t5xxl_max_token_length=77, **files)
    streamed, eager, opened = _load_both(lambda: sd3.ADAPTER.load(opts), monkeypatch)
    assert len(streamed.text_encoders) == 3 and len(opened) == 1 + len(encoder_files)
    _assert_identical_models(streamed, eager)


@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_flux_chroma_bfl_streamed_load_is_bit_identical(tmp_path, monkeypatch, variant):
    bfl = tiny_flux.write_bfl_files(tiny_flux.build(variant), str(tmp_path / "bfl"))
    files = {name: _in_dtype(bfl[name], str(tmp_path / f"{name}.safetensors"), torch.float16)
             for name in ("transformer", "clip_l", "t5xxl", "ae") if name in bfl}
    opts = flux.FluxOptions(files.pop("transformer"), model_config=bfl["model_config"],
                            model_type="chroma" if variant == "chroma" else "flux", t5xxl_max_token_length=16,
                            **files)
    streamed, eager, opened = _load_both(lambda: flux.ADAPTER.load(opts), monkeypatch)
    assert len(opened) == 1 + len(files)   # the transformer, the AE and the text encoders
    _assert_identical_models(streamed, eager)


def test_lazy_tensors_hold_no_bytes_and_replay_the_converters_ops(tmp_path):
    weight = torch.arange(6 * 4, dtype=torch.float16).reshape(6, 4, 1, 1)
    path = str(tmp_path / "w.safetensors")
    save_file({"w": weight, "step": torch.tensor(7)}, path)
    lazy = streamed_load.lazy_safetensors(path)
    assert all(t.is_meta for t in lazy.values()) and lazy["w"].shape == weight.shape
    w = lazy["w"]
    assert torch.equal(streamed_load.materialise(w[:, :, 0, 0], torch.float32), weight[:, :, 0, 0].float())
    q, k, v = w.chunk(3)
    assert torch.equal(streamed_load.materialise(k), weight.chunk(3)[1])
    # a slice of a fused weight is copied out: it does not keep the whole fused tensor alive
    assert streamed_load.materialise(k).untyped_storage().nbytes() == k.numel() * 2
    # computed tensors (diffusers' swap_scale_shift, OpenCLIP's .clone().detach(), .T.contiguous())
    assert torch.equal(streamed_load.materialise(torch.cat([w[3:], w[:3]])), torch.cat([weight[3:], weight[:3]]))
    assert torch.equal(streamed_load.materialise(w[:2].clone().detach()), weight[:2])
    assert torch.equal(streamed_load.materialise(w[:, :, 0, 0].T.contiguous()), weight[:, :, 0, 0].T)
    assert streamed_load.materialise(lazy["step"], torch.float32).dtype == torch.int64   # only floats are cast
    with pytest.raises(RuntimeError, match="in place"):
        w.mul_(2)
    with pytest.raises(RuntimeError, match="in place"):
        w[0] = 1.0


def test_truncated_file_is_a_user_error_when_opened(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        loading.load_single_file_state_dict(str(path), lazy=True)
