"""Timestep-clustered optimizer (spec §6): routing, K states, resume, bitsandbytes, accelerate, LR schedules."""
import copy
import io

import pytest
import torch

from library.cluster_optim import ClusteredLRScheduler, ClusteredOptimizer
from library.errors import UserError

bnb = pytest.importorskip("bitsandbytes")

CLUSTER_SEQUENCE = [0, 2, 1, 2, 0, 1, 1, 2]


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    # 64×64 = 4096 elements: the smallest tensor bitsandbytes keeps in 8-bit state (min_8bit_size)
    return [torch.nn.Parameter(torch.randn(64, 64, generator=generator)),
            torch.nn.Parameter(torch.randn(8, generator=generator))]


def set_grads(params, step: int) -> None:
    """Deterministic gradients that differ per step (stands in for backward)."""
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.01),
    "adamw8bit": lambda groups: bnb.optim.AdamW8bit(groups, lr=1e-2),
    "lion": lambda groups: bnb.optim.Lion(groups, lr=1e-3),
}


def state_snapshot(optimizer: torch.optim.Optimizer) -> list:
    return copy.deepcopy([optimizer.state[p] for group in optimizer.param_groups for p in group["params"]])


def states_equal(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for sa, sb in zip(a, b):
        if sa.keys() != sb.keys():
            return False
        for key in sa:
            va, vb = sa[key], sb[key]
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
            if not same:
                return False
    return True


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_only_the_active_cluster_state_changes(name):
    params = make_params()
    clustered = ClusteredOptimizer(OPTIMIZERS[name], [{"params": params}], num_clusters=3)
    for step, k in enumerate(CLUSTER_SEQUENCE[:5]):
        clustered.set_cluster(k)
        set_grads(params, step)
        before = [state_snapshot(o) for o in clustered.optimizers]
        weights_before = [p.detach().clone() for p in params]
        clustered.step()
        after = [state_snapshot(o) for o in clustered.optimizers]
        for j in range(3):
            assert states_equal(before[j], after[j]) == (j != k), (step, j)
        assert not torch.equal(weights_before[0], params[0])  # the shared parameters moved
    if name == "adamw8bit":
        assert clustered.optimizers[0].state[params[0]]["state1"].dtype == torch.uint8  # really the 8-bit path


def run(name: str, steps: list[int], resume_at: int | None = None) -> list[torch.Tensor]:
    """Train CLUSTER_SEQUENCE with a global LambdaLR; optionally save everything at resume_at and continue
    in fresh objects loaded from the bytes (what --save_state / --resume do)."""

    def build(params):
        clustered = ClusteredOptimizer(OPTIMIZERS[name], [{"params": params}], num_clusters=3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(clustered, lambda s: 1.0 / (1 + s))
        return clustered, scheduler

    params = make_params()
    clustered, scheduler = build(params)
    for step, k in enumerate(steps):
        if step == resume_at:
            buffer = io.BytesIO()
            torch.save({"params": [p.detach() for p in params], "opt": clustered.state_dict(),
                        "sched": scheduler.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
            clustered, scheduler = build(params)
            clustered.load_state_dict(saved["opt"])
            scheduler.load_state_dict(saved["sched"])
        clustered.set_cluster(k)
        set_grads(params, step)
        clustered.step()
        scheduler.step()
        clustered.zero_grad()
    return [p.detach() for p in params]


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_resume_equals_the_uninterrupted_run_bit_for_bit(name):
    uninterrupted = run(name, CLUSTER_SEQUENCE)
    resumed = run(name, CLUSTER_SEQUENCE, resume_at=4)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))
    # and the clusters matter: one shared state gives other weights
    single = run(name, [0] * len(CLUSTER_SEQUENCE))
    assert not torch.equal(single[0], uninterrupted[0])


def test_state_dict_holds_k_states_and_checks_k():
    params = make_params()
    clustered = ClusteredOptimizer(OPTIMIZERS["adamw"], params, num_clusters=3)  # a bare parameter list works
    clustered.set_cluster(1)
    set_grads(params, 0)
    clustered.step()
    state = clustered.state_dict()
    assert state["active"] == 1 and len(state["clusters"]) == 3
    assert [len(c["state"]) for c in state["clusters"]] == [0, 2, 0]
    other = ClusteredOptimizer(OPTIMIZERS["adamw"], make_params(), num_clusters=2)
    with pytest.raises(UserError, match="--timestep_clusters 3"):
        other.load_state_dict(state)
    with pytest.raises(UserError, match="not clustered"):
        other.load_state_dict(torch.optim.AdamW(make_params()).state_dict())
    with pytest.raises(UserError, match="--timestep_clusters"):
        ClusteredOptimizer(OPTIMIZERS["adamw"], params, num_clusters=0)

    class ScheduleFreeLike(torch.optim.SGD):  # schedule-free optimizers expose train() / eval()
        def train(self):
            pass

    with pytest.raises(UserError, match="schedule-free"):
        ClusteredOptimizer(lambda groups: ScheduleFreeLike(groups, lr=0.1), params, num_clusters=2)


def test_deepcopy_is_independent_even_with_a_scheduler_attached():
    params = make_params()
    clustered = ClusteredOptimizer(OPTIMIZERS["adamw"], [{"params": params}], num_clusters=2)
    torch.optim.lr_scheduler.LambdaLR(clustered, lambda s: 1.0)  # wraps clustered.step
    copied = copy.deepcopy(clustered)
    copied_params = copied.optimizers[0].param_groups[0]["params"]
    original = [p.detach().clone() for p in params]
    set_grads(copied_params, 0)
    copied.set_cluster(1)
    copied.step()
    assert all(torch.equal(a, b) for a, b in zip(original, params))
    assert not torch.equal(copied_params[0], original[0])
    assert copied.optimizers[1].param_groups[0]["params"][0] is copied_params[0]  # instances still share params
    assert len(clustered.optimizers[1].state) == 0 and len(copied.optimizers[1].state) == 2


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_memory_bytes_is_k_times_one_state(name):
    params = make_params()
    single = OPTIMIZERS[name]([{"params": params}])
    set_grads(params, 0)
    single.step()
    one_state = sum(t.numel() * t.element_size() for s in single.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
    clustered = ClusteredOptimizer(OPTIMIZERS[name], [{"params": params}], num_clusters=4)
    assert clustered.memory_bytes() == 0  # torch and bnb allocate state lazily, at the first step
    for k in range(4):
        clustered.set_cluster(k)
        clustered.step()
        assert clustered.memory_bytes() == (k + 1) * one_state
    if name == "adamw":
        assert one_state == 2 * 4 * (4096 + 8) + 2 * 4  # exp_avg, exp_avg_sq fp32, step fp32 scalars


def lr_used_per_step(clusters: list[int], per_cluster: bool) -> list[float]:
    """SGD with lr 1 and gradient 1 on a float64 scalar: each step moves the parameter by exactly −lr."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    clustered = ClusteredOptimizer(lambda groups: torch.optim.SGD(groups, lr=1.0), [param], num_clusters=3)
    decay = lambda s: 1.0 - 0.1 * s  # noqa: E731
    if per_cluster:
        scheduler = ClusteredLRScheduler(lambda o: torch.optim.lr_scheduler.LambdaLR(o, decay), clustered)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(clustered, decay)
    used = []
    for k in clusters:
        clustered.set_cluster(k)
        before = param.item()
        param.grad = torch.ones(1, dtype=torch.float64)
        clustered.step()
        scheduler.step()
        used.append(before - param.item())
    return used


def test_global_schedule_follows_global_steps_whatever_the_cluster():
    clusters = [0, 1, 1, 0, 2, 1]
    assert lr_used_per_step(clusters, per_cluster=False) == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], abs=1e-12)


def test_per_cluster_schedule_follows_each_cluster_own_steps():
    clusters = [0, 1, 1, 0, 2, 1]
    # cluster step counts before each step: 0:0, 1:0, 1:1, 0:1, 2:0, 1:2
    assert lr_used_per_step(clusters, per_cluster=True) == pytest.approx([1.0, 1.0, 0.9, 0.9, 1.0, 0.8], abs=1e-12)


def test_per_cluster_scheduler_state_round_trip():
    params = make_params()
    clustered = ClusteredOptimizer(OPTIMIZERS["adamw"], params, num_clusters=3)
    scheduler = ClusteredLRScheduler(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s), clustered)
    for k in [0, 1, 1, 2, 1]:
        clustered.set_cluster(k)
        clustered.step()
        scheduler.step()
    state = copy.deepcopy(scheduler.state_dict())
    fresh_opt = ClusteredOptimizer(OPTIMIZERS["adamw"], make_params(), num_clusters=3)
    fresh = ClusteredLRScheduler(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s), fresh_opt)
    fresh.load_state_dict(state)
    assert [s.last_epoch for s in fresh.schedulers] == [1, 3, 1] and fresh.last_epoch == 5
    fresh_opt.set_cluster(1)
    fresh.step()
    assert fresh.get_last_lr() == pytest.approx([1e-2 * 0.5 ** 4])


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    # Accelerator state is a process-wide singleton: leave none behind for other tests.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_prepare_step_and_save_state(accelerator, tmp_path):
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    params = make_params()
    clustered = ClusteredOptimizer(OPTIMIZERS["adamw8bit"], [{"params": params}], num_clusters=3)
    scheduler = ClusteredLRScheduler(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s), clustered)
    prepared, prepared_scheduler = accelerator.prepare(clustered, scheduler)
    assert isinstance(prepared, AcceleratedOptimizer) and prepared.optimizer is clustered
    assert isinstance(prepared_scheduler, AcceleratedScheduler) and prepared_scheduler.optimizers[0] is prepared
    for step, k in enumerate([2, 0, 2]):
        clustered.set_cluster(k)
        set_grads(params, step)
        before = [state_snapshot(o) for o in clustered.optimizers]
        prepared.step()
        prepared_scheduler.step()
        prepared.zero_grad()
        after = [state_snapshot(o) for o in clustered.optimizers]
        assert [states_equal(b, a) for b, a in zip(before, after)] == [j != k for j in range(3)]
        assert params[0].grad is None
    assert prepared.param_groups is clustered.optimizers[2].param_groups
    assert [s.last_epoch for s in scheduler.schedulers] == [1, 0, 2]

    # accelerate's own checkpointing: save_state, then load_state into fresh objects (weights_only torch.load)
    accelerator.save_state(str(tmp_path / "state"))
    saved_states = [state_snapshot(o) for o in clustered.optimizers]
    clustered.set_cluster(1)
    set_grads(params, 9)
    prepared.step()
    prepared_scheduler.step()
    accelerator.load_state(str(tmp_path / "state"))
    assert clustered.active == 2
    assert all(states_equal(s, state_snapshot(o)) for s, o in zip(saved_states, clustered.optimizers))
    assert [s.last_epoch for s in scheduler.schedulers] == [1, 0, 2]
