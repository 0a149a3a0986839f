"""Optimizers and schedulers by KS name (library/optimizers.py): the class KS would build, its default arguments,
the schedule values step by step, KS's errors, and schedule-free train/eval switching."""
import math
import types

import pytest
import torch

from library import optimizers
from library.errors import UserError


def _param():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn(64, 64)
    return p


@pytest.mark.parametrize("name, module, cls", [
    ("AdamW", "torch.optim.adamw", "AdamW"),
    ("", "torch.optim.adamw", "AdamW"),
    ("SGDNesterov", "torch.optim.sgd", "SGD"),
    ("AdamW8bit", "bitsandbytes.optim.adamw", "AdamW8bit"),
    ("SGDNesterov8bit", "bitsandbytes.optim.sgd", "SGD8bit"),
    ("PagedAdamW", "bitsandbytes.optim.adamw", "PagedAdamW"),
    ("PagedAdamW8bit", "bitsandbytes.optim.adamw", "PagedAdamW8bit"),
    ("PagedAdamW32bit", "bitsandbytes.optim.adamw", "PagedAdamW32bit"),
    ("Lion8bit", "bitsandbytes.optim.lion", "Lion8bit"),
    ("PagedLion8bit", "bitsandbytes.optim.lion", "PagedLion8bit"),
    ("Prodigy", "prodigyopt.prodigy", "Prodigy"),
    ("DAdaptation", "dadaptation.experimental.dadapt_adam_preprint", "DAdaptAdamPreprint"),
    ("DAdaptAdam", "dadaptation.dadapt_adam", "DAdaptAdam"),
    ("DAdaptAdaGrad", "dadaptation.dadapt_adagrad", "DAdaptAdaGrad"),
    ("DAdaptAdan", "dadaptation.dadapt_adan", "DAdaptAdan"),
    ("DAdaptAdanIP", "dadaptation.experimental.dadapt_adan_ip", "DAdaptAdanIP"),
    ("DAdaptLion", "dadaptation.dadapt_lion", "DAdaptLion"),
    ("DAdaptSGD", "dadaptation.dadapt_sgd", "DAdaptSGD"),
    ("AdamWScheduleFree", "schedulefree.adamw_schedulefree", "AdamWScheduleFree"),
    ("RAdamScheduleFree", "schedulefree.radam_schedulefree", "RAdamScheduleFree"),
    ("SGDScheduleFree", "schedulefree.sgd_schedulefree", "SGDScheduleFree"),
    ("adafactor", "transformers.optimization", "Adafactor"),
    ("RAdam", "torch.optim.radam", "RAdam"),           # KS: a bare unknown name is a torch.optim class
])
def test_every_ks_optimizer_name_builds_its_class_and_steps(name, module, cls):
    choice = optimizers.validate_optimizer_options(optimizers.resolve_optimizer_type(name), None, 1.0)
    assert (choice.cls.__module__, choice.cls.__name__) == (module, cls)
    p = _param()
    before = p.detach().clone()
    opt = optimizers.make_optimizer_factory(choice, 1e-3)([{"params": [p]}])
    for _ in range(6):  # D-Adaptation estimates d first; RAdam rectification holds the first steps
        opt.step()
    assert not torch.equal(p.detach(), before), f"{name} did not move the parameter"


def test_ks_default_arguments_and_ss_optimizer_name():
    sgd = optimizers.resolve_optimizer("SGDNesterov")
    assert sgd.kwargs == {"momentum": 0.9, "nesterov": True}
    assert sgd.metadata_name() == "torch.optim.sgd.SGD(momentum=0.9)"
    ada = optimizers.resolve_optimizer("Adafactor", ["scale_parameter=False"])
    assert ada.adafactor_relative_step and ada.kwargs == {"relative_step": True, "scale_parameter": False}
    assert ada.metadata_name() == "transformers.optimization.Adafactor(scale_parameter=False,relative_step=True)"
    assert optimizers.resolve_optimizer("AdamW8bit", ["weight_decay=0.01"]).metadata_name() == \
        "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)"
    assert optimizers.resolve_optimizer("AdamW").metadata_name() == "torch.optim.adamw.AdamW"


def test_old_ks_optimizer_flags():
    assert optimizers.resolve_optimizer_type("", use_8bit_adam=True) == "AdamW8bit"
    assert optimizers.resolve_optimizer_type(None, use_lion_optimizer=True) == "Lion"
    with pytest.raises(UserError, match="use_8bit_adam and --optimizer_type"):
        optimizers.resolve_optimizer_type("AdamW", use_8bit_adam=True)
    with pytest.raises(UserError, match="exclude each other"):
        optimizers.resolve_optimizer_type("", True, True)


def _args(**kw):
    base = dict(lr_scheduler="constant", lr_warmup_steps=0, lr_decay_steps=0, lr_scheduler_num_cycles=1,
                lr_scheduler_power=1.0, lr_scheduler_timescale=None, lr_scheduler_min_lr_ratio=None,
                lr_scheduler_type="", lr_scheduler_args=None, learning_rate=1.0)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _lrs(options, steps=100, optimizer_type="AdamW"):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = options.build(opt, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_as_ratio_percent_and_steps():
    assert optimizers.int_or_float("0.1") == 0.1 and optimizers.int_or_float("10%") == 0.1
    assert optimizers.int_or_float("20") == 20 and isinstance(optimizers.int_or_float("20"), int)
    choice = optimizers.resolve_optimizer("AdamW")
    lrs = _lrs(optimizers.SchedulerOptions.from_args(_args(lr_scheduler="constant_with_warmup", lr_warmup_steps=0.1),
                                                     choice))
    assert lrs[:11] == pytest.approx([i / 10 for i in range(10)] + [1.0])   # ratio 0.1 of 100 steps = 10 steps
    with pytest.raises(Exception):
        optimizers.int_or_float("1.5")


def test_ks_schedulers_step_by_step():
    choice = optimizers.resolve_optimizer("AdamW")
    make = lambda **kw: optimizers.SchedulerOptions.from_args(_args(**kw), choice)  # noqa: E731
    # cosine_with_min_lr: half a cosine from 1 down to the floor 0.1 over 100 steps (KS passes num_cycles / 2)
    lrs = _lrs(make(lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.1))
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5 * 2 * s / 100 * 0.5 * 2)) for s in range(100)]
    assert lrs == pytest.approx(expected, abs=1e-6)
    # warmup_stable_decay: 10 warmup, 60 stable, 30 cosine decay to 0
    lrs = _lrs(make(lr_scheduler="warmup_stable_decay", lr_warmup_steps=10, lr_decay_steps=0.3))
    assert lrs[5] == pytest.approx(0.5) and lrs[10:70] == pytest.approx([1.0] * 60)
    assert lrs[70 + 15] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)), abs=1e-6)
    # inverse_sqrt: 1/sqrt((s + timescale - warmup) / timescale) after warmup (timescale defaults to the warmup)
    lrs = _lrs(make(lr_scheduler="inverse_sqrt", lr_warmup_steps=10))
    assert lrs[40] == pytest.approx(1 / math.sqrt((40 + 10 - 10) / 10))
    # piecewise_constant (diffusers): 1 until 10, 0.1 until 20, then 0.01
    lrs = _lrs(make(lr_scheduler="piecewise_constant", lr_scheduler_args=["step_rules='1:10,0.1:20,0.01'"]))
    assert (lrs[9], lrs[10], lrs[19], lrs[20], lrs[99]) == pytest.approx((1, 0.1, 0.1, 0.01, 0.01))
    # a torch scheduler by class name with its own args
    lrs = _lrs(make(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=50", "gamma=0.5"]))
    assert (lrs[49], lrs[50]) == pytest.approx((1.0, 0.5))


@pytest.mark.parametrize("kw, needle", [
    (dict(lr_scheduler="constant", lr_warmup_steps=10), "constant has no warmup"),
    (dict(lr_scheduler="cosine_with_min_lr"), "lr_scheduler_min_lr_ratio"),
    (dict(lr_scheduler="warmup_stable_decay"), "lr_decay_steps"),
    (dict(lr_scheduler="cosin"), "did you mean cosine"),
    (dict(lr_scheduler="piecewise_constant"), "step_rules"),
    (dict(lr_scheduler_type="NoSuchScheduler"), "cannot import"),
])
def test_scheduler_mistakes_are_named(kw, needle):
    with pytest.raises(UserError, match=needle):
        optimizers.SchedulerOptions.from_args(_args(**kw), optimizers.resolve_optimizer("AdamW"))


def test_adafactor_relative_step_replaces_the_scheduler(capsys):
    choice = optimizers.resolve_optimizer("Adafactor")
    options = optimizers.SchedulerOptions.from_args(_args(lr_scheduler="cosine"), choice)
    assert options.name == "adafactor" and "replaced by adafactor" in capsys.readouterr().out
    p = _param()
    grad, p.grad = p.grad, None  # as in training: the scheduler is built before the first backward
    opt = optimizers.make_optimizer_factory(choice, 1e-3)([{"params": [p], "lr": 1e-3}])
    sched = options.build(opt, 10)
    p.grad = grad
    opt.step()
    assert sched.get_lr()[0] > 0  # Adafactor's own relative-step lr


def test_schedule_free_evaluation_weights_round_trip():
    choice = optimizers.resolve_optimizer("AdamWScheduleFree")
    with pytest.raises(UserError, match="schedule-free"):
        optimizers.SchedulerOptions.from_args(_args(lr_scheduler="cosine"), choice)
    p = _param()
    opt = optimizers.make_optimizer_factory(choice, 1e-2)([{"params": [p]}])
    for _ in range(3):
        opt.step()
    train_point = p.detach().clone()
    with optimizers.evaluation_weights(opt):
        eval_point = p.detach().clone()
        assert not opt.param_groups[0]["train_mode"]
    assert opt.param_groups[0]["train_mode"]
    assert not torch.allclose(eval_point, train_point)          # sampling/saving sees the averaged point x
    assert torch.allclose(p.detach(), train_point, atol=1e-6)   # training continues from y
    plain = torch.optim.AdamW([p], lr=1e-3)
    with optimizers.evaluation_weights(plain):
        assert torch.equal(p.detach(), train_point) or torch.allclose(p.detach(), train_point, atol=1e-6)
