"""The ``lightning-convergence`` command: LightningCLI with W&B that never fails for lack of an API key."""

from __future__ import annotations

import netrc
import os
import re
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from torch.optim.lr_scheduler import OneCycleLR

import lightning_convergence  # noqa: F401  (registers strategy names before the config is parsed)
from lightning_convergence.optim.schedules import resolve_total_steps

__all__ = ["ConvergenceCLI", "main", "ensure_wandb_mode"]


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


_OFFLINE_NOTICE = (
    "lightning-convergence: no W&B API key found, logging to W&B offline "
    "(set WANDB_MODE=online after `wandb login`, or sync later with `wandb sync <run dir>`)."
)
_auto_offline = False  # WANDB_MODE was set to offline by ensure_wandb_mode (the notice is still due)


def ensure_wandb_mode(announce: bool = True) -> str:
    """Set ``WANDB_MODE=offline`` when it is unset and no API key is configured; say so once (``announce``).

    The variable is inherited by DDP worker processes, so only the launching process prints the notice. The CLI
    passes ``announce=False`` and says it only when the config really has a ``WandbLogger``. Returns the mode in force.
    """
    global _auto_offline
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if _has_wandb_key():
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    _auto_offline = not announce
    if announce:
        print(_OFFLINE_NOTICE, file=sys.stderr)
    return "offline"


class ConvergenceCLI(LightningCLI):
    """LightningCLI that reports the final validation/test metrics and where each W&B run was written."""

    @staticmethod
    def configure_optimizers(lightning_module, optimizer, lr_scheduler=None):  # type: ignore[no-untyped-def]
        """LightningCLI's, except that schedules declaring ``interval = "step"`` (``lightning_convergence.optim``) and
        torch's ``OneCycleLR`` step after every optimizer step instead of every epoch, and budget schedules with
        ``total_steps=None`` take the trainer's ``estimated_stepping_batches`` (a differing explicit value warns)."""
        trainer = getattr(lightning_module, "_trainer", None)
        if lr_scheduler is not None and trainer is not None:
            resolve_total_steps(lr_scheduler, float(trainer.estimated_stepping_batches))
        if lr_scheduler is not None and (
            getattr(lr_scheduler, "interval", None) == "step" or isinstance(lr_scheduler, OneCycleLR)
        ):
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)

    def before_fit(self) -> None:
        global _auto_offline
        if _auto_offline and self.trainer.is_global_zero and any(
            isinstance(lg, WandbLogger) for lg in self.trainer.loggers
        ):
            print(_OFFLINE_NOTICE, file=sys.stderr)
        _auto_offline = False

    def after_fit(self) -> None:
        self._report("fit")

    def after_validate(self) -> None:
        self._report("validate")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, stage: str) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items()
            if k.startswith(("val_", "test_")) and getattr(v, "numel", lambda: 1)() == 1
        }
        for key in sorted(metrics):
            print(f"{_label(key)}: {metrics[key]:.4f}")
        mode = os.environ.get("WANDB_MODE", "online")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and mode != "disabled":
                run_dir = getattr(logger.experiment, "dir", None)
                if run_dir:
                    print(f"W&B run ({mode}) written to: {Path(run_dir).parent}")


def _label(key: str) -> str:
    """``val_acc`` -> ``validation accuracy``."""
    words = {"val": "validation", "acc": "accuracy"}
    return " ".join(words.get(w, w) for w in key.split("_"))


# A project error message: "Class: `field` must be ..., got ...".
_PROJECT_ERROR = re.compile(r"([A-Z][A-Za-z0-9_]*: `[A-Za-z0-9_]+` must [^\n]*)")


def project_error(err: BaseException) -> str | None:
    """The first project-style message ("Class: `field` must ...") anywhere in ``err``'s text or its causes.

    jsonargparse reports a failing nested ``class_path`` (a compressor inside a strategy) as a failed match of every
    alternative of a union type, with the real message many lines down; this finds it.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        found = _PROJECT_ERROR.search(str(err))
        if found:
            return found.group(1).rstrip()
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-convergence`` and ``python -m lightning_convergence``."""
    ensure_wandb_mode(announce=False)
    try:
        ConvergenceCLI(save_config_kwargs={"overwrite": True}, args=args)
    except (ValueError, TypeError) as err:
        message = project_error(err)
        if message is None or message == str(err).strip():
            raise
        raise type(err)(message) from err
