"""Real data sets from the shared data folder (skipped when the files are absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import scae
from scae.report import figure_plan

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PBMC = DATA / "pbmc68k_reduced" / "10x_pbmc68k_reduced.h5ad"
CELLBENCH = DATA / "cellbench_3celllines"


def test_pbmc68k_reduced_study(tmp_path):
    if not PBMC.is_file():
        pytest.skip(f"{PBMC} not available")
    dataset = scae.read_h5ad(PBMC, "bulk_labels")
    assert (dataset.n_cells, dataset.n_genes) == (700, 765)
    assert len(dataset.classes) == 10
    result = scae.run_study(dataset, tmp_path, scae.StudyConfig(epochs=5, progress=False))

    for name in ("report.html", "metrics.json", "results.h5ad"):
        assert (tmp_path / name).is_file()
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} == set(figure_plan(result))
    assert {p.stem for p in (tmp_path / "models").glob("*.pt")} == set(result.runs)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["split"] == {"n_train": 560, "n_test": 140, "n_scored": 700, "train_only_labels": {}}
    for name, run in metrics["runs"].items():
        assert len(run["history"]) == 6
        for part in ("train", "test"):
            for value in run["errors"][part].values():
                assert math.isfinite(value) and value > 0, name
    for key, r in metrics["representations"].items():
        assert -0.5 <= r["ari"] <= 1 and 0 <= r["nmi"] <= 1 and -1 <= r["silhouette"] <= 1, key
        assert all(math.isfinite(r[k]) for k in ("ari", "nmi", "silhouette")), key
        if "linear_accuracy" in r:
            assert 0 <= r["linear_accuracy"] <= 1
    # the labels carry real structure: the input clusters far better than chance (README: ~0.49)
    assert metrics["representations"]["original_pca50"]["ari"] > 0.25
    assert metrics["representations"]["original_pca10"]["linear_accuracy"] > 0.5
    for view in result.views.values():
        assert np.all(np.isfinite(view))


def _load_cellbench():
    import pandas as pd

    counts_path = CELLBENCH / "sc_celseq2.count.csv.gz"
    meta_path = CELLBENCH / "sc_celseq2.metadata.csv.gz"
    if not (counts_path.is_file() and meta_path.is_file()):
        pytest.skip(f"{CELLBENCH} CEL-seq2 files not available")
    counts = pd.read_csv(counts_path, index_col=0)  # genes × cells
    meta = pd.read_csv(meta_path, index_col=0)
    counts = counts[meta.index]
    X = counts.T.to_numpy().astype(np.float64)
    X = np.log1p(X / X.sum(axis=1, keepdims=True) * 1e4)
    top = np.sort(np.argsort(X.var(axis=0))[::-1][:1000])
    return X[:, top].astype(np.float32), meta["cell_line_demuxlet"].astype(str).to_numpy()


def test_cellbench_autoencoder_latent_separates_cell_lines():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    X, labels = _load_cellbench()
    assert X.shape == (274, 1000)
    assert sorted(set(labels)) == ["H1975", "H2228", "HCC827"]
    dataset = scae.make_dataset(X, labels, name="cellbench CEL-seq2")
    model = scae.Autoencoder(latent_dim=10, epochs=30, batch_size=32, random_state=0).fit(dataset.X)
    assert model.history_[-1]["train_loss"] < 0.5 * model.history_[0]["train_loss"]
    Z = model.transform(dataset.X)
    assert Z.shape == (274, 10)
    aris = [adjusted_rand_score(labels, KMeans(3, n_init=10, random_state=s).fit_predict(Z)) for s in range(3)]
    assert min(aris) > 0.8, aris


def test_pbmc68k_reduced_old_layout_raw_is_reached_and_not_streamed():
    """scanpy's example file keeps adata.raw in anndata's old layout (raw.X, raw.var as a record array):
    --counts-raw reaches it (it holds log-normalised values, not counts, so it is refused as such),
    and streaming the file says why it cannot instead of a reader's internal error."""
    if not PBMC.is_file():
        pytest.skip(f"{PBMC} not available")
    with pytest.raises(scae.ScaeInputError, match=r"raw\.X: holds 2\.177 at row 0, column 764, which is not a count"):
        scae.read_h5ad(PBMC, "bulk_labels", counts_raw=True)
    with pytest.raises(scae.ScaeInputError, match=r"is in an older AnnData layout \(obs and var as record arrays\), "
                                                   r"which scae cannot stream; load it without --stream"):
        scae.read_h5ad(PBMC, "bulk_labels", stream=True)
