import os

import pytest
import torch

from tests.helpers.dist import restore_env, snapshot_env

# Tests never talk to W&B; the CLI tests that need an offline run set the mode themselves.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# One intra-op thread in the pytest process: its OpenMP pool, once started, is not fork-safe, and the forked ranks
# of later tests (tests/helpers/dist.run_processes) could deadlock in their first parallel op. Forked ranks and
# subprocess-launched ranks set their own thread counts.
torch.set_num_threads(1)
# Lightning's DDP-type strategies raise the thread count to cores / processes unless OMP_NUM_THREADS is set
# (`_set_num_threads_if_needed`): a one-process run would start the pool again and a later fork would deadlock.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolate_distributed_state():
    """Restore the env vars DDP sets and destroy any process group a test leaves behind."""
    saved = snapshot_env()
    yield
    restore_env(saved)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
