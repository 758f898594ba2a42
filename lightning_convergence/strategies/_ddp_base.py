"""Shared DDP plumbing: a ``DDPStrategy`` base that installs its comm hook on every device type.

Lightning 2.6.6's ``DDPStrategy._register_ddp_hooks`` registers ``ddp_comm_hook`` only when the root device is CUDA
(``if self.root_device.type == "cuda"``), so on CPU a hook is dropped without a word (see ``shared/NOTES.md``).
:class:`HookedDDPStrategy` overrides that one private method, in one place, and registers through the public
``DistributedDataParallel.register_comm_hook``. ``tests/strategies/test_compressed_ddp_base.py`` fails if
Lightning renames the method or stops calling it from ``configure_ddp``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.constants import default_pg_timeout
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_convergence._checks import argument_error
from lightning_convergence._rank_state import PerRankStateMixin

__all__ = ["HookedDDPStrategy", "CommHook"]

CommHook = Callable[[Any, Any], torch.futures.Future]


class HookedDDPStrategy(PerRankStateMixin, DDPStrategy):
    """A ``DDPStrategy`` whose subclass supplies the comm hook; it is registered on CPU/gloo and CUDA/NCCL alike.

    Subclasses implement :meth:`build_comm_hook` (returning ``(state, hook)``) and the per-rank state methods of
    :class:`~lightning_convergence._rank_state.PerRankStateMixin`, and pass Lightning's arguments through
    ``**kwargs`` (LightningCLI resolves them from this signature). Pending per-rank state from a checkpoint is
    applied at the end of :meth:`setup`, once the model is wrapped.

    Args:
        bucket_cap_mb: DDP bucket size in MiB (``None``: DDP's default of 25).
        find_unused_parameters, process_group_backend, timeout, start_method, accelerator, parallel_devices,
            cluster_environment, checkpoint_io, precision_plugin: as in Lightning's ``DDPStrategy``.
        **kwargs: further ``DistributedDataParallel`` arguments (not ``ddp_comm_*``).

    Raises:
        ValueError: if ``ddp_comm_hook``, ``ddp_comm_state`` or ``ddp_comm_wrapper`` is passed (the subclass owns the
            hook; a second one would silently replace it).
        RuntimeError: if the model is not wrapped in DDP when hooks are registered, or registration fails.
    """

    def __init__(
        self,
        bucket_cap_mb: float | None = None,
        find_unused_parameters: bool = False,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        **kwargs: Any,
    ) -> None:
        for name in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"):
            if kwargs.get(name) is not None:
                raise argument_error(type(self).__name__, name, "None (this strategy installs its own communication "
                                     "hook)", kwargs[name])
            kwargs.pop(name, None)
        if bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = bucket_cap_mb
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
            find_unused_parameters=find_unused_parameters, **kwargs,
        )

    def build_comm_hook(self, model: DistributedDataParallel) -> tuple[Any, CommHook]:  # pragma: no cover
        """Return ``(state, hook)`` for ``model.register_comm_hook``."""
        raise NotImplementedError

    # Lightning 2.6.6 registers comm hooks on CUDA only (see the module docstring); this override is the single
    # place where we take over registration. It is private Lightning API: the base test pins its name and caller.
    @override
    def _register_ddp_hooks(self) -> None:
        if not isinstance(self.model, DistributedDataParallel):
            raise RuntimeError(
                f"{type(self).__name__}: expected the model to be wrapped in DistributedDataParallel when registering "
                f"the comm hook, got {type(self.model).__name__}."
            )
        state, hook = self.build_comm_hook(self.model)
        try:
            self.model.register_comm_hook(state, hook)
        except Exception as err:  # surfaced, never swallowed
            raise RuntimeError(f"{type(self).__name__}: registering the DDP comm hook failed: {err}") from err

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        self.apply_pending_rank_state()
