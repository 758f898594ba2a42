"""Own the training DataLoader's sampling from a callback, on any LightningModule, with or without DDP.

Lightning has no public API to change how training batches are drawn once ``fit`` has started (Lightning issues
#19286, #21448). Callbacks that need it (adaptive batch size, variance sampling) call :func:`wrap_train_dataloader`
from their ``setup`` hook: whenever Lightning requests the train dataloader (at the start of fit, and again under
``reload_dataloaders_every_n_epochs``) it receives ``transform(original)`` instead. :func:`rebuild_dataloader` makes
that transform a one-liner that keeps everything of the user's loader but its sampling.

Under DDP, what happens next is Lightning's usual processing of the returned loader:

* a sampler that is a ``DistributedSampler`` (subclass) is left alone: it shards itself;
* a custom ``BatchSampler`` subclass built inside the request is re-instantiated by Lightning with
  ``sampler=DistributedSampler(...)`` (its init args are captured), so a batch sampler should take ``sampler`` as an
  argument and keep its mutable state in a shared object passed at init, not in the instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Sampler

__all__ = ["rebuild_dataloader", "wrap_train_dataloader"]

# DataLoader arguments copied verbatim when rebuilding (sampling arguments are handled separately).
_COPIED = (
    "num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
    "generator", "persistent_workers", "pin_memory_device",
)


def rebuild_dataloader(
    loader: DataLoader,
    *,
    sampler: Sampler | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    """A new ``DataLoader`` over the same dataset, with the same workers/collate/pinning, and new sampling.

    Args:
        loader: the user's loader.
        sampler: a new index sampler (batches are then formed with ``batch_size`` and the loader's ``drop_last``).
        batch_sampler: a new batch sampler (mutually exclusive with ``sampler`` and ``batch_size``).
        batch_size: batch size with ``sampler``; default: the loader's.

    Raises:
        ValueError: if both or neither of ``sampler`` and ``batch_sampler`` are given, or ``batch_size`` is given
            with ``batch_sampler``.
        TypeError: if ``loader`` is not a ``DataLoader`` (an iterable-style loader cannot be re-sampled).
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"rebuild_dataloader: `loader` must be a torch DataLoader, got {type(loader).__name__}.")
    if (sampler is None) == (batch_sampler is None):
        raise ValueError("rebuild_dataloader: give exactly one of `sampler` and `batch_sampler`.")
    if batch_sampler is not None and batch_size is not None:
        raise ValueError("rebuild_dataloader: `batch_size` cannot be combined with `batch_sampler`.")
    kwargs: dict[str, Any] = {k: getattr(loader, k) for k in _COPIED if hasattr(loader, k)}
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    else:
        kwargs.pop("persistent_workers", None)
    if batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=batch_sampler, **kwargs)
    size = batch_size if batch_size is not None else loader.batch_size
    return DataLoader(loader.dataset, sampler=sampler, batch_size=size, drop_last=loader.drop_last, **kwargs)


def wrap_train_dataloader(trainer: Any, transform: Callable[[DataLoader], DataLoader]) -> Callable[[], None]:
    """Make every train-dataloader request of ``trainer`` return ``transform(original)``.

    Call it from a callback's ``setup`` (Lightning requests the loader after ``setup``). Works whether the loader
    comes from the datamodule, the LightningModule, or was passed to ``fit``. Returns a function that undoes the
    wrapping (call it from ``teardown``).

    Raises:
        RuntimeError: if the trainer has no train dataloader source yet (called outside ``fit``).
    """
    source = _train_source(trainer)
    instance = source.instance
    if instance is None:
        raise RuntimeError("wrap_train_dataloader: the trainer has no train dataloader source; call it during fit.")
    name = source.name
    if hasattr(instance, name) and callable(getattr(instance, name)) and not isinstance(instance, DataLoader):
        original = getattr(instance, name)
        had_instance_attr = name in vars(instance)

        def wrapped() -> Any:
            return _apply(transform, original())

        setattr(instance, name, wrapped)

        def undo() -> None:
            if had_instance_attr:
                setattr(instance, name, original)
            else:
                delattr(instance, name)

        return undo
    # A loader (or collection of loaders) passed straight to `fit(train_dataloaders=...)`.
    source.instance = _apply(transform, instance)

    def undo_direct() -> None:
        source.instance = instance

    return undo_direct


def _apply(transform: Callable[[DataLoader], DataLoader], loaders: Any) -> Any:
    if isinstance(loaders, DataLoader):
        return transform(loaders)
    raise TypeError(
        "wrap_train_dataloader: the train dataloader must be a single torch DataLoader to be re-sampled, got "
        f"{type(loaders).__name__}."
    )


def _train_source(trainer: Any) -> Any:
    # Private Lightning API, confined here and covered by tests/data/test_loader.py: the fit loop's dataloader source
    # (`_DataLoaderSource` with `.instance` and `.name`). It is the only handle that covers all three ways of passing
    # training data to `fit`.
    return trainer.fit_loop._data_source
