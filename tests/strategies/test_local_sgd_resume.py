"""Resume mid-round continues identically (2N straight == N + checkpoint + resume N, world size 2), per outer step;
validation and checkpoints see the mean of the replicas; argument errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_convergence.averaging import CO2, DiLoCo, FixedPeriod, NoLoCo
from lightning_convergence.compress import TopK
from lightning_convergence.strategies.local_sgd import LocalSGDStrategy
from tests.strategies._local_sgd_utils import fit

N = 4  # one epoch per rank: 64 samples / 2 ranks / batch 8; H=3 puts the checkpoint mid-round (rounds end at 3, 6)

OUTERS = {
    "average": lambda: "average",
    "diloco": lambda: DiLoCo(lr=0.7, momentum=0.9),
    "noloco": lambda: NoLoCo(lr=0.7, momentum=0.5),
    "diloco_topk_ef": lambda: DiLoCo(lr=0.7, momentum=0.9, compressor=TopK(k_fraction=0.25), error_feedback=True),
    "co2": lambda: CO2(lr=1.0, momentum=0.2, gap_penalty=2.0, clip=True, clip_threshold=0.01),
}


@pytest.mark.parametrize("name", list(OUTERS))
def test_local_sgd_resume_mid_round_matches_straight_run(tmp_path, name):
    kwargs = dict(schedule=3, final_merge=False, optimizer_state="keep", module_kwargs={"opt": "adam", "lr": 0.01,
                  "batchnorm": True})
    straight = fit(LocalSGDStrategy, tmp_path / "straight", 2 * N, outer=OUTERS[name](), **kwargs)
    # saved at the last batch of epoch 0 (an epoch-end save would make Lightning replay epoch 0 on resume)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="first", every_n_train_steps=N, save_top_k=-1)
    fit(LocalSGDStrategy, tmp_path / "first", N, outer=OUTERS[name](), callbacks=[ckpt], **kwargs)
    path = str(tmp_path / "ckpt" / "first.ckpt")
    resumed = fit(LocalSGDStrategy, tmp_path / "resumed", 2 * N, outer=OUTERS[name](), ckpt_path=path, **kwargs)
    for r in range(2):  # each rank's own replica, its Adam state and the outer state match exactly (CPU, seeded)
        for k, v in straight[r]["params"].items():
            assert torch.equal(v, resumed[r]["params"][k]), (r, k)
        s, t = straight[r]["strategy_state"], resumed[r]["strategy_state"]
        assert s["step"] == t["step"] == 2 * N and s["sync_rounds_total"] == t["sync_rounds_total"] == 2
        for key, value in s["outer"].items():
            if torch.is_tensor(value):
                assert torch.equal(value, t["outer"][key]), (r, key)
        for pid, st in straight[r]["optimizer"]["state"].items():
            assert torch.equal(st["exp_avg"], resumed[r]["optimizer"]["state"][pid]["exp_avg"])
    # the replicas really differ (otherwise per-rank state would not be exercised)
    assert any(not torch.equal(v, straight[1]["params"][k]) for k, v in straight[0]["params"].items())


def test_local_sgd_checkpoint_state_dict_is_replica_mean(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="c", every_n_train_steps=N)
    out = fit(LocalSGDStrategy, tmp_path / "run", N, outer="average", schedule=3, final_merge=False, callbacks=[ckpt])
    saved = torch.load(tmp_path / "ckpt" / "c.ckpt", weights_only=False)
    for k, v in saved["state_dict"].items():
        if v.is_floating_point():
            mean = (out[0]["params"][k] + out[1]["params"][k]) / 2
            torch.testing.assert_close(v, mean, atol=1e-7, rtol=0)  # gloo sums then divides: rounding only
    assert saved["convergence/local_sgd"]["world_size"] == 2


def test_local_sgd_validation_uses_mean_and_restores_replicas(tmp_path):
    with_val = fit(LocalSGDStrategy, tmp_path / "v", 5, outer="average", schedule=3, final_merge=False, val=True)
    no_val = fit(LocalSGDStrategy, tmp_path / "n", 5, outer="average", schedule=3, final_merge=False)
    for r in range(2):  # swapping the mean in for validation never leaks into training
        for k, v in no_val[r]["params"].items():
            assert torch.equal(v, with_val[r]["params"][k]), (r, k)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"outer": "nope"}, ValueError, "`outer`"),
        ({"outer": 3}, TypeError, "`outer`"),
        ({"schedule": 2.5}, TypeError, "`schedule`"),
        ({"optimizer_state": "sum"}, ValueError, "`optimizer_state`"),
        ({"model_averaging_period": 4}, ValueError, "`model_averaging_period`"),
        ({"schedule": FixedPeriod(period=2), "ddp_comm_hook": print}, ValueError, "`ddp_comm_hook`"),
    ],
)
def test_local_sgd_strategy_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LocalSGDStrategy(**kwargs)


def test_local_sgd_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_convergence  # noqa: F401  (registers the names)

    for name in ("local_sgd", "diloco", "noloco", "co2"):
        assert name in StrategyRegistry
    assert StrategyRegistry["diloco"]["init_params"]["outer"] == "diloco"
