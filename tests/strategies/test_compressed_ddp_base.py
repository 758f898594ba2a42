"""HookedDDPStrategy plumbing: the Lightning private API it overrides, registration errors, names, argument checks."""

from __future__ import annotations

import inspect

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.nn.parallel import DistributedDataParallel

from lightning_convergence.compress import QSGD, Identity
from lightning_convergence.feedback import EF21, EControl
from lightning_convergence.strategies import _STRATEGY_MODULES
from lightning_convergence.strategies._ddp_base import HookedDDPStrategy
from lightning_convergence.strategies.compressed_ddp import CompressedDDPStrategy, compressed_comm_hook
from tests.helpers.dist import run_processes


def test_lightning_private_hook_registration_is_what_we_override():
    """Fails if Lightning renames `_register_ddp_hooks`, stops calling it from `configure_ddp`, or starts registering
    comm hooks on CPU itself (then our override in `_ddp_base.py` should be revisited)."""
    assert callable(getattr(DDPStrategy, "_register_ddp_hooks", None))
    assert "self._register_ddp_hooks()" in inspect.getsource(DDPStrategy.configure_ddp)
    assert 'self.root_device.type == "cuda"' in inspect.getsource(DDPStrategy._register_ddp_hooks)
    assert HookedDDPStrategy._register_ddp_hooks is not DDPStrategy._register_ddp_hooks


def _register(rank: int, world_size: int, which: str):
    model = DistributedDataParallel(torch.nn.Linear(3, 1))

    class Bad(HookedDDPStrategy):
        def build_comm_hook(self, m):
            if which == "annotation":
                def hook(state, bucket: int):  # DDP rejects a wrong annotation
                    return None
                return None, hook
            return None, compressed_comm_hook

    strategy = Bad(process_group_backend="gloo")
    strategy.model = model
    if which == "twice":
        strategy._register_ddp_hooks()  # the second registration is refused by DDP
    try:
        strategy._register_ddp_hooks()
    except RuntimeError as err:
        return str(err)
    return "no error"


@pytest.mark.parametrize("which", ["annotation", "twice"])
def test_failed_registration_raises(which):
    (msg,) = run_processes(_register, 1, which)
    assert "registering the DDP comm hook failed" in msg


def test_registration_needs_a_ddp_model():
    strategy = CompressedDDPStrategy()
    strategy.model = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        strategy._register_ddp_hooks()


def test_registered_names():
    assert "lightning_convergence.strategies.compressed_ddp" in _STRATEGY_MODULES
    for name, rule in (("ddp_ef21", "ef21"), ("ddp_ef21_sgdm", "ef21_sgdm"), ("ddp_econtrol", "econtrol"),
                       ("ddp_ef14", "ef14")):
        assert name in StrategyRegistry
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, CompressedDDPStrategy) and strategy.rule.name == rule
    assert StrategyRegistry.get("ddp_ef21").rule is not StrategyRegistry.get("ddp_ef21").rule  # fresh state each


def test_rule_instance_and_compressor_are_used():
    rule = EControl(eta=0.3)
    s = CompressedDDPStrategy(feedback=rule, compressor=Identity())
    assert s.rule is rule and isinstance(s.compressor, Identity)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"feedback": "ef22"}, ValueError, "feedback"),
        ({"feedback": 1}, TypeError, "feedback"),
        ({"compressor": "topk"}, TypeError, "compressor"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"start_step": -1}, ValueError, "start_step"),
        ({"start_step": 2.5}, TypeError, "start_step"),
        ({"ddp_comm_hook": lambda s, b: None}, ValueError, "ddp_comm_hook"),
        ({"ddp_comm_state": object()}, ValueError, "ddp_comm_state"),
    ],
)
def test_bad_strategy_arguments_fail_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=f"`{match}`"):
        CompressedDDPStrategy(**kwargs)


def test_non_contractive_compressor_warns_for_ef21():
    with pytest.warns(UserWarning, match="not a contraction"):
        CompressedDDPStrategy(feedback=EF21(), compressor=QSGD(levels=1))


def test_two_round_compressor_needs_a_rule_that_exposes_its_compressor_input():
    from lightning_convergence.compress import LowRank
    from lightning_convergence.feedback import FeedbackRule

    class Custom(FeedbackRule):  # a user rule written before compressor_input existed
        name = "custom"

        def _message(self, key, x, compressor, step):
            return compressor.compress(x, step, key)

        def update(self, key, mean):
            return mean

    with pytest.raises(ValueError, match="`feedback` must be .* needs 2 rounds per step, got .Custom."):
        CompressedDDPStrategy(feedback=Custom(), compressor=LowRank(rank=2))
    CompressedDDPStrategy(feedback=Custom(), compressor=LowRank(rank=2, rounds=1))  # one round: fine


def test_a_scheme_that_saves_nothing_at_this_world_size_fails_at_setup_naming_the_field():
    from lightning_convergence.compress import QSGD, CyclicTopK, LowRank, TopK
    from lightning_convergence.strategies.compressed_ddp import check_saving

    check_saving("S", TopK(0.01), 8)  # 7 x 8 bytes per kept entry: 14x fewer than DDP's 2·7/8·4 per entry
    check_saving("S", TopK(0.3), 2)  # 2.4 bytes per entry against DDP's 4
    with pytest.raises(ValueError, match="`compressor`.*all_gather.*world size 8"):
        check_saving("S", TopK(0.3), 8)  # 7 x 2.4 = 16.8 against 7
    with pytest.raises(ValueError, match="`compressor`"):
        check_saving("S", QSGD(levels=127), 8)  # int8 codes by all-gather: 7 bytes per entry, DDP's 7: no saving
    check_saving("S", CyclicTopK(0.3), 8)  # summed on the wire: never more than DDP
    check_saving("S", Identity(), 8)  # the uncompressed reference costs what DDP costs
    check_saving("S", LowRank(rank=4, factor_bits=8), 64)


def test_one_device_warns_that_nothing_is_sent(monkeypatch):
    import torch
    from lightning.fabric.plugins.environments import LightningEnvironment

    from lightning_convergence.compress import TopK
    from lightning_convergence.strategies.compressed_ddp import CompressedDDPStrategy

    strategy = CompressedDDPStrategy(compressor=TopK(0.1), parallel_devices=[torch.device("cpu")],
                                     cluster_environment=LightningEnvironment())

    class _Wrapped:
        module = torch.nn.Linear(3, 2)

    with pytest.warns(UserWarning, match="world size 1, so nothing is sent"):
        state, _ = strategy.build_comm_hook(_Wrapped())  # no process group: world size 1
    assert state.comm.world_size == 1


def test_bad_on_nonfinite_fails_at_construction():
    with pytest.raises(ValueError, match="`on_nonfinite` must be one of 'stop', 'skip', got 'ignore'"):
        CompressedDDPStrategy(on_nonfinite="ignore")
