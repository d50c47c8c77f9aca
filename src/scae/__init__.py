"""scae: single-cell autoencoders.

Train autoencoders on cells × genes expression matrices, extract latent representations,
reconstruct (denoise) the data, and measure whether cell populations stay apart.

The public names below are imported lazily, so ``import scae.embeddings`` (for instance in a
t-SNE worker process) does not pay for importing PyTorch.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

_EXPORTS = {
    "Autoencoder": "scae.models",
    "ArraySource": "scae.sources",
    "H5CSRSource": "scae.sources",
    "H5DenseSource": "scae.sources",
    "NpySource": "scae.sources",
    "RowSource": "scae.sources",
    "TSNEConfig": "scae.embeddings",
    "Dataset": "scae.data",
    "ScaeInputError": "scae.errors",
    "StudyConfig": "scae.results",
    "StudyResult": "scae.results",
    "TrainingDivergedError": "scae.training",
    "write_study": "scae.outputs",
    "make_dataset": "scae.data",
    "embed": "scae.anndata_embed",
    "highly_variable_genes": "scae.genes",
    "run_benchmark": "scae.benchmark",
    "read_counts_labels": "scae.data",
    "read_h5ad": "scae.data",
    "run_study": "scae.study",
    "simulate_counts": "scae.simulate",
    "simulate_dataset": "scae.simulate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    spec = importlib.util.find_spec(f"scae.{name}") if name.isidentifier() and not name.startswith("_") else None
    if spec is not None and spec.origin is not None:  # a module (not the templates folder): scae.genes works unimported
        return importlib.import_module(f"scae.{name}")
    raise AttributeError(f"module 'scae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
