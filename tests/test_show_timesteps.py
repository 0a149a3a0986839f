"""tools/show_timesteps.py: its CSVs agree with the unit-tested functions; config files; image; script entry."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from library.losses import huber_c_snr
from library.schedules import sd_alphas_cumprod, snr_from_alphas_cumprod
from library.weighting import MAX_TIMESTEP_WEIGHT, loss_curve_offset_weight, min_snr_weight
from tools import show_timesteps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, list(reader)


def column(rows, header, name):
    i = header.index(name)
    return torch.tensor([float(r[i]) for r in rows], dtype=torch.float64)


def test_ddpm_curves_agree_with_the_library(tmp_path):
    out = tmp_path / "c.csv"
    assert show_timesteps.main(["--model_family", "sd1", "--timestep_sampling", "logit_normal", "--loss_type", "huber",
                                "--min_snr_gamma", "5", "--loss_curve_offset", "0.2", "--step", "10",
                                "--max_train_steps", "100", "--curves_out", str(out)]) == 0
    header, rows = read_csv(out)
    assert ",".join(header) == "index,timestep,sigma,snr,loss_weight,huber_c" and len(rows) == 1000
    index = column(rows, header, "index")
    assert index.tolist() == list(range(1000)) and torch.equal(column(rows, header, "timestep"), index)
    ab = sd_alphas_cumprod()
    snr = snr_from_alphas_cumprod(ab)
    torch.testing.assert_close(column(rows, header, "sigma"), (1 - ab).sqrt(), rtol=1e-9, atol=0)
    torch.testing.assert_close(column(rows, header, "snr"), snr, rtol=1e-9, atol=0)
    expected = min_snr_weight(snr, 5.0, "epsilon") * loss_curve_offset_weight(index / 1000, 10, 100, 0.2)
    torch.testing.assert_close(column(rows, header, "loss_weight"), expected, rtol=1e-9, atol=0)
    huber = column(rows, header, "huber_c")
    torch.testing.assert_close(huber, huber_c_snr(0.1, 1.0, index, snr), rtol=1e-9, atol=0)
    assert huber[0] == pytest.approx(0.9497, abs=5e-5) and huber[999] == pytest.approx(0.1037, abs=5e-5)


def test_flow_curves_and_no_threshold(tmp_path):
    out = tmp_path / "c.csv"
    assert show_timesteps.main(["--model_family", "sd3", "--weighting_scheme", "sigma_sqrt", "--timestep_shift", "3",
                                "--curves_out", str(out)]) == 0
    header, rows = read_csv(out)
    sigma = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    torch.testing.assert_close(column(rows, header, "sigma"), sigma, rtol=1e-9, atol=0)
    torch.testing.assert_close(column(rows, header, "timestep"), 1000 * sigma, rtol=1e-9, atol=0)
    torch.testing.assert_close(column(rows, header, "snr"), ((1 - sigma) / sigma) ** 2, rtol=1e-9, atol=1e-12)
    # σ⁻², bounded by the documented maximum weight (1000: bins 0..30 are capped)
    torch.testing.assert_close(column(rows, header, "loss_weight"), (sigma**-2).clamp(max=MAX_TIMESTEP_WEIGHT),
                               rtol=1e-9, atol=0)
    assert all(r[header.index("huber_c")] == "" for r in rows)  # l2 has no threshold


def test_config_file_under_the_command_line(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[training]\nlearning_rate = 1e-4\nmax_train_steps = 50\n'
                      '[loss]\nmin_snr_gamma = 5.0\nv_parameterization = true\n', encoding="utf-8")
    out = tmp_path / "c.csv"
    assert show_timesteps.main(["--config_file", str(config), "--min_snr_gamma", "3", "--curves_out", str(out)]) == 0
    header, rows = read_csv(out)
    snr = column(rows, header, "snr")
    # γ = 3 from the command line beats 5 from the file; v_parameterization comes from the file
    torch.testing.assert_close(column(rows, header, "loss_weight"), min_snr_weight(snr, 3.0, "v_prediction"),
                               rtol=1e-9, atol=0)


def test_samples_are_reproducible_and_in_range(tmp_path):
    argv = ["--model_family", "sd1", "--min_timestep", "100", "--max_timestep", "300", "--num_samples", "500",
            "--train_batch_size", "4", "--seed", "3"]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert show_timesteps.main(argv + ["--samples_out", str(a)]) == 0
    assert show_timesteps.main(argv + ["--samples_out", str(b)]) == 0
    assert a.read_text() == b.read_text()
    header, rows = read_csv(a)
    assert ",".join(header) == show_timesteps.SAMPLE_HEADER and len(rows) == 500
    t = column(rows, header, "timestep")
    assert float(t.min()) >= 100 and float(t.max()) <= 299
    assert column(rows, header, "step").tolist()[:8] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_image_with_a_loss_map(tmp_path):
    from library.loss_map import LossMap

    loss_map = LossMap()
    loss_map.values[300:400] = 5.0
    map_file = tmp_path / "map.safetensors"
    loss_map.save_file(str(map_file))
    image = tmp_path / "t.png"
    assert show_timesteps.main(["--model_family", "sdxl", "--loss_type", "huber", "--timestep_sampling", "loss_map",
                                "--num_samples", "500", "--loss_map", str(map_file), "--image_out", str(image)]) == 0
    data = image.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000


def test_user_errors_exit_2(capsys):
    assert show_timesteps.main(["--model_family", "sd1", "--weighting_scheme", "logit_normal"]) == 2
    assert "error: --weighting_scheme" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_as_a_script(tmp_path):
    out = tmp_path / "c.csv"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "show_timesteps.py"), "--model_family", "sd3",
                           "--timestep_sampling", "logit_normal", "--curves_out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    header, rows = read_csv(out)
    assert len(rows) == 1000 and float(rows[0][header.index("loss_weight")]) == 1.0
