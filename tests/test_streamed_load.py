"""Streamed single-file loading (library/streamed_load.py): tensor by tensor, bit-identical to the eager load."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library import streamed_load
from library.families import loading
from library.families.sd1 import ADAPTER, SD1Options
from tests.fixtures.tiny import tiny_sd1_paths


def _eager(monkeypatch):
    """Today's load: the whole file in memory, then converted and cast."""
    original = loading.load_single_file_state_dict
    monkeypatch.setattr(loading, "load_single_file_state_dict",
                        lambda path, allow_pickle=False, flag="--pretrained_model_name_or_path", lazy=False:
                        original(path, allow_pickle, flag, lazy=False))


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16])
def test_streamed_single_file_load_is_bit_identical_to_eager(tmp_path, monkeypatch, v2, file_dtype):
    paths = tiny_sd1_paths(v2=v2, v_prediction=v2)
    path = str(tmp_path / "model.safetensors")
    save_file({k: v.to(file_dtype) if v.is_floating_point() else v for k, v in load_file(paths["single_file"]).items()},
              path)
    opts = SD1Options(path, model_config=paths["model_config"], v2=v2, v_parameterization=v2)
    streamed = ADAPTER.load(opts)
    _eager(monkeypatch)
    eager = ADAPTER.load(opts)
    for a, b in ((streamed.denoiser, eager.denoiser), (streamed.vae, eager.vae),
                 (streamed.text_encoders[0], eager.text_encoders[0])):
        assert next(a.parameters()).dtype == torch.float32
        _assert_identical(a, b)


def test_lazy_state_holds_no_bytes_and_views_replay_on_the_file(tmp_path):
    weight = torch.arange(2 * 3 * 4, dtype=torch.float16).reshape(2, 3, 4, 1)
    path = str(tmp_path / "w.safetensors")
    save_file({"w": weight, "step": torch.tensor(7)}, path)
    lazy = streamed_load.lazy_safetensors(path)
    assert all(t.is_meta for t in lazy.values()) and lazy["w"].shape == weight.shape
    assert torch.equal(streamed_load.materialise(lazy["w"][:, :, 1, 0], torch.float32), weight[:, :, 1, 0].float())
    q, k, v = lazy["w"].chunk(3, 1)
    assert torch.equal(streamed_load.materialise(k), weight.chunk(3, 1)[1])
    assert streamed_load.materialise(lazy["step"], torch.float32).dtype == torch.int64  # only floats are cast
    with pytest.raises(RuntimeError, match="eagerly"):
        streamed_load.materialise(torch.cat([lazy["w"], lazy["w"]]))
