"""Example models and datamodules that need nothing external: bundled digits, stdlib text, synthetic tasks."""

from lightning_convergence.examples.char_lm import CharTransformerLM, StdlibTextDataModule, load_stdlib_corpus
from lightning_convergence.examples.classifier import DigitsDataModule, MLPClassifier
from lightning_convergence.examples.synthetic import (
    LinearModel,
    SyntheticRegressionDataModule,
    make_regression_data,
)

__all__ = [
    "CharTransformerLM",
    "DigitsDataModule",
    "LinearModel",
    "MLPClassifier",
    "StdlibTextDataModule",
    "SyntheticRegressionDataModule",
    "load_stdlib_corpus",
    "make_regression_data",
]
