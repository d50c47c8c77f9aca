"""One call for AnnData users: fit a model on an AnnData, write its latent and denoised matrix.

:func:`embed` follows scanpy's conventions: it works in place and writes the latent to
``adata.obsm["X_scae"]`` and the denoised expression to ``adata.layers["scae_denoised"]`` (both
names configurable), so that ``sc.pp.neighbors(adata, use_rep="X_scae")`` works next. ``scae
embed INPUT.h5ad --out OUT.h5ad`` does the same from the command line.
"""

from __future__ import annotations

import json

from scae import params as rules
from scae.data import anndata_counts, as_matrix, check_varies, dense_if_small
from scae.errors import ScaeInputError
from scae.files import check_h5ad_key
from scae.likelihoods import get_likelihood
from scae.models import Autoencoder
from scae.sources import ArraySource

LATENT_KEY = "X_scae"
DENOISED_LAYER = "scae_denoised"


def embed(
    adata,
    preset: str = "recommended",
    *,
    counts_layer: str | None = None,
    counts_raw: bool = False,
    latent_key: str = LATENT_KEY,
    denoised_layer: str | None = DENOISED_LAYER,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = False,
    **params,
) -> Autoencoder:
    """Fit the preset model on every cell of ``adata`` and store its latent and denoised matrix.

    Parameters
    ----------
    adata
        An :class:`anndata.AnnData` (cells × genes). A count model (the recommended one is) needs
        raw counts: ``X`` itself when it holds non-negative whole numbers, else
        ``layers[counts_layer]`` or ``adata.raw.X`` (``counts_raw=True``). A model trained
        on log-normalised values reads ``X`` (raw counts there are normalised first).
    preset
        A preset of :mod:`scae.presets`; ``"recommended"`` by default.
    latent_key
        ``obsm`` key of the latent (cells × latent size).
    denoised_layer
        ``layers`` key of the denoised expression, on the log-normalised scale
        (``log1p(expected proportion × 10⁴)`` for a count model); ``None``: not written. An
        existing entry of that name (or of ``latent_key`` in ``obsm``) is replaced, except the
        layer the counts are read from, which is refused.
    random_state, device, progress
        As for :class:`~scae.models.Autoencoder`.
    **params
        Overrides of the preset's parameters (e.g. ``epochs=50``).

    Returns
    -------
    Autoencoder
        The fitted model; ``adata.uns["scae"]`` records the preset, the parameters and the keys.
    """
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise ScaeInputError(f"adata must be an anndata.AnnData; got {type(adata).__name__}")
    rules.check("counts_raw", counts_raw, rules.BOOLEAN)
    check_h5ad_key("latent_key", latent_key)
    if denoised_layer is not None:
        check_h5ad_key("denoised_layer", denoised_layer)
        if denoised_layer == counts_layer:
            raise ScaeInputError(
                f"denoised_layer '{denoised_layer}' is the layer the raw counts are read from; writing the "
                "denoised matrix there would replace them: choose another name"
            )
    model = Autoencoder.from_preset(preset, random_state=random_state, device=device, progress=progress, **params)
    model._check_params()
    counts = anndata_counts(adata, counts_layer, counts_raw)
    if counts is not None:
        matrix = counts
        check_varies(matrix, f"adata layer '{counts_layer}'" if counts_layer else "adata.raw.X" if counts_raw else "adata X")
    else:
        matrix = as_matrix(adata.X, "adata X")
        check_varies(matrix, "adata X")
        if get_likelihood(model.loss).counts:
            raise ScaeInputError(
                f"preset '{preset}' models raw counts, and adata.X does not hold counts (non-negative whole "
                "numbers); name them with counts_layer='…' or counts_raw=True"
            )
    source = ArraySource(dense_if_small(matrix), counts=counts is not None)
    model.fit(source, description=f"scae {preset}")
    latent, denoised = model.transform_and_reconstruct(source)
    adata.obsm[latent_key] = latent
    if denoised_layer is not None:
        adata.layers[denoised_layer] = denoised
    adata.uns["scae"] = {
        "preset": preset,
        "params": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in model.get_params().items()
                              if k != "progress"}),
        "latent_key": latent_key,
        "denoised_layer": denoised_layer or "",
        "denoised_scale": "log1p(expected proportion × 1e4)" if get_likelihood(model.loss).counts
        else "the model input's scale (log-normalised)",
        "best_epoch": -1 if model.best_epoch_ is None else int(model.best_epoch_),
        "fit_seconds": float(model.fit_seconds_),
    }
    return model


__all__ = ["DENOISED_LAYER", "LATENT_KEY", "embed"]
