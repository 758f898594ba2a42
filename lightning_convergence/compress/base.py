"""The compressor interface: a tensor becomes a :class:`Payload` (what goes on the wire) and back.

A compressor knows nothing about error feedback, and every feedback rule accepts any compressor. Class attributes
tell a rule whether a compressor fits its theory:

* ``unbiased``: ``E[C(x)] = x`` over the compressor's randomness.
* ``alpha``: a contraction factor valid for every tensor size, ``||C(x) − x||² ≤ (1 − alpha)·||x||²`` (in
  expectation for random compressors). ``0.0`` means "not a contraction" (or only a size-dependent one: see
  :meth:`Compressor.contraction`).
* ``summable``: payloads of different ranks can be summed entry-wise on the wire and the sum decompresses to the sum
  of the decompressed tensors (the compressor is linear and its randomness is shared), so an all-reduce can carry
  them. Otherwise the payloads are all-gathered and each rank decompresses every rank's payload.
* ``wire_bits``: ``8`` sends summable float payloads through the 8-bit reduce-scatter + all-gather
  (:mod:`lightning_convergence.comm.quantized`) instead of a float all-reduce. :attr:`Compressor.transport` names the
  collective that results; :mod:`lightning_convergence.comm.links` gives its link bytes per rank at world size W.

Randomness comes from a fresh ``torch.Generator`` seeded by ``(seed, step, key)`` (:func:`generator_for`): every
rank draws alike for the same parameter and step, a resumed run replays the same draws, and the training's own
global RNG is never touched (the idea of torch's PowerSGD hook).

Imports torch only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Compressor", "Payload", "generator_for", "pack_bits", "unpack_bits"]


@dataclass
class Payload:
    """A compressed tensor.

    Attributes:
        tensors: the tensors that go on the wire, by name (their bytes are the message).
        shape: shape of the tensor that was compressed.
        dtype: dtype of the tensor that was compressed.
        compressor: the compressor that decodes it (local, not sent).
        meta: local-only data every rank can rebuild without communication (e.g. Rand-K's shared indices).
    """

    tensors: dict[str, Tensor]
    shape: torch.Size
    dtype: torch.dtype
    compressor: Compressor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: the sum of the wire tensors' sizes (counted, not estimated)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def replace(self, tensors: dict[str, Tensor]) -> Payload:
        """The same payload structure with other wire tensors (another rank's, or a reduced sum)."""
        return Payload(tensors, self.shape, self.dtype, self.compressor, self.meta)

    def decompress(self) -> Tensor:
        return self.compressor.decompress(self)


class Compressor:
    """Base class: ``compress(tensor, step, key) -> Payload`` and ``decompress(payload) -> Tensor``.

    Subclasses set the class attributes below, validate their arguments in ``__init__`` and keep no state that
    changes during training (a stateful compressor, such as low-rank warm start, implements ``state_dict``).

    Attributes:
        unbiased: ``E[C(x)] = x``.
        alpha: size-independent contraction factor in [0, 1] (``0.0``: none guaranteed).
        summable: payloads may be summed by an all-reduce (linear, shared randomness).
        rounds: collectives per step; ``2`` means :meth:`prepare` runs a first round (PowerSGD, cyclic Top-K).
        wire_bits: ``None`` (payloads travel as they are) or ``8`` (summable payloads rounded to 8 bits in transit).
        first_round_transport: ``None`` (the first round travels like the second) or ``"broadcast"`` (one rank,
            :meth:`first_round_root`, sends its message to all; :meth:`observe_broadcast` receives it).
    """

    unbiased: bool = False
    alpha: float = 0.0
    summable: bool = False
    rounds: int = 1
    wire_bits: int | None = None
    first_round_transport: str | None = None

    @property
    def transport(self) -> str:
        """``"all_reduce"``, ``"quantized_all_reduce"`` (summable, ``wire_bits=8``) or ``"all_gather"``."""
        if not self.summable:
            return "all_gather"
        return "quantized_all_reduce" if self.wire_bits == 8 else "all_reduce"

    def bind(self, rank: int, world_size: int, backend: str, device_type: str) -> None:
        """Called once at setup with the group the payloads travel over; raise ``ValueError`` naming the field when
        this compressor cannot run there. Default: the 8-bit transport needs an all-to-all, which gloo does not run
        on CUDA tensors."""
        if self.wire_bits == 8 and backend == "gloo" and device_type == "cuda" and world_size > 1:
            raise ValueError(
                f"{type(self).__name__}: `factor_bits`/`wire_bits` 8 needs an all-to-all, which the gloo backend does "
                "not run on CUDA tensors; use process_group_backend='nccl' or leave it None."
            )

    def first_round_root(self, step: int) -> int:
        """The rank whose first-round message is broadcast at ``step`` (``first_round_transport="broadcast"``)."""
        return 0

    def observe_broadcast(self, payload: Payload) -> None:
        """Called on every rank with the root's first-round payload (``first_round_transport="broadcast"``)."""
        return None

    def prepare(self, tensor: Tensor, step: int = 0, key: str = "") -> Payload | None:
        """First-round message of a multi-round compressor (``rounds > 1``) for the tensor about to be compressed.

        The caller sums these payloads over the ranks (they are summable), hands the average to
        :meth:`observe_mean`, and then calls :meth:`compress` on the same tensor. ``None``: no first round for this
        tensor (single-round compressors, or tensors sent dense).
        """
        return None

    def compress(self, tensor: Tensor, step: int = 0, key: str = "") -> Payload:  # pragma: no cover - abstract
        """Compress ``tensor`` at training ``step`` for the parameter named ``key`` (seeds random draws)."""
        raise NotImplementedError

    def decompress(self, payload: Payload) -> Tensor:  # pragma: no cover - abstract
        """The dense tensor the payload stands for, in the payload's shape, dtype float32 or the input dtype."""
        raise NotImplementedError

    def contraction(self, numel: int) -> float:
        """Contraction factor for a tensor of ``numel`` entries (at least :attr:`alpha`)."""
        return self.alpha

    def decompress_into(self, payload: Payload, out: Tensor) -> Tensor:
        """:meth:`decompress` written into ``out`` (float32, ``payload.numel`` entries); returns ``out``."""
        return out.copy_(self.decompress(payload).reshape(out.shape))

    def observe_mean(self, payload: Payload) -> None:
        """Called on every rank with the averaged payload of a summable compressor (low-rank warm start uses it)."""
        return None

    def observe_means(self, payloads: list[Payload]) -> None:
        """:meth:`observe_mean` for every averaged payload of one collective (a compressor may batch the work)."""
        for p in payloads:
            self.observe_mean(p)

    def observe_gathered(self, payloads: list[Payload]) -> None:
        """Called on every rank with every rank's payload (rank order) of a non-summable compressor."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Training state (none for stateless compressors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        skip = ("_", "alpha", "unbiased", "summable", "wire_bits")
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith(skip))
        return f"{type(self).__name__}({args})"


def generator_for(seed: int, step: int, key: str = "", device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``(seed, step, key)``: identical on every rank and process, independent of the global RNG.

    A stable hash (not Python's salted ``hash``) mixes the three, so different parameters and steps get unrelated
    streams.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(step)}:{key}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits, bits in {1, 2, 4, 8}) into a uint8 tensor, LSB first.

    The last byte is zero-padded; :func:`unpack_bits` needs the count.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"pack_bits: `bits` must be one of 1, 2, 4, 8, got {bits}.")
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    pad = (-codes.numel()) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (codes << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as int64."""
    if bits == 8:
        return packed.reshape(-1)[:count].to(torch.int64)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.int64)
