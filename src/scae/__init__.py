"""scae: single-cell autoencoders.

Train autoencoders on cells × genes expression matrices, extract latent representations,
reconstruct (denoise) the data, and measure whether cell populations stay apart.
"""

__version__ = "0.1.0"

from scae.data import Dataset, make_dataset, read_counts_labels, read_h5ad  # noqa: E402
from scae.errors import ScaeInputError  # noqa: E402
from scae.models import Autoencoder  # noqa: E402
from scae.simulate import simulate_dataset  # noqa: E402
from scae.study import StudyConfig, StudyResult, run_study  # noqa: E402

__all__ = [
    "Autoencoder",
    "Dataset",
    "ScaeInputError",
    "StudyConfig",
    "StudyResult",
    "make_dataset",
    "read_counts_labels",
    "read_h5ad",
    "run_study",
    "simulate_dataset",
]
