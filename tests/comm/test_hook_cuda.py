"""CUDA only (skipped without a GPU): the comm hook runs on CUDA tensors without a host synchronisation, and the 8-bit
transport's codecs round-trip on the device. Not run where this was written (no GPU there)."""

from __future__ import annotations

import pytest
import torch

from lightning_convergence.comm import SingleProcessCommunicator
from lightning_convergence.comm.quantized import BLOCK, INT8, decode_chunk, encode_chunk
from lightning_convergence.compress import CyclicTopK, TopK
from lightning_convergence.feedback import make_rule
from lightning_convergence.strategies.compressed_ddp import CompressionHookState, compressed_comm_hook

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Bucket:
    def __init__(self, params, buffer):
        self._params, self._buffer, self._grads, offset = params, buffer, [], 0
        for p in params:
            self._grads.append(buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def buffer(self):
        return self._buffer

    def gradients(self):
        return self._grads

    def parameters(self):
        return self._params


@pytest.mark.parametrize(("rule", "compressor"), [("ef14", CyclicTopK(0.05)), ("ef21", TopK(0.05))])
def test_hook_makes_no_host_sync_on_cuda(rule, compressor):
    dev = torch.device("cuda")
    params = [torch.nn.Parameter(torch.zeros(64, 32, device=dev)) for _ in range(3)]
    names = {id(p): f"p{i}" for i, p in enumerate(params)}
    state = CompressionHookState(make_rule(rule, "test"), compressor, names, SingleProcessCommunicator())
    gen = torch.Generator(device=dev).manual_seed(0)
    for step in range(4):
        buf = torch.randn(3 * 64 * 32, device=dev, generator=gen)
        if step >= 1:  # EF21's first step is dense; from then on no host sync is allowed
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = compressed_comm_hook(state, _Bucket(params, buf)).wait()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.device.type == "cuda"
        assert not state.take_nonfinite()  # the one read per optimizer step, outside the hook


def test_int8_codec_round_trips_on_cuda():
    x = torch.randn(4 * BLOCK, device="cuda")
    y = decode_chunk(INT8, encode_chunk(INT8, x), x.numel())
    assert y.device.type == "cuda"
    # half a quantisation step per block: max|block| / 254
    assert (y - x).abs().max() <= x.abs().max() / 254 + 1e-6
