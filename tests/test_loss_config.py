"""LossConfig: flags, aliases, validation before any model loads, metadata."""
import argparse

import pytest

from library import families, loss_config
from library.errors import UserError
from library.loss_config import LossConfig


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    loss_config.add_arguments(parser)
    # the model group's flags (the integrator adds them in library/train_util.py)
    parser.add_argument("--v_parameterization", action="store_true")
    parser.add_argument("--zero_terminal_snr", action="store_true")
    parser.add_argument("--precondition_outputs", action="store_true")
    return parser


def build(argv: str, family: str = "sd1") -> LossConfig:
    args = make_parser().parse_args(argv.split())
    kind = families.kind_of(family)
    prediction = ("v_prediction" if args.v_parameterization else "epsilon") if kind == "ddpm" else "flow"
    return LossConfig.from_args(args, family, prediction)


def test_defaults_are_ks_and_spec_defaults():
    cfg = build("")
    assert (cfg.loss_type, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale) == ("l2", "snr", 0.1, 1.0)
    assert (cfg.timestep_sampling, cfg.weighting_scheme, cfg.min_timestep, cfg.max_timestep) == ("uniform", "uniform", 0, 1000)
    assert (cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.sigmoid_scale, cfg.discrete_flow_shift) == (0.0, 1.0, 1.29, 1.0, 3.0)
    assert (cfg.loss_map_mix, cfg.loss_map_update_rate, cfg.loss_map_record) == (0.1, 0.5, "raw")
    assert (cfg.logit_mean_end, cfg.dynamic_fraction, cfg.timestep_clusters, cfg.multires_noise_discount) == (0.65, 0.8, 0, 0.3)
    assert cfg.loss_weights == {"mse": 0.4, "l1": 0.4, "cosine": 0.2} and cfg.cosine_dim == "spatial"
    assert not cfg.needs_loss_map


def test_aliases_write_the_same_dest():
    assert build("--snr_gamma 5").min_snr_gamma == 5.0
    assert build("--min_snr_gamma 3").min_snr_gamma == 3.0
    assert build("--min_snr_gamma 0").min_snr_gamma is None  # KS: 0 is off
    assert build("--training_shift 3", "sd3").timestep_shift == 3.0
    assert build("--timestep_shift 2.5", "sd3").timestep_shift == 2.5


def test_help_marks_experimental_losses():
    text = make_parser().format_help()
    assert "(experimental)" in text and "ew and clustered_mse" in text


def test_valid_combinations_resolve():
    cfg = build("--weighting_scheme logit_normal --logit_mean 0.5", "sd3")
    assert cfg.timestep_sampling == "logit_normal" and cfg.logit_mean == 0.5
    cfg = build("--weighting_scheme mode --timestep_sampling loss_map --mode_scale 1.0", "sd3")
    assert cfg.timestep_sampling == "loss_map" and cfg.loss_map_base_sampling == "mode" and cfg.needs_loss_map
    cfg = build("--precondition_outputs --min_snr_gamma 5", "sd3")
    assert cfg.prediction_type == "flow_x0"
    cfg = build("--loss_type combined --loss_weights mse=1,cosine=0.5 --cosine_dim channel")
    assert cfg.loss_weights == {"mse": 1.0, "l1": 0.0, "cosine": 0.5} and cfg.cosine_dim == "channel"
    cfg = build("--v_parameterization --zero_terminal_snr --scale_v_pred_loss_like_noise_pred --debiased_estimation_loss")
    assert cfg.prediction_type == "v_prediction" and cfg.zero_terminal_snr
    assert build("--loss_type ew").needs_loss_map and build("--loss_map_offset").needs_loss_map
    assert build("--timestep_sampling beta --beta_alpha 2 --beta_beta 3").beta_beta == 3.0


def test_ks_config_defaults_for_unused_options_are_accepted():
    """KS --output_config files list every default; values equal to the defaults must not count as 'given'."""
    cfg = build("--loss_type l2 --huber_c 0.1 --huber_schedule snr --huber_scale 1.0 --logit_mean 0.0 --logit_std 1.0 "
                "--mode_scale 1.29 --discrete_flow_shift 3.0 --multires_noise_discount 0.3 --loss_map_mix 0.1 "
                "--loss_weights mse=0.4,l1=0.4,cosine=0.2")
    assert cfg.loss_type == "l2"


INVALID = [
    # (family, argv, text the message must contain)
    ("sd1", "--min_timestep 500 --max_timestep 500", "--min_timestep 500 must be below --max_timestep"),
    ("sd1", "--min_timestep 900 --max_timestep 100", "--min_timestep"),
    ("sd1", "--max_timestep 1001", "--max_timestep"),
    ("sd1", "--min_timestep -1", "--min_timestep"),
    ("sd1", "--loss_type huber --huber_c 0", "--huber_c"),
    ("sd1", "--loss_type smooth_l1 --huber_scale -1", "--huber_scale"),
    ("sd1", "--weighting_scheme logit_normal", "--weighting_scheme logit_normal: is an SD3"),
    ("sd1", "--weighting_scheme sigma_sqrt", "--weighting_scheme sigma_sqrt"),
    ("sd3", "--weighting_scheme logit_normal --timestep_sampling beta --beta_alpha 2 --beta_beta 2", "conflicts with --timestep_sampling beta"),
    ("sd3", "--weighting_scheme mode --timestep_sampling logit_normal", "conflicts"),
    ("sd1", "--scale_v_pred_loss_like_noise_pred", "--scale_v_pred_loss_like_noise_pred"),
    ("sd3", "--scale_v_pred_loss_like_noise_pred", "--scale_v_pred_loss_like_noise_pred"),
    ("sd1", "--v_parameterization --v_pred_like_loss 0.1", "--v_pred_like_loss"),
    ("sd3", "--v_pred_like_loss 0.1", "--v_pred_like_loss"),
    ("sd1", "--v_pred_like_loss -0.5", "--v_pred_like_loss"),
    ("sd3", "--zero_terminal_snr", "--zero_terminal_snr"),
    ("sdxl", "--precondition_outputs", "--precondition_outputs"),
    ("sd3", "--v_parameterization", "--v_parameterization"),
    ("sd1", "--timestep_shift 3", "--timestep_shift"),
    ("sd3", "--timestep_sampling shift --timestep_shift 3", "shifted twice"),
    ("sd3", "--timestep_shift 0", "--timestep_shift"),
    ("sd1", "--timestep_sampling mode --mode_scale 3", "--mode_scale"),
    ("sd1", "--timestep_sampling mode --mode_scale -1.5", "--mode_scale"),
    ("sd1", "--timestep_sampling beta", "--beta_alpha and --beta_beta"),
    ("sd1", "--timestep_sampling beta --beta_alpha 0 --beta_beta 1", "--beta_alpha"),
    ("sd1", "--timestep_sampling logit_normal --logit_std 0", "--logit_std"),
    ("sd3", "--timestep_sampling shift --discrete_flow_shift 0", "--discrete_flow_shift"),
    ("sd1", "--timestep_sampling sigmoid --sigmoid_scale -2", "--sigmoid_scale"),
    ("sd1", "--timestep_sampling logit_normal_dynamic --dynamic_fraction 0", "--dynamic_fraction"),
    ("sd1", "--min_snr_gamma -5", "--min_snr_gamma"),
    # given but nothing reads them: silent ignores are bugs
    ("sd1", "--logit_mean 0.5", "--logit_mean: has no effect with --timestep_sampling uniform"),
    ("sd3", "--sigmoid_scale 2", "--sigmoid_scale"),
    ("sd1", "--timestep_sampling logit_normal --mode_scale 1.0", "--mode_scale"),
    ("sd1", "--timestep_sampling loss_map --logit_std 2", "--logit_std"),
    ("sd1", "--dynamic_fraction 0.5", "--dynamic_fraction"),
    ("sd1", "--beta_alpha 2", "--beta_alpha"),
    ("sd1", "--huber_c 0.2", "--huber_c: has no effect with --loss_type l2"),
    ("sd1", "--huber_schedule constant", "--huber_schedule"),
    ("sd1", "--loss_weights mse=1", "--loss_weights"),
    ("sd1", "--cosine_dim flat", "--cosine_dim"),
    ("sd1", "--ew_boundary_shift 0.1", "--ew_boundary_shift"),
    ("sd1", "--loss_map_unbiased", "--loss_map_unbiased"),
    ("sd1", "--loss_map_mix 0.3", "--loss_map_mix"),
    ("sd1", "--loss_map_update_rate 0.2", "--loss_map_update_rate"),
    ("sd1", "--loss_map_record weighted", "--loss_map_record"),
    ("sd1", "--cluster_lr_schedule per_cluster", "--cluster_lr_schedule"),
    ("sd1", "--noise_offset_random_strength", "--noise_offset_random_strength"),
    ("sd1", "--adaptive_noise_scale 0.1", "--adaptive_noise_scale"),
    ("sd1", "--multires_noise_discount 0.5", "--multires_noise_discount"),
    ("sd1", "--ip_noise_gamma_random_strength", "--ip_noise_gamma_random_strength"),
    # combined loss weights
    ("sd1", "--loss_type combined --loss_weights mse=1,cosin=2", "did you mean 'cosine'"),
    ("sd1", "--loss_type combined --loss_weights mse=0,l1=0,cosine=0", "--loss_weights"),
    ("sd1", "--loss_type combined --loss_weights mse=-1", "--loss_weights"),
    ("sd1", "--loss_type combined --loss_weights mse", "--loss_weights"),
    # loss map and clusters
    ("sd1", "--timestep_sampling loss_map --loss_map_unbiased --loss_map_mix 0", "--loss_map_unbiased"),
    ("sd1", "--timestep_sampling loss_map --loss_map_mix 1.5", "--loss_map_mix"),
    ("sd1", "--loss_map_offset --loss_map_update_rate 0", "--loss_map_update_rate"),
    ("sd1", "--timestep_clusters -1", "--timestep_clusters"),
    ("sd1", "--timestep_clusters 1001", "--timestep_clusters"),
    # noise extras
    ("sd1", "--noise_offset 0.1 --multires_noise_iterations 6", "cannot be used together"),
    ("sd1", "--noise_offset -0.1", "--noise_offset"),
    ("sd1", "--multires_noise_iterations 0", "--multires_noise_iterations"),
    ("sd1", "--multires_noise_iterations 6 --multires_noise_discount 0", "--multires_noise_discount"),
    ("sd1", "--ip_noise_gamma -0.1", "--ip_noise_gamma"),
    # loss curve offset keeps weights non-negative
    ("sd1", "--loss_curve_offset 1.5", "--loss_curve_offset"),
    ("sd1", "--loss_curve_offset 0.8 --loss_curve_offset_schedule 0.5", "|c| > 1"),
]


@pytest.mark.parametrize("family, argv, expected", INVALID, ids=[f"{f}:{a}" for f, a, _ in INVALID])
def test_invalid_combinations_are_rejected(family, argv, expected):
    with pytest.raises(UserError) as info:
        build(argv, family)
    message = str(info.value)
    assert expected in message
    assert message.startswith("--")  # names the flag first
    assert ";" in message            # ... then says how to fix it


def test_unknown_string_values_suggest_the_closest():
    cfg = LossConfig(loss_type="huberr")
    with pytest.raises(UserError, match="did you mean 'huber'"):
        cfg.validate()


def test_metadata():
    md = build("--timestep_sampling logit_normal --logit_mean 0.3 --loss_type huber --huber_schedule constant "
               "--min_snr_gamma 5").metadata()
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_loss_type"] == "huber" and md["ss_huber_schedule"] == "constant"
    assert md["ss_huber_c"] == "0.1" and md["ss_huber_scale"] == "1.0" and md["ss_min_snr_gamma"] == "5.0"
    assert md["ss_timestep_sampling"] == "logit_normal" and md["ss_logit_mean"] == "0.3" and md["ss_logit_std"] == "1.0"
    assert md["ss_weighting_scheme"] == "uniform" and "ss_mode_scale" not in md
    md = build("--weighting_scheme mode --timestep_sampling loss_map --loss_map_unbiased", "sd3").metadata()
    assert md["ss_timestep_sampling"] == "loss_map" and md["ss_loss_map_base_sampling"] == "mode"
    assert md["ss_mode_scale"] == "1.29" and md["ss_loss_map_unbiased"] == "True" and md["ss_timestep_shift"] == "1.0"
    assert build("").metadata()["ss_min_snr_gamma"] == "None"  # KS writes str(None)
