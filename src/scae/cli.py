"""Command line: ``scae study`` runs the autoencoder study, ``scae simulate`` writes the built-in data.

Problems with the input or the output directory are reported as one line on stderr with exit
status 2 (no traceback).
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m scae.cli: the process is prepared before NumPy loads (its threads)
    from scae.__main__ import prepare_process

    prepare_process()

import argparse
import contextlib
import gc
import io
import os
import signal
import sys
import warnings
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from scae import __version__
from scae import params as rules
from scae.errors import ScaeInputError, first_line
from scae.interrupts import Interrupted, kill_child_processes, signals_raise_interrupted, watched_signals
from scae.presets import BENCHMARK_METHODS, PRESETS, RECOMMENDED

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``scae: error: …``, exit 2), no usage block.

    Subparsers inherit the class (``add_subparsers`` uses the parser's own type). Options whose
    ranges depend on each other (the network's size) are checked after parsing.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # '--epoch 5' is not '--epochs 5': a later option could make it mean another
        super().__init__(*args, **kwargs)

    def error(self, message: str, prog: str | None = None) -> NoReturn:
        message = printable(" ".join(message.split()))  # one line, whatever the value held
        self.exit(EXIT_USAGE, f"scae: error: {message} (see '{prog or self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        args = sys.argv[1:] if args is None else list(args)
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:  # argparse's own message, pointing at the help of the command the first one followed
            command = getattr(parsed, "command", None)
            after_command = command in args and (unknown[0] not in args or args.index(unknown[0]) > args.index(command))
            self.error(f"unrecognized arguments: {' '.join(unknown)}",
                       prog=f"{self.prog} {command}" if after_command else None)
        hidden = getattr(parsed, "hidden", None)
        if hidden is not None:  # the part of the network's size that does not depend on the genes
            problem = rules.network_too_large(getattr(parsed, "latent", STUDY_MAX_LATENT) or 10, tuple(hidden))
            if problem is not None:
                self.error(f"argument --hidden: {problem}", prog=f"{self.prog} {parsed.command}")
        if parsed.command == "simulate" and parsed.cells * parsed.genes > SIMULATE_MAX_ENTRIES:
            self.error(
                f"argument --cells: {parsed.cells} cells × {parsed.genes} genes is more than "
                f"{SIMULATE_MAX_ENTRIES:,} entries (the matrix is written dense, 4 bytes per entry)",
                prog=f"{self.prog} simulate",
            )
        return parsed


STUDY_MAX_LATENT = 50
"""Largest latent size the study trains (:data:`scae.results.DEFAULT_RUNS`)."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="scae",
        description="Single-cell autoencoders: train, embed, reconstruct, and measure cluster structure.",
    )
    parser.add_argument("--version", action="version", version=f"scae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    study = sub.add_parser(
        "study",
        help="run the full autoencoder study (latent 10, 50, 2 with MSE; latent 10 with nonzero_mse)",
        description="Run the autoencoder study. Without input it uses the built-in simulated dataset. "
        "Under torchrun every process trains the models together and rank 0 writes the outputs.",
    )
    _add_input_arguments(study)
    study.add_argument("--out", type=_output_path(folder=True), required=True, help="output directory")
    _add_training_arguments(study)
    study.add_argument("--max-embed-cells", type=_option(rules.AT_LEAST_ONE), default=20_000,
                       help="cells sampled for t-SNE, scatter plots and cluster scores (default 20000)")
    study.add_argument("--resume", action="store_true",
                       help="reuse the models an interrupted study already trained in OUT/models "
                            "(refused when they come from another input or other settings)")
    study.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")

    fit = sub.add_parser(
        "fit",
        help="train one autoencoder on the study's training cells and save it",
        description="Train one autoencoder on the training cells of the study's split (test loss recorded "
        "per epoch) and save it with its history. Under torchrun every process trains together; rank 0 saves.",
    )
    _add_input_arguments(fit)
    fit.add_argument("--out", type=_output_path(folder=False), required=True, help="model file to write (.pt)")
    fit.add_argument("--preset", choices=PRESET_CHOICES,
                     help="start from a named parameter set (options given beside it override it); "
                          f"recommended = {RECOMMENDED}")
    fit.add_argument("--latent", type=_option(rules.WIDTH), default=None,
                     help=f"latent size, 1 to {rules.MAX_WIDTH} (default 10)")
    fit.add_argument("--loss", choices=rules.LOSSES, default=None,
                     help="training loss (default mse); poisson, nb and zinb model the raw counts")
    _add_training_arguments(fit, from_preset=True)
    _add_model_arguments(fit)
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    embed = sub.add_parser(
        "embed",
        help="fit the recommended model on an .h5ad and write its latent and denoised matrix (scanpy-ready)",
        description="Fit a model (the recommended preset by default) on every cell of INPUT and write INPUT's "
        "AnnData with the latent in obsm (default X_scae) and the denoised expression in layers (default "
        "scae_denoised) to OUT, so that sc.pp.neighbors(adata, use_rep='X_scae') works.",
    )
    embed.add_argument("input", type=Path, metavar="INPUT", help="AnnData .h5ad file (read, never modified)")
    embed.add_argument("--out", type=_output_path(folder=False), required=True, help=".h5ad file to write (not INPUT)")
    embed.add_argument("--preset", choices=PRESET_CHOICES, default="recommended",
                       help=f"the model (default recommended = {RECOMMENDED})")
    embed.add_argument("--counts-layer", metavar="NAME", help="raw counts from this layer")
    embed.add_argument("--counts-raw", action="store_true", help="raw counts from adata.raw.X")
    embed.add_argument("--top-genes", type=_option(rules.TOP_GENES), metavar="N",
                       help="fit on the N most variable genes (seurat_v3 on the raw counts of all cells); "
                            "OUT then holds those genes only")
    embed.add_argument("--latent-key", default="X_scae", help="obsm key of the latent (default X_scae)")
    embed.add_argument("--denoised-layer", default="scae_denoised",
                       help="layers key of the denoised expression (default scae_denoised)")
    embed.add_argument("--epochs", type=_option(rules.EPOCHS), default=None,
                       help="most epochs (default: the preset's; it stops early on its validation cells)")
    seed = rules.study_seed()
    embed.add_argument("--seed", type=_option(seed), default=0, help="seed of every random choice (default 0)")
    embed.add_argument("--device", choices=rules.DEVICES, default="auto", help="where the model trains")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")

    bench = sub.add_parser(
        "benchmark",
        help="fit embedding methods on labelled datasets and compare their latents (ARI, NMI, 15-NN accuracy)",
        description="Fit each method on every cell of each dataset (labels unused) and score its latent against "
        "the labels; writes OUT/benchmark.json and OUT/benchmark.html. Methods: pca<k> (pca<k>_scaled: after "
        "scanpy's scaling), the study runs "
        f"(ae10, ae50, ae2, ae10_nonzero), the presets ({', '.join(PRESET_CHOICES)}) and scvi (scvi-tools' "
        "SCVI, when installed: pip install 'scae[peers]').",
    )
    bench.add_argument("--h5ad", type=Path, action="append", default=[], help="AnnData file (repeatable)")
    bench.add_argument("--label-key", help="obs column with the labels (for every --h5ad)")
    bench.add_argument("--counts-layer", metavar="NAME", help="raw counts from this layer (every --h5ad)")
    bench.add_argument("--counts-raw", action="store_true", help="raw counts from adata.raw.X (every --h5ad)")
    bench.add_argument("--counts", type=Path, action="append", default=[],
                       help="a cells × genes .npy (repeatable, each with a --labels)")
    bench.add_argument("--labels", type=Path, action="append", default=[], help="labels.txt of a --counts (paired in the order given)")
    bench.add_argument("--out", type=_output_path(folder=True), required=True, help="output directory")
    bench.add_argument("--methods", nargs="+", default=list(BENCHMARK_METHODS), metavar="METHOD",
                       help=f"methods to compare (default: {' '.join(BENCHMARK_METHODS)})")
    bench.add_argument("--seeds", type=_option(BENCHMARK_SEEDS), default=3,
                       help="fits per method and dataset, with seeds 0 … N-1 (default 3)")
    bench.add_argument("--top-genes", type=_option(rules.TOP_GENES), default=2000, metavar="N",
                       help="datasets with more genes keep their N most variable (default 2000)")
    bench.add_argument("--device", choices=rules.DEVICES, default="auto", help="where models train")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")

    simulate = sub.add_parser("simulate", help="write the built-in dataset as counts.npy (log-normalized) + "
                              "raw_counts.npy + labels.txt")
    simulate.add_argument("--out", type=_output_path(folder=True), required=True, help="output directory")
    simulate.add_argument("--cells", type=_option(SIMULATE_CELLS), default=5000,
                          help="cells, at least 2 per population (default 5000)")
    simulate.add_argument("--genes", type=_option(SIMULATE_GENES), default=1000, help="genes, at least 10 (default 1000)")
    simulate.add_argument("--populations", type=_option(SIMULATE_POPULATIONS), default=3,
                          help="cell populations (labels), at least 2 (default 3)")
    simulate.add_argument("--seed", type=_option(rules.SEED), default=0,
                          help="seed: the same one gives the same files, bit for bit (default 0)")
    return parser


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("input (choose one; none = built-in simulated dataset)")
    source.add_argument("--counts", type=Path, help="cells × genes matrix, .npy (log-normalized or raw counts)")
    source.add_argument("--labels", type=Path, help="labels.txt, one label per line (with --counts)")
    source.add_argument("--h5ad", type=Path, help="AnnData file")
    source.add_argument("--label-key", help="obs column with the cell labels (with --h5ad)")
    source.add_argument("--layer", help="use this layer instead of X (with --h5ad)")
    source.add_argument("--counts-layer", metavar="NAME",
                        help="raw counts of the cells from this layer (with --h5ad), for count models; "
                             "X (or --layer) stays the input of the MSE runs")
    source.add_argument("--counts-raw", action="store_true",
                        help="raw counts from adata.raw.X, its genes matched to X's by name (with --h5ad)")
    source.add_argument("--raw-counts", type=Path, metavar="PATH",
                        help="raw counts .npy of the same cells and genes (with --counts and --labels)")
    source.add_argument("--top-genes", type=_option(rules.TOP_GENES), metavar="N",
                        help="keep the N most highly variable genes, measured on the training cells "
                             "(seurat_v3 on raw counts, else seurat); N at most the number of genes")
    source.add_argument("--normalize", choices=["auto", "log1p", "none"], default="auto",
                        help="raw counts: auto (default) treats a matrix of non-negative integers as raw counts, "
                             "which the models see as log1p(counts / library size × 1e4), computed per batch; "
                             "log1p: always; none: never")
    source.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="stream the matrix from disk instead of loading it (a CSR .h5ad, or a memory-mapped "
                             ".npy); default: stream when its dense float32 form exceeds 1 GiB")


def _add_training_arguments(parser: argparse.ArgumentParser, from_preset: bool = False) -> None:
    """The network and schedule options; with ``from_preset`` their defaults are ``None`` (filled
    from ``--preset`` or :data:`FIT_DEFAULTS` by :func:`model_params`), so a preset's values stand
    unless an option is given."""

    def default(value):
        return None if from_preset else value

    parser.add_argument("--epochs", type=_option(rules.EPOCHS), default=default(50),
                        help=f"training epochs, 1 to {rules.MAX_EPOCHS} (default 50)")
    seed = rules.study_seed()
    parser.add_argument("--seed", type=_option(seed), default=0,
                        help=f"seed of every random choice, {seed.low} to {seed.high} (default 0)")
    parser.add_argument("--hidden", type=_option(rules.WIDTH), nargs="+", default=default([100]), metavar="WIDTH",
                        help=f"hidden layer widths, input side first, each 1 to {rules.MAX_WIDTH} (default 100)")
    parser.add_argument("--activation", default=default("relu"), choices=rules.ACTIVATIONS,
                        help="activation of the hidden layers (default relu)")
    parser.add_argument("--batch-size", type=_option(rules.BATCH_SIZE), default=default(128),
                        help=f"minibatch size, over all processes together, 1 to {rules.MAX_BATCH_SIZE} (default 128)")
    parser.add_argument("--learning-rate", type=_option(rules.LEARNING_RATE), default=default(1e-3),
                        help=f"Adam learning rate, > 0 and <= {rules.MAX_LEARNING_RATE:g} (default 1e-3)")
    parser.add_argument("--device", choices=rules.DEVICES, default="auto",
                        help="where models train and predict (default auto: a GPU when there is one)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the count, variational and regularised models (defaults: the preset's, else off)."""
    group = parser.add_argument_group("model (defaults: the --preset's values, else the plain autoencoder)")
    group.add_argument("--variational", action=argparse.BooleanOptionalAction, default=None,
                       help="Gaussian latent with a KL term (a VAE); transform gives the posterior mean")
    group.add_argument("--kl-warmup-epochs", type=_option(rules.WARMUP_EPOCHS), default=None, metavar="N",
                       help="the KL weight rises from 0 to 1 over N epochs (default 0)")
    group.add_argument("--norm", choices=rules.NORMS, default=None, help="normalisation of the hidden layers (default none)")
    group.add_argument("--dropout", type=_option(rules.DROPOUT), default=None, help="dropout after hidden layers (default 0)")
    group.add_argument("--weight-decay", type=_option(rules.WEIGHT_DECAY), default=None,
                       help="decoupled weight decay, AdamW (default 0: Adam)")
    group.add_argument("--lr-schedule", choices=rules.LR_SCHEDULES, default=None, help="learning-rate schedule (default none)")
    group.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=None,
                       help="stop when a held-out 10%% of the training cells stops improving; keep the best epoch")
    group.add_argument("--patience", type=_option(rules.EPOCHS), default=None,
                       help="epochs without improvement before early stopping (default 10)")
    group.add_argument("--scale-input", action=argparse.BooleanOptionalAction, default=None,
                       help="standardise each gene of the encoder's input")
    group.add_argument("--input-noise", type=_option(rules.INPUT_NOISE), default=None,
                       help="sd of Gaussian noise on the encoder's input while training (default 0)")
    group.add_argument("--log-mse-weight", type=_option(rules.LOG_MSE_WEIGHT), default=None,
                       help="count losses: add this weight × the squared error of the log-normalised "
                            "reconstruction (default 0)")


FIT_OPTIONS = {  # Autoencoder parameter: (argparse destination, default without a preset)
    "latent_dim": ("latent", 10), "loss": ("loss", "mse"), "epochs": ("epochs", 50), "hidden": ("hidden", (100,)),
    "activation": ("activation", "relu"), "batch_size": ("batch_size", 128), "learning_rate": ("learning_rate", 1e-3),
    "variational": ("variational", False), "kl_warmup_epochs": ("kl_warmup_epochs", 0), "norm": ("norm", "none"),
    "dropout": ("dropout", 0.0), "weight_decay": ("weight_decay", 0.0), "lr_schedule": ("lr_schedule", "none"),
    "early_stopping": ("early_stopping", False), "patience": ("patience", 10), "scale_input": ("scale_input", False),
    "input_noise": ("input_noise", 0.0), "log_mse_weight": ("log_mse_weight", 0.0),
}


def model_params(args: argparse.Namespace) -> dict:
    """``scae fit``'s Autoencoder parameters: each option as given, else the preset's value, else its default."""
    from scae.presets import preset

    base = preset(args.preset) if args.preset else {}
    params = {}
    for name, (dest, fallback) in FIT_OPTIONS.items():
        given = getattr(args, dest)
        params[name] = given if given is not None else base.get(name, fallback)
    params["hidden"] = tuple(params["hidden"])
    return params


PRESET_CHOICES = ("recommended", *PRESETS)
BENCHMARK_SEEDS = rules.Integer(1, 100)


SIMULATE_CELLS = rules.Integer(1, 10_000_000)
SIMULATE_GENES = rules.Integer(10, 100_000)
SIMULATE_POPULATIONS = rules.Integer(2, 1000)
SIMULATE_MAX_ENTRIES = 1_000_000_000
"""``scae simulate`` writes a dense float32 matrix: at most 4 GB."""


def _output_path(folder: bool):
    """An argparse ``type`` for ``--out``: a non-empty path (``''`` would be the current
    directory), and for a file (``folder=False``) one that does not end with a slash, which
    names a folder."""

    def parse(text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected the path of {'a folder' if folder else 'a file'} to write, got {text!r}")
        if not folder and text.endswith(("/", os.sep)):
            raise argparse.ArgumentTypeError(f"expected the path of a file to write, got {text} (a folder's name)")
        return settled_path(Path(text))

    parse.__name__ = "path"
    return parse


def settled_path(path: Path) -> Path:
    """``path`` with each ``..`` that follows a folder that does not exist yet taken out with that
    folder (``q1/../q2`` is ``q2`` while ``q1`` does not exist), so that making it creates only the
    folders it names, and a refused run can remove them. A ``..`` after a folder or link that
    exists is kept: the system resolves it (through a link, to the parent of its target)."""
    kept: list[str] = []
    for part in path.parts:
        if part == ".." and kept and kept[-1] not in ("..", path.anchor) and not os.path.lexists(Path(*kept)):
            kept.pop()
        else:
            kept.append(part)
    settled = Path(*kept) if kept else Path(".")
    return path if settled == path else settled


def _option(rule):
    """An argparse ``type`` that parses a command-line value and checks it with a :mod:`scae.params` rule."""

    def parse(text: str):
        try:
            return rule.parse(text)
        except rules.InvalidValue as err:
            shown = text if text.strip() and text.isprintable() and " " not in text else repr(text)
            raise argparse.ArgumentTypeError(f"expected {err.expected}, got {shown}") from None

    parse.__name__ = type(rule).__name__.lower()
    return parse


def load_input(args: argparse.Namespace):
    """The dataset the study arguments name (the built-in one when none is given), with its raw
    counts when they are given (``--counts-layer``, ``--counts-raw``, ``--raw-counts``);
    ``--top-genes`` is checked against its number of genes (the selection itself is made on the
    training cells, by :func:`scae.genes.highly_variable_genes`)."""
    dataset = _read_input(args)
    check_top_genes(getattr(args, "top_genes", None), dataset.n_genes)
    return dataset


def _read_input(args: argparse.Namespace):
    from scae.data import read_counts_labels, read_h5ad

    counts_layer, counts_raw = getattr(args, "counts_layer", None), getattr(args, "counts_raw", False)
    raw_counts = getattr(args, "raw_counts", None)
    if args.h5ad is not None and (args.counts is not None or args.labels is not None):
        raise ScaeInputError("give either --h5ad or --counts with --labels, not both")
    if counts_layer is not None and counts_raw:
        raise ScaeInputError("give either --counts-layer or --counts-raw (where the raw counts are), not both")
    if args.h5ad is not None:
        if not args.label_key:
            raise ScaeInputError(f"{args.h5ad}: --label-key is required with --h5ad (the obs column of cell labels)")
        if raw_counts is not None:
            raise ScaeInputError("--raw-counts goes with --counts and --labels; with --h5ad, name the raw counts with "
                                 "--counts-layer or --counts-raw")
        return read_h5ad(args.h5ad, args.label_key, args.layer, normalize=args.normalize, stream=args.stream,
                         counts_layer=counts_layer, counts_raw=counts_raw)
    if args.label_key or args.layer:
        raise ScaeInputError("--label-key and --layer go with --h5ad")
    if counts_layer is not None or counts_raw:
        raise ScaeInputError("--counts-layer and --counts-raw go with --h5ad; with --counts and --labels, "
                             "give the raw counts as --raw-counts raw.npy")
    if (args.counts is None) != (args.labels is None):
        raise ScaeInputError("--counts and --labels go together: the matrix and its one-label-per-line file")
    if args.counts is not None:
        return read_counts_labels(args.counts, args.labels, normalize=args.normalize, stream=args.stream,
                                  raw_counts_path=raw_counts)
    if raw_counts is not None:
        raise ScaeInputError("--raw-counts goes with --counts and --labels; the built-in dataset has its simulated counts")
    if args.stream:
        raise ScaeInputError("--stream reads a file from disk (--h5ad, or --counts with --labels); the built-in dataset is made in memory")
    from scae.simulate import simulate_dataset

    return simulate_dataset()


def check_top_genes(top_genes: int | None, n_genes: int) -> None:
    """Refuse ``--top-genes N`` above the number of genes of the input (known once it is read)."""
    if top_genes is not None and top_genes > n_genes:
        raise ScaeInputError(
            f"--top-genes {top_genes}: the input has {n_genes} genes; expected at most {n_genes}"
        )


def _folders_to_make(out: Path) -> list[Path]:
    """The folders that making ``out`` would create, deepest first (see :func:`_remove_empty`)."""
    made, folder = [], Path(out)
    while not os.path.lexists(folder) and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    return made


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders a refused or failed run made for its output and left empty, deepest first."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def _no_empty_folders_left(out: Path):
    """Within the block, a failure (or an interrupt) removes the folders the run made for ``out``
    while they are still empty."""
    made = _folders_to_make(out)
    try:
        yield
    except BaseException:
        _remove_empty(made)
        raise


def run_study_command(args: argparse.Namespace) -> int:
    from scae.files import check_output_dir, refuse_inputs_inside

    refuse_inputs_inside(args.out, [args.h5ad, args.counts, args.labels, args.raw_counts])  # before anything is removed
    with _no_empty_folders_left(args.out):
        check_output_dir(args.out)  # fail fast (every process), before loading or training
        return _run_study_into(args)


def _run_study_into(args: argparse.Namespace) -> int:
    """:func:`run_study_command` once ``--out`` is checked (and made)."""
    distributed = None
    if rules.launched_by_torchrun():  # join the group first, so that no process is left waiting for one that stopped
        distributed = _join_process_group(args.device)
    try:
        main = distributed is None or distributed.is_main
        started = time.perf_counter()
        dataset = load_input(args)  # input errors come before the heavy imports below
        load_seconds = time.perf_counter() - started
        # the study's background workers start now, so that their imports overlap this process's
        with _background_jobs(args, dataset.n_cells) if main else contextlib.nullcontext() as jobs:
            _study(args, dataset, load_seconds, distributed, jobs, started)
    finally:
        if distributed is not None and sys.exc_info()[0] is None:  # after a failure the group may be broken
            from scae.parallel import shutdown_distributed

            shutdown_distributed()
    return 0


STUDY_TSNES = 7
"""t-SNEs of the command's study at most: the input's, and the latent's and reconstruction's of
``ae10``, ``ae10_nonzero`` and ``recommended`` (``scae.results.STUDY_RUNS``, which imports PyTorch)."""


def _background_jobs(args: argparse.Namespace, n_cells: int):
    """The study's t-SNE, scoring and figure workers, started before this process imports PyTorch
    and scikit-learn (about 2 s), so that their own imports (openTSNE, scikit-learn, matplotlib)
    happen meanwhile: half the cores but no more than :data:`STUDY_TSNES`, none on one core, one
    for a small input (fewer than :data:`~scae.embeddings.TSNE_WORKERS_FROM_CELLS` scored cells)."""
    from scae.background import background_workers
    from scae.embeddings import TSNE_WORKERS_FROM_CELLS, BackgroundTSNE, TSNEConfig

    workers = min(background_workers(), STUDY_TSNES)
    if min(n_cells, args.max_embed_cells) < TSNE_WORKERS_FROM_CELLS:
        workers = min(workers, 1)
    return BackgroundTSNE(None, args.seed, TSNEConfig(), workers, progress=not args.quiet)


MACHINE_SPECIFIC = ("file", "mtime_ns")
"""Parts of an input's fingerprint that differ between copies of one file on several machines."""


def _same_in_every_process(settings: Callable[[], dict], distributed) -> None:
    """Refuse, in every process of a torchrun group alike, a group whose processes were given
    different settings or input (``settings()``: what decides the results, the input's fingerprint
    included; only called in a group, since hashing a matrix in memory takes time): they would
    train apart, or wait for ever in mismatched exchanges."""
    if distributed is None:
        return
    import torch.distributed as dist

    def portable(value):  # a copy of the file on another machine has its own path and time
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items() if k not in MACHINE_SPECIFIC}
        return list(value) if isinstance(value, tuple) else value

    mine = portable(settings())
    everyone = [None] * distributed.world_size
    dist.all_gather_object(everyone, mine, group=distributed.group)
    for rank, theirs in enumerate(everyone):
        differ = sorted(key for key in everyone[0].keys() | theirs.keys() if theirs.get(key) != everyone[0].get(key))
        if differ:
            raise ScaeInputError(
                f"the processes of the torchrun group were not given the same job: process {rank} differs from process 0 "
                f"in {', '.join('the input' if key == 'input' else key for key in differ)}; give every process the same "
                "command and the same input file"
            )


def _study(args: argparse.Namespace, dataset, load_seconds: float, distributed, jobs, started: float) -> None:
    """The study on a loaded dataset, with its background ``jobs`` started (the heavy imports happen here)."""
    from scae.parallel import resolve_device
    from scae.params import check_parameter_count
    from scae.study import StudyConfig, background_workers, run_study

    main = distributed is None or distributed.is_main
    check_parameter_count(dataset.n_genes, STUDY_MAX_LATENT, tuple(args.hidden))
    device = resolve_device(args.device)  # fail fast on a device that is not there
    if not args.quiet and main:
        mode = "streamed from disk" if dataset.on_disk else "in memory"
        counts = "; raw counts, models see log1p(counts / library size × 1e4)" if dataset.counts else ""
        procs = f"; {distributed.world_size} processes" if distributed else ""
        print(printable(f"scae: {dataset.name}: {dataset.n_cells} cells × {dataset.n_genes} genes, "
                        f"{len(dataset.classes)} labels ({mode}{counts}); device {device}{procs}"), file=sys.stderr)
        note = dataset.scale_note()
        if note is not None:
            print(f"scae: note: {note}", file=sys.stderr)
    config = StudyConfig(
        epochs=args.epochs,
        seed=args.seed,
        hidden=tuple(args.hidden),
        activation=args.activation,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_embed_cells=args.max_embed_cells,
        progress=not args.quiet,
        tsne_workers=background_workers(),
        device=args.device,
        resume=args.resume,
        top_genes=args.top_genes,
    )
    _same_in_every_process(lambda: {**config.to_dict(), "input": dataset.fingerprint()}, distributed)
    run_study(dataset, args.out, config, data_seconds=load_seconds, distributed=distributed, jobs=jobs)
    if main:
        _say_done(f"scae: study finished in {time.perf_counter() - started:.1f} s; report: {args.out / 'report.html'}")


def _join_process_group(device_name: str):
    """Under torchrun: the device of this process and its place in the group."""
    from scae.parallel import init_distributed, resolve_device

    return init_distributed(resolve_device(device_name))


def _resolved(path: Path) -> Path:
    """``path`` with its links resolved; a link loop (or a name the system refuses) is one clean error."""
    try:
        return path.resolve()
    except RuntimeError:  # how Python before 3.13 reports a loop of symbolic links
        raise ScaeInputError(f"{path}: is a loop of symbolic links; expected a file") from None
    except OSError as err:
        raise ScaeInputError(f"{path}: cannot be resolved ({err.strerror or err})") from None


def run_fit_command(args: argparse.Namespace) -> int:
    from scae.parallel import init_distributed, resolve_device

    device = resolve_device(args.device)
    distributed = init_distributed(device)
    with _no_empty_folders_left(args.out.parent):
        return _fit_into(args, device, distributed)


def _fit_into(args: argparse.Namespace, device, distributed) -> int:
    """:func:`run_fit_command` once the device and the process group are settled."""
    from scae.data import stratified_split
    from scae.files import check_replaceable, check_writable
    from scae.likelihoods import get_likelihood
    from scae.models import Autoencoder
    from scae.parallel import shutdown_distributed

    try:
        main = distributed is None or distributed.is_main
        out = args.out
        try:  # every process checks, so none is left waiting for one that stopped here
            out.parent.mkdir(parents=True, exist_ok=True)
            check_writable(out.parent)
        except OSError as err:
            raise ScaeInputError(f"{out.parent}: cannot write the model file there ({err.strerror or err})") from None
        if out.is_dir():
            raise ScaeInputError(f"{out}: is a directory; expected the path of the model file to write")
        check_replaceable(out, "the model file")
        out_resolved = _resolved(out)
        for given in (args.h5ad, args.counts, args.labels, args.raw_counts):
            if given is not None and _resolved(given) == out_resolved:
                raise ScaeInputError(f"{given}: is the input, and fit would overwrite it with the model; choose another --out")
        params = model_params(args)
        model = Autoencoder(**params, random_state=args.seed, device=args.device, progress=not args.quiet and main)
        model._check_params()  # settings that do not go together, before the input is read
        dataset = load_input(args)
        _same_in_every_process(
            lambda: {**params, "seed": args.seed, "top_genes": args.top_genes, "input": dataset.fingerprint()}, distributed)
        train_idx, test_idx = stratified_split(dataset.labels, 0.2, args.seed)
        if args.top_genes is not None:
            from scae.genes import highly_variable_genes

            dataset = dataset.select_genes(highly_variable_genes(dataset, args.top_genes, train_idx))
        if get_likelihood(model.loss).counts:
            source = dataset.count_source()
            if source is None:
                given = f"--loss {model.loss}" if args.loss is not None else f"--preset {args.preset} (loss {model.loss})"
                if getattr(args, "normalize", "auto") == "none":  # X is then taken as given, never as counts
                    raise ScaeInputError(
                        f"{given} models raw counts, and --normalize none takes X as given (not as counts); drop "
                        "--normalize none if X holds raw counts, or name them with --counts-layer, --counts-raw "
                        "or --raw-counts"
                    )
                raise ScaeInputError(
                    f"{given} models raw counts and {dataset.name} has none; give an .h5ad whose X or "
                    "--counts-layer holds integer counts, --counts-raw, or --raw-counts beside --counts"
                )
        else:
            source = dataset.source()
        model.fit(source.subset(train_idx), eval_X=source.subset(test_idx),
                  description=args.preset or f"ae{model.latent_dim}", distributed=distributed)
        if main:
            try:
                model.save(out)
            except OSError as err:
                raise ScaeInputError(f"{out}: cannot write the model file ({err.strerror or err})") from None
            last = model.history_[-1]
            stopped = f" (best epoch {model.best_epoch_})" if model.best_epoch_ is not None else ""
            _say_done(f"scae: trained {dataset.n_cells} cells × {dataset.n_genes} genes for {last['epoch']} epoch(s){stopped} "
                      f"at {model.train_cells_per_second_:.0f} cells/s; test loss {last['test_loss']:.5g}; model: {out}")
    finally:
        if sys.exc_info()[0] is None:  # after a failure the group may be broken: leave it unjoined
            shutdown_distributed()
    return 0


def run_embed_command(args: argparse.Namespace) -> int:
    """``scae embed INPUT --out OUT.h5ad``: fit a preset on every cell, write the AnnData with its
    latent and denoised matrix."""
    from scae.files import check_h5ad_key, check_replaceable

    check_h5ad_key("--latent-key", args.latent_key)
    if args.denoised_layer is not None:
        check_h5ad_key("--denoised-layer", args.denoised_layer)
        if args.denoised_layer == args.counts_layer:
            raise ScaeInputError(
                f"--denoised-layer {args.denoised_layer}: is the layer --counts-layer reads the raw counts from; "
                "the denoised matrix would replace them in OUT: choose another name"
            )
    if args.counts_layer is not None and args.counts_raw:
        raise ScaeInputError("give either --counts-layer or --counts-raw (where the raw counts are), not both")
    if _resolved(args.out) == _resolved(args.input):
        raise ScaeInputError(f"{args.out}: is INPUT; scae never modifies its input: choose another --out")
    if args.out.is_dir():
        raise ScaeInputError(f"{args.out}: is a directory; expected the path of the .h5ad file to write")
    check_replaceable(args.out, "the .h5ad file")
    with _no_empty_folders_left(args.out.parent):
        check_parent_writable(args.out)
        return _embed_into(args)


def _embed_into(args: argparse.Namespace) -> int:
    """:func:`run_embed_command` once its options are checked and the output's folder made."""
    from scae.data import read_anndata

    adata = read_anndata(args.input)
    from scae.anndata_embed import embed
    from scae.files import write_h5ad

    if args.top_genes is not None and args.top_genes < adata.n_vars:  # N at or above the genes: all kept
        adata = _top_genes_of(adata, args)
    from scae.likelihoods import get_likelihood
    from scae.presets import preset

    if args.counts_layer is None and not args.counts_raw and get_likelihood(preset(args.preset)["loss"]).counts:
        from scae.data import anndata_counts  # (counts that are named are read and checked by embed)

        if anndata_counts(adata, where=str(args.input)) is None:  # embed refuses it too, in its parameters' words
            raise ScaeInputError(f"{args.input}: preset '{args.preset}' models raw counts, and X does not hold them "
                                 "(non-negative whole numbers); name them with --counts-layer NAME or --counts-raw")
    started = time.perf_counter()
    overrides = {} if args.epochs is None else {"epochs": args.epochs}
    model = embed(adata, args.preset, counts_layer=args.counts_layer, counts_raw=args.counts_raw,
                  latent_key=args.latent_key, denoised_layer=args.denoised_layer, random_state=args.seed,
                  device=args.device, progress=not args.quiet, **overrides)
    try:
        write_h5ad(adata, args.out)
    except OSError as err:
        raise ScaeInputError(f"{args.out}: cannot write ({err.strerror or err})") from None
    _say_done(f"scae: {args.preset} fitted on {adata.n_obs} cells × {adata.n_vars} genes in "
              f"{time.perf_counter() - started:.1f} s ({model.history_[-1]['epoch']} epoch(s)); wrote {args.out} with "
              f"obsm['{args.latent_key}'] and layers['{args.denoised_layer}']")
    return 0


def _top_genes_of(adata, args: argparse.Namespace):
    """``adata`` restricted to its ``--top-genes`` most variable genes (seurat_v3 on the raw counts)."""
    from scae.data import anndata_counts
    from scae.genes import top_count_genes

    counts = anndata_counts(adata, args.counts_layer, args.counts_raw, str(args.input))
    if counts is None:
        raise ScaeInputError(f"{args.input}: --top-genes ranks genes by their raw counts, and X holds none; "
                             "name them with --counts-layer or --counts-raw")
    # adata.raw keeps every gene; --counts-raw then matches the kept genes to it by name (no layer
    # is added, so none of the user's layers can be overwritten)
    return adata[:, top_count_genes(counts, args.top_genes)].copy()


def check_parent_writable(path: Path) -> None:
    """Refuse an output file whose folder cannot be written, before any work."""
    from scae.files import check_writable

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        check_writable(path.parent)
    except OSError as err:
        raise ScaeInputError(f"{path.parent}: cannot write there ({err.strerror or err})") from None


BENCHMARK_OUTPUTS = ("benchmark.json", "benchmark.html", "benchmark.png")
"""What ``scae benchmark`` writes in its output folder."""


def run_benchmark_command(args: argparse.Namespace) -> int:
    """``scae benchmark``: every method on every dataset and seed; JSON and HTML in ``--out``."""
    from scae.data import read_counts_labels, read_h5ad

    if len(args.counts) != len(args.labels):
        raise ScaeInputError("--counts and --labels go in pairs: one labels file after each counts file")
    if not args.h5ad and not args.counts:
        raise ScaeInputError("give at least one dataset: --h5ad FILE --label-key KEY, or --counts FILE --labels FILE")
    if args.h5ad and not args.label_key:
        raise ScaeInputError("--label-key is required with --h5ad (the obs column of cell labels)")
    if not args.h5ad and (args.label_key or args.counts_layer is not None or args.counts_raw):
        raise ScaeInputError("--label-key, --counts-layer and --counts-raw go with --h5ad; a --counts file's "
                             "labels are its --labels file")
    from scae.benchmark import method
    from scae.files import path_text, refuse_inputs_inside

    methods = [method(name, args.device) for name in dict.fromkeys(args.methods)]  # unknown names refused first
    refuse_inputs_inside(args.out, [*args.h5ad, *args.counts, *args.labels], set(BENCHMARK_OUTPUTS), "the benchmark")
    from scae.benchmark import check_scorable

    datasets, paths = {}, {}
    for path in args.h5ad:
        name = _unique_name(path_text(path.stem), datasets)
        datasets[name] = read_h5ad(path, args.label_key, counts_layer=args.counts_layer, counts_raw=args.counts_raw)
        paths[name] = path_text(path.resolve())
    for counts, labels in zip(args.counts, args.labels):
        name = _unique_name(path_text(counts.stem), datasets)
        datasets[name] = read_counts_labels(counts, labels)
        paths[name] = f"{path_text(counts.resolve())} + {path_text(labels.resolve())}"
    for name, dataset in datasets.items():  # before any output is touched
        check_scorable(dataset, paths[name])
    from scae.parallel import resolve_device

    resolve_device(args.device)  # a device that is not here is refused before any folder is made (as by study)
    with _no_empty_folders_left(args.out):
        _benchmark_into(args, datasets, paths, methods)
    return 0


def _benchmark_into(args: argparse.Namespace, datasets: dict, paths: dict, methods: list) -> None:
    """:func:`run_benchmark_command` once its inputs are read: the output folder made and locked."""
    from scae.benchmark import run_benchmark, write_benchmark
    from scae.files import check_output_dir, lock_folder, remove_stale_parts, unlock_folder

    check_output_dir(args.out, BENCHMARK_OUTPUTS)  # after reading: a refused input leaves no folder behind
    lock = lock_folder(args.out, "benchmark")  # one writer at a time: a study or another benchmark is refused
    try:
        remove_stale_parts(args.out, BENCHMARK_OUTPUTS)
        try:  # a previous run's results must not look like this run's if it fails
            for name in BENCHMARK_OUTPUTS:
                (args.out / name).unlink(missing_ok=True)
        except OSError as err:
            raise ScaeInputError(f"{args.out}: cannot remove the previous benchmark's results ({err.strerror or err})") from None
        log = None if args.quiet else (lambda line: print(printable(f"scae: {line}"), file=sys.stderr, flush=True))
        seeds = list(range(args.seeds))
        results, skipped = run_benchmark(datasets, methods, seeds, top_genes=args.top_genes, log=log)
        try:
            write_benchmark(args.out, results, skipped, {"seeds": seeds, "top_genes": args.top_genes,
                                                         "methods": [m.name for m in methods], "device": args.device,
                                                         "datasets": {name: d.name for name, d in datasets.items()},
                                                         "paths": paths})
        except OSError as err:
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            raise ScaeInputError(f"{args.out}: cannot write the benchmark's results{where}: {err.strerror or err}") from None
    finally:
        unlock_folder(args.out, lock)
    _say_done(f"scae: benchmark of {len(methods)} method(s) on {len(datasets)} dataset(s), {len(seeds)} seed(s); "
              f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.html'}")


def _unique_name(stem: str, taken: dict) -> str:
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name


SIMULATE_OUTPUTS = ("counts.npy", "raw_counts.npy", "labels.txt")
"""What ``scae simulate`` writes in its output folder."""


def run_simulate_command(args: argparse.Namespace) -> int:
    with _no_empty_folders_left(args.out):
        return _simulate_into(args)


def _simulate_into(args: argparse.Namespace) -> int:
    from scae.files import atomic_paths, check_output_dir, lock_folder, remove_stale_parts, unlock_folder
    from scae.simulate import simulate_dataset

    check_output_dir(args.out, SIMULATE_OUTPUTS)
    lock = lock_folder(args.out, "simulate")  # one writer at a time (refused before any work): never a mix
    try:  # the three files replace the old ones together (an interrupt leaves one set or the other)
        remove_stale_parts(args.out, SIMULATE_OUTPUTS)
        import numpy as np

        dataset = simulate_dataset(args.cells, args.genes, args.populations, args.seed)
        with atomic_paths([args.out / name for name in SIMULATE_OUTPUTS]) as temps:
            for tmp, matrix in zip(temps, (dataset.X, dataset.raw)):
                dense = matrix.toarray() if hasattr(matrix, "toarray") else matrix
                buffer = io.BytesIO()
                np.save(buffer, dense.astype(np.float32), allow_pickle=False)
                tmp.write_bytes(buffer.getvalue())
                del dense, buffer
            temps[2].write_text("\n".join(dataset.labels) + "\n", encoding="utf-8")
    except OSError as err:
        raise ScaeInputError(f"{args.out}: cannot write the output directory ({err.strerror or err})") from None
    finally:
        unlock_folder(args.out, lock)
    _say_done(f"scae: wrote {args.out / 'counts.npy'} (log-normalized, {dataset.n_cells} × {dataset.n_genes}), "
              f"{args.out / 'raw_counts.npy'} (its raw counts) and {args.out / 'labels.txt'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scae`` command; returns the exit status.

    SIGINT, SIGTERM, SIGHUP (and the other signals of ``interrupts.HANDLED_SIGNALS``) stop the command (worker processes included) with one line on stderr and
    exit status 130, 143 or 129 (a signal the process was started ignoring, as under ``nohup``,
    stays ignored). Called with ``argv`` (tests, scripts), the previous signal handlers
    are restored on return; as the process's own command line, a signal that comes once its
    work is done ends the process at once with the command's status (it cannot break the
    interpreter's exit with a traceback, nor wait on it). In the last tenth of a second or so,
    once Python has put its default signal handling back while finalising, such a signal (or a
    second one after an interrupt) ends the process as signals do: status 130, 143 or 129, no message.
    """
    args = build_parser().parse_args(argv)
    problem = _address_space_problem() if args.command != "simulate" else None  # simulate never loads PyTorch
    if problem is not None:
        print(f"scae: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    with signals_raise_interrupted(restore=argv is not None):
        try:
            status = _run_command(args)
        except (Interrupted, KeyboardInterrupt) as stop:
            kill_child_processes()  # any worker its owner had no chance to stop
            if not isinstance(stop, Interrupted):
                stop = Interrupted(signal.SIGINT)
            unwritten = _NOT_WRITTEN_WHEN_INTERRUPTED.get(args.command, "")
            if stop.outputs_written:
                unwritten = "; it came as the outputs were moved into place, and all of them were"
            print(f"scae: interrupted ({stop.signal_name}){unwritten}", file=sys.stderr)
            status = stop.exit_status
        if argv is None:  # the process's own command line: it exits next
            from scae.files import hdf5_write_failed

            background = sys.modules.get("scae.background")  # not imported for an input error
            worker_died = background is not None and background.worker_died()

            for signum in watched_signals():  # done: a late signal ends the exit at once
                signal.signal(signum, lambda *_: _leave_now(status))

            # a torchrun rank, HDF5 after a failed write, or a pool whose worker died may crash or
            # hang in the interpreter's shutdown
            if _maybe_in_process_group() or hdf5_write_failed() or worker_died:
                _leave_now(status)
            gc.freeze()  # skips the collections of interpreter shutdown (1.2 s with torch loaded)
        return status


def printable(text: str) -> str:
    """``text`` on one line: control characters (a line break in a file name, an escape code) written as
    escapes (``\\n``, ``\\x1b``), so that a message stays one line and cannot move the terminal's cursor."""
    try:  # the bytes of a file name that is not UTF-8 (surrogate escapes) as \xNN, as in the outputs
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # another lone surrogate
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) == "Cc" else ch for ch in text)


def _os_error_line(err: OSError) -> str:
    """``path: reason`` of an operating-system error, a very long path shortened in the middle."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.filename is None:
        return reason
    names = [os.fsdecode(n) if isinstance(n, bytes) else str(n) for n in (err.filename, err.filename2) if n is not None]
    names = [f"{n[:60]}…{n[-40:]}" if len(n) > 120 else n for n in names]
    return f"{' → '.join(names)}: {reason}"


def _say_done(message: str) -> None:
    """A command's last line, on standard output. Its work is done and written, so an output that
    cannot take the line (a closed pipe, a full disk) loses only the line: the status stays 0, and
    the output is pointed at the null device so that Python's exit does not fail on it again."""
    try:
        print(printable(message), flush=True)
    except OSError:
        from scae.__main__ import point_at_null_device

        with contextlib.suppress(OSError, ValueError):
            point_at_null_device(sys.stdout)


_NOT_WRITTEN_WHEN_INTERRUPTED = {
    "study": "; no report.html or metrics.json was written for this run",
    "fit": "; no model file was written",
    "embed": "; no output file was written",
    "benchmark": "; no benchmark.json or benchmark.html was written for this run",
}


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; problems the user can fix become one line and exit status 2."""
    with warnings.catch_warnings():
        # repeated cell or gene names are the user's to keep: anndata's warning for every
        # AnnData made from them (input, results.h5ad, embed's output) would repeat itself
        warnings.filterwarnings("ignore", message=r"(Observation|Variable) names are not unique", category=UserWarning)
        return _run_command_checked(args)


def _run_command_checked(args: argparse.Namespace) -> int:
    try:
        if args.command != "simulate":
            _check_torch_logs()
        if args.command == "study":
            return run_study_command(args)
        if args.command == "fit":
            return run_fit_command(args)
        if args.command == "embed":
            return run_embed_command(args)
        if args.command == "benchmark":
            return run_benchmark_command(args)
        return run_simulate_command(args)
    except ScaeInputError as err:
        print(f"scae: error: {printable(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a path the system refuses (a name too long, an I/O error, …): one line
        print(f"scae: error: {printable(_os_error_line(err))}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as err:  # a library that cannot load: not installed, or no room to map it
        print(f"scae: error: {printable(_import_error_line(err))}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print(f"scae: error: {_out_of_memory_line()}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:
        if _out_of_memory(err):  # PyTorch's allocators say it with a RuntimeError
            print(f"scae: error: {_out_of_memory_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        if not _maybe_in_process_group():
            raise
        # a collective failed: another process of the torchrun group died or stopped
        rank = os.environ.get("RANK", "?")
        print(f"scae: error: process {rank}: the torchrun group broke off (another process failed or was "
              f"stopped; see its message); stopping. ({first_line(err)[:200]})", file=sys.stderr)
        return EXIT_USAGE


MIN_ADDRESS_SPACE = 1280 * 2**20
"""Least address space (``ulimit -v``) scae runs under. Below it PyTorch and SciPy's libraries
could not all be mapped, and some failed natively while loading (``std::bad_alloc``, a process
aborted) instead of raising an error: measured on the CPU build, 0.6–1.2 GiB."""


def _check_torch_logs() -> None:
    """Refuse, in one line, a ``TORCH_LOGS`` that PyTorch refuses as it loads (a ``ValueError``
    listing the logs it knows, which came as a traceback); only when the variable is set, since
    this loads PyTorch before the input is read."""
    setting = os.environ.get("TORCH_LOGS")
    if not setting:
        return
    try:
        import torch  # noqa: F401 (to see whether it accepts TORCH_LOGS)
    except ValueError as err:
        first = first_line(err)
        if "log settings" not in first:
            raise
        raise ScaeInputError(f"PyTorch cannot load with TORCH_LOGS={setting!r} ({first.split(', must be')[0][:200]}); "
                             "unset it or fix it") from None


def _address_space_problem() -> str | None:
    """Why the process's address-space limit is too small to run in, or ``None``."""
    from scae.__main__ import address_space_limit

    limit = address_space_limit()
    if limit is None or limit >= MIN_ADDRESS_SPACE:
        return None
    return (f"{_limit_text()}; scae needs at least {MIN_ADDRESS_SPACE / 2**20:,.0f} MiB to load PyTorch and its "
            "libraries: raise the limit")


def _limit_text() -> str:
    """The process's address-space limit in words, or ``""`` when it has none."""
    from scae.__main__ import address_space_limit

    limit = address_space_limit()
    return "" if limit is None else f"the process's address space is limited to {limit / 2**20:,.0f} MiB (ulimit -v)"


def _import_error_line(err: ImportError) -> str:
    """One line for a library that failed to load, with the likely remedy."""
    first = first_line(err)[:300]
    limit = _limit_text()
    no_room = any(sign in str(err).lower() for sign in ("failed to map segment", "cannot allocate memory"))
    remedy = (f"{limit}, too little to load it: raise the limit" if limit and no_room
              else "reinstall scae and its dependencies (see the README's set-up)")
    return f"cannot load {err.name or 'a library scae needs'} ({first}); {remedy}"


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is an allocator that ran out of memory (PyTorch's CPU or GPU one)."""
    text = str(err)
    return type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text.lower()


def _out_of_memory_line(err: BaseException | None = None) -> str:
    """One line for a run that ran out of memory, with what would make it fit."""
    limit = _limit_text()
    where = f" ({limit})" if limit else ""
    device = " on the GPU" if err is not None and "CUDA" in str(err) else ""
    return (f"out of memory{device}{where}: the input or the network does not fit; try --stream for a large "
            "input, fewer genes (--top-genes), a smaller --hidden or --batch-size, or a machine with more memory")


def _leave_now(status: int) -> NoReturn:
    """End the process at once with ``status``, streams flushed, skipping interpreter shutdown.

    For a process whose command is done (outputs written and closed) where that shutdown could
    crash or hang: a torchrun rank (gloo's threads may still reference the objects it destroys,
    and a rank then aborted now and then, "terminate called without an active exception";
    pytorch/pytorch#179291), HDF5 after a failed write, a pool whose worker died (its threads
    may be stuck), or a late signal.
    """
    helpers = sys.modules.get("multiprocessing.util")
    if helpers is not None:  # what exiting would do for the background pool's semaphores (unlinked, not
        try:  # left to the resource tracker, which then warned of "leaked semaphore objects")
            helpers._run_finalizers(0)
        except Exception:  # noqa: BLE001 (leaving anyway)
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _maybe_in_process_group() -> bool:
    """:func:`~scae.params.launched_by_torchrun` where an error is already being reported: a
    malformed variable counts as no."""
    try:
        return rules.launched_by_torchrun()
    except ScaeInputError:
        return False


if __name__ == "__main__":
    sys.exit(main())
