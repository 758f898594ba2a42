import os

import pytest
import torch

from tests.helpers.dist import restore_env, snapshot_env

# Tests never talk to W&B; the CLI tests that need an offline run set the mode themselves.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _isolate_distributed_state():
    """Restore the env vars DDP sets and destroy any process group a test leaves behind."""
    saved = snapshot_env()
    yield
    restore_env(saved)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
