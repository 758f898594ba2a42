"""The single gradient-statistics core: norms, per-example variance, noise scale, batch-size tests.

Imports torch only (never ``lightning``), so it is usable and testable outside a Trainer.
"""

from lightning_convergence.stats.batch_tests import (
    BATCH_TESTS,
    BlockwiseGradStats,
    augmented_test_batch_size,
    blockwise_sample_grad_stats,
    demanded_batch_size,
    inner_product_test_batch_size,
    next_batch_size,
    noise_estimate,
    norm_test_batch_size,
    orthogonality_test_batch_size,
)
from lightning_convergence.stats.capture import StepGradientSamples
from lightning_convergence.stats.module_grads import BatchLossFn, ExampleGradients, batch_length, slice_batch
from lightning_convergence.stats.noise_scale import (
    BiasCorrectedEMA,
    GradientNoiseScale,
    NoiseEstimate,
    estimate_noise,
)
from lightning_convergence.stats.norms import (
    all_finite,
    grads_of,
    inner,
    l1_norm,
    l2_norm,
    per_tensor_norms,
    sq_norm,
)
from lightning_convergence.stats.per_sample_norms import per_sample_sq_norms
from lightning_convergence.stats.variance import (
    AllReduce,
    SampleGradStats,
    per_sample_grads,
    sample_grad_stats,
)

__all__ = [
    "AllReduce",
    "BatchLossFn",
    "ExampleGradients",
    "BiasCorrectedEMA",
    "BlockwiseGradStats",
    "GradientNoiseScale",
    "NoiseEstimate",
    "SampleGradStats",
    "StepGradientSamples",
    "all_finite",
    "augmented_test_batch_size",
    "BATCH_TESTS",
    "blockwise_sample_grad_stats",
    "demanded_batch_size",
    "batch_length",
    "estimate_noise",
    "grads_of",
    "inner",
    "inner_product_test_batch_size",
    "l1_norm",
    "l2_norm",
    "next_batch_size",
    "noise_estimate",
    "norm_test_batch_size",
    "orthogonality_test_batch_size",
    "per_sample_grads",
    "per_sample_sq_norms",
    "per_tensor_norms",
    "sample_grad_stats",
    "slice_batch",
    "sq_norm",
]
