"""Named parameter sets of :class:`scae.Autoencoder` (presets are parameters, not subclasses).

``Autoencoder.from_preset(name, **overrides)`` builds one; :data:`RECOMMENDED` names the preset
scae recommends for a new dataset of raw counts, chosen by measurement (the README's "Count
models and the recommended model", and ``benchmarks/models.py``).
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # a denoising negative-binomial autoencoder with a log-scale fidelity term: the recommended model
    # (benchmarks/models.py: the best k-means ARI and 15-NN accuracy over the raw-count datasets tried;
    # at most 30 epochs: as good as 60 on the mouse bladder, PBMC and simulated sets, in half the time)
    "nb_dae": {"latent_dim": 10, "hidden": (128,), "loss": "nb", "log_mse_weight": 1.0, "scale_input": True,
               "input_noise": 1.0, "epochs": 30, "batch_size": 128, "learning_rate": 1e-3,
               "early_stopping": True, "patience": 8, "lr_schedule": "plateau"},
    # DCA-like: a count autoencoder with a zero-inflated negative binomial likelihood
    "zinb_ae": {"latent_dim": 10, "hidden": (128,), "loss": "zinb", "epochs": 60, "batch_size": 128,
                "learning_rate": 1e-3, "norm": "batch", "early_stopping": True, "patience": 8,
                "lr_schedule": "plateau"},
    # a negative-binomial autoencoder
    "nb_ae": {"latent_dim": 10, "hidden": (128,), "loss": "nb", "epochs": 60, "batch_size": 128,
              "learning_rate": 1e-3, "norm": "batch", "early_stopping": True, "patience": 8,
              "lr_schedule": "plateau"},
    # scVI-like: a variational autoencoder with a negative-binomial likelihood
    "nb_vae": {"latent_dim": 10, "hidden": (128,), "loss": "nb", "variational": True, "epochs": 60,
               "batch_size": 128, "learning_rate": 1e-3, "norm": "batch", "dropout": 0.1,
               "kl_warmup_epochs": 10, "early_stopping": True, "patience": 8, "lr_schedule": "plateau"},
}
RECOMMENDED = "nb_dae"
"""The preset :func:`preset` returns for ``"recommended"``."""
BENCHMARK_METHODS = ("pca10", "pca10_scaled", "ae10", "recommended", "scvi")
"""What ``scae benchmark`` compares by default (:mod:`scae.benchmark`; kept here, free of heavy
imports, for the command line's help): PCA-10 as it is and after scanpy's scaling, the
assignment's ``ae10``, the recommended preset and scvi-tools' SCVI."""


def preset(name: str) -> dict:
    """A copy of the parameters of preset ``name`` (``"recommended"`` is :data:`RECOMMENDED`)."""
    if not isinstance(name, str):
        raise ValueError(f"a preset is named by a string; got {type(name).__name__} {name!r:.80}")
    key = RECOMMENDED if name == "recommended" else name
    if key not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; expected one of: recommended, {', '.join(PRESETS)}")
    return dict(PRESETS[key])
