"""FedAsync: mix every arriving client model into the global model with a staleness-dependent weight α·s(τ)."""

from __future__ import annotations

from collections.abc import Mapping

from lightning_convergence._checks import check_choice, check_number
from lightning_convergence.federated.base import ParamDict, ServerRule, _check_staleness_args, staleness_weight

__all__ = ["FedAsync"]

_MIXING = ("model", "delta")


class FedAsync(ServerRule):
    """Asynchronous mixing: ``x_t = (1 − α_t)·x_{t−1} + α_t·x_new`` with ``α_t = α·s(t − τ)``, one version per update.

    Paper:
        Xie, Koyejo, Gupta. *Asynchronous Federated Optimization.* OPT workshop 2020, arXiv:1903.03934 (Algorithm 1;
        staleness functions of Sec. 5). PARTIALLY VERIFIED: FLSim's ``fed_async_aggregation`` agrees on the mixing.

    Deviations:
        ``mixing="model"`` (default, the paper) uses ``x_new = x_τ + Δ``, where ``x_τ`` is the model the client
        downloaded; the rule keeps only the versions some client still holds (recorded by :meth:`dispatch`).
        ``mixing="delta"`` uses ``x ← x + α_t·Δ`` (no history kept; differs when stale). The paper's proximal local
        objective (FedAsync+Prox, ρ) is ``prox_mu``.

    Args:
        alpha: α, the mixing weight in (0, 1]. Default ``0.6`` (paper tries {0.6, 0.8, 0.9}; UNVERIFIED). Lower it
            when many clients are stale or data is strongly non-IID.
        staleness: s(·): ``"constant"``, ``"polynomial"`` ((τ+1)^(−a)) or ``"hinge"``. Default ``"polynomial"``.
        staleness_a: a, ≥ 0. Default ``0.5`` (paper's polynomial a; hinge uses a = 10 in the paper).
        staleness_b: b, hinge threshold in versions, ≥ 0. Default ``4``.
        prox_mu: ρ, proximal coefficient of the clients' local objective, ≥ 0. Default ``0.0``.
        mixing: ``"model"`` or ``"delta"``. Default ``"model"``.
        max_staleness: reject updates staler than this; ``None`` keeps all. Default ``None``.

    State:
        Base state plus the model versions still held by clients (``mixing="model"``).

    Logs:
        Through the runner: ``convergence/fl/staleness_steps``, ``convergence/fl/updates_applied_total``.

    Raises:
        ValueError: for ``alpha`` outside (0, 1], a negative ``prox_mu``, unknown ``staleness`` or ``mixing``.
        RuntimeError: with ``mixing="model"``, if a client's base model was never dispatched by this rule.

    Example:
        >>> import torch
        >>> rule = FedAsync(alpha=0.5, staleness="constant")
        >>> rule.init_params({"w": torch.zeros(1)})
        >>> _ = rule.dispatch(0); _ = rule.receive(0, {"w": torch.ones(1)}, base_version=0)
        >>> rule.params["w"].item()
        0.5
    """

    name = "fedasync"

    def __init__(
        self, alpha: float = 0.6, staleness: str = "polynomial", staleness_a: float = 0.5, staleness_b: int = 4,
        prox_mu: float = 0.0, mixing: str = "model", max_staleness: int | None = None,
    ) -> None:
        super().__init__(server_lr=1.0, max_staleness=max_staleness)
        check_number("FedAsync", "alpha", alpha, 0, 1, low_open=True)
        _check_staleness_args("FedAsync", staleness, staleness_a, staleness_b)
        check_number("FedAsync", "prox_mu", prox_mu, 0)
        check_choice("FedAsync", "mixing", mixing, _MIXING)
        self.alpha = float(alpha)
        self.staleness = staleness
        self.staleness_a = float(staleness_a)
        self.staleness_b = staleness_b
        self.prox_mu = float(prox_mu)
        self.mixing = mixing
        self.history: dict[int, ParamDict] = {}

    def _on_dispatch(self, client_id: int) -> None:
        if self.mixing != "model":
            return
        if self.version not in self.history:
            self.history[self.version] = self.global_params()
        held = set(self.outstanding.values())
        for v in [v for v in self.history if v not in held]:
            del self.history[v]

    def _accept(self, client_id: int, delta: ParamDict, staleness: int, now: float) -> None:
        a_t = self.alpha * staleness_weight(staleness, self.staleness, self.staleness_a, self.staleness_b)
        if self.mixing == "delta":
            self._add_to_params(delta, a_t)
        else:
            base = self.history.get(self.version - staleness)
            if base is None:
                raise RuntimeError(
                    f"FedAsync: no stored model for `base_version` {self.version - staleness}; with mixing='model' "
                    "clients must download through `dispatch`."
                )
            for k, p in self.params.items():  # x ← (1 − α_t)·x + α_t·(x_τ + Δ)
                p.mul_(1 - a_t).add_(base[k] + delta[k], alpha=a_t)
        self._bump(1)

    def _extra_state(self) -> dict:
        return {"history": {v: {k: t.clone() for k, t in p.items()} for v, p in self.history.items()}}

    def _load_extra_state(self, state: Mapping) -> None:
        self.history = {int(v): dict(p) for v, p in state["history"].items()}
