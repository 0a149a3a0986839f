"""Issue 13 item 6 for Flux.1 and Chroma, on tiny models (their diffusers folders and BFL single files): given to
another trainer they are refused before anything loads, naming flux_train_network.py / chroma_train_network.py;
SD1/SDXL/SD3 models given to the Flux and Chroma trainers likewise; a Chroma model needs --model_type chroma with
flux_train_network.py (KS trains Chroma that way) and then validates."""

import pytest

from library.families import detect, get_family
from tests.fixtures.tiny import tiny_sd1_paths
from tests.test_faults_preflight import SCRIPTS, argv_for, one_line_error, run


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{variant: (diffusers folder, BFL transformer file)} for Flux.1 dev and Chroma."""
    root = tmp_path_factory.mktemp("flux_models")
    out = {}
    for family in ("flux", "chroma"):
        paths = get_family(family).write_tiny_model(str(root / family),
                                                    single_file=str(root / f"{family}_bfl" / "model.safetensors"))
        out[family] = (paths["diffusers"], paths["single_file"])
    return out


@pytest.mark.parametrize("family,what", [("flux", "Flux.1"), ("chroma", "Chroma")])
@pytest.mark.parametrize("form", [0, 1], ids=["folder", "single_file"])
def test_flux_and_chroma_models_given_to_another_trainer_name_their_script(models, tmp_path, monkeypatch, capsys,
                                                                           family, what, form):
    path = models[family][form]
    found = detect.detect(path)
    assert (found.family, found.what) == (family, what)
    for trainer in ("sd1", "sdxl", "sd3", "chroma" if family == "flux" else "sd1"):
        line = one_line_error(*run(trainer, argv_for(tmp_path, model=path), monkeypatch, capsys),
                              "--pretrained_model_name_or_path", f"is a {what} model", SCRIPTS[trainer],
                              f"train it with {SCRIPTS[family]}")
        if family == "chroma":
            assert "or flux_train_network.py --model_type chroma" in line


@pytest.mark.parametrize("form", [0, 1], ids=["folder", "single_file"])
def test_chroma_with_the_flux_trainer_needs_model_type_chroma(models, tmp_path, monkeypatch, capsys, form):
    path = models["chroma"][form]
    one_line_error(*run("flux", argv_for(tmp_path, model=path), monkeypatch, capsys),
                   "--model_type flux", "is a Chroma model", "pass --model_type chroma")
    assert run("flux", argv_for(tmp_path, model=path, model_type="chroma"), monkeypatch, capsys)[0] == "validated"
    assert run("chroma", argv_for(tmp_path, model=path), monkeypatch, capsys)[0] == "validated"
    assert run("flux", argv_for(tmp_path, model=models["flux"][form]), monkeypatch, capsys)[0] == "validated"


def test_sd1_models_given_to_the_flux_and_chroma_trainers(tmp_path, monkeypatch, capsys):
    sd1 = tiny_sd1_paths()
    for path in (sd1["diffusers"], sd1["single_file"]):
        for trainer in ("flux", "chroma"):
            one_line_error(*run(trainer, argv_for(tmp_path, model=path), monkeypatch, capsys),
                           "is an SD1.x model", SCRIPTS[trainer], "train it with train_network.py")
