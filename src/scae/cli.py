"""Command line: ``scae study`` runs the autoencoder study, ``scae simulate`` writes the built-in data.

Problems with the input or the output directory are reported as one line on stderr with exit
status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

from scae import __version__
from scae.errors import ScaeInputError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    study.add_argument("--out", type=Path, required=True, help="output directory")
    _add_training_arguments(study)
    study.add_argument("--max-embed-cells", type=_positive_int, default=20_000,
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
    fit.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    fit.add_argument("--latent", type=_positive_int, default=10, help="latent size (default 10)")
    fit.add_argument("--loss", choices=["mse", "nonzero_mse"], default="mse", help="training loss (default mse)")
    _add_training_arguments(fit)
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    simulate = sub.add_parser("simulate", help="write the built-in dataset as counts.npy + labels.txt")
    simulate.add_argument("--out", type=Path, required=True, help="output directory")
    simulate.add_argument("--cells", type=_positive_int, default=5000)
    simulate.add_argument("--genes", type=_positive_int, default=1000)
    simulate.add_argument("--populations", type=_positive_int, default=3)
    simulate.add_argument("--seed", type=int, default=0)
    return parser


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("input (choose one; none = built-in simulated dataset)")
    source.add_argument("--counts", type=Path, help="cells × genes matrix, .npy (log-normalized or raw counts)")
    source.add_argument("--labels", type=Path, help="labels.txt, one label per line (with --counts)")
    source.add_argument("--h5ad", type=Path, help="AnnData file")
    source.add_argument("--label-key", help="obs column with the cell labels (with --h5ad)")
    source.add_argument("--layer", help="use this layer instead of X (with --h5ad)")
    source.add_argument("--normalize", choices=["auto", "log1p", "none"], default="auto",
                        help="raw counts: auto (default) treats a matrix of non-negative integers as raw counts, "
                             "which the models see as log1p(counts / library size × 1e4), computed per batch; "
                             "log1p: always; none: never")
    source.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="stream the matrix from disk instead of loading it (a CSR .h5ad, or a memory-mapped "
                             ".npy); default: stream when its dense float32 form exceeds 1 GiB")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=_positive_int, default=50, help="training epochs (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--hidden", type=_positive_int, nargs="+", default=[100], metavar="WIDTH",
                        help="hidden layer widths, input side first (default 100)")
    parser.add_argument("--activation", default="relu",
                        choices=["relu", "elu", "gelu", "tanh", "sigmoid", "leaky_relu"],
                        help="activation of the hidden layers (default relu)")
    parser.add_argument("--batch-size", type=_positive_int, default=128,
                        help="minibatch size, over all processes together (default 128)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="where models train and predict (default auto: a GPU when there is one)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def load_input(args: argparse.Namespace):
    """The dataset the study arguments name (the built-in one when none is given)."""
    from scae.data import read_counts_labels, read_h5ad
    from scae.simulate import simulate_dataset

    if args.h5ad is not None and (args.counts is not None or args.labels is not None):
        raise ScaeInputError("give either --h5ad or --counts with --labels, not both")
    if args.h5ad is not None:
        if not args.label_key:
            raise ScaeInputError(f"{args.h5ad}: --label-key is required with --h5ad (the obs column of cell labels)")
        return read_h5ad(args.h5ad, args.label_key, args.layer, normalize=args.normalize, stream=args.stream)
    if args.label_key or args.layer:
        raise ScaeInputError("--label-key and --layer go with --h5ad")
    if (args.counts is None) != (args.labels is None):
        raise ScaeInputError("--counts and --labels go together: the matrix and its one-label-per-line file")
    if args.counts is not None:
        return read_counts_labels(args.counts, args.labels, normalize=args.normalize, stream=args.stream)
    if args.stream:
        raise ScaeInputError("--stream reads a file from disk (--h5ad, or --counts with --labels); the built-in dataset is made in memory")
    return simulate_dataset()


def run_study_command(args: argparse.Namespace) -> int:
    from scae.parallel import init_distributed, resolve_device, shutdown_distributed
    from scae.study import StudyConfig, available_cores, prepare_output_dir, run_study

    device = resolve_device(args.device)  # fail fast on a device that is not there
    distributed = init_distributed(device)
    try:
        main = distributed is None or distributed.is_main
        prepare_output_dir(args.out, remove_stale=False)  # fail fast (every process), before loading or training
        started = time.perf_counter()
        dataset = load_input(args)
        _refuse_overwriting_input(args)
        load_seconds = time.perf_counter() - started
        if not args.quiet and main:
            mode = "streamed from disk" if dataset.on_disk else "in memory"
            counts = "; raw counts, models see log1p(counts / library size × 1e4)" if dataset.counts else ""
            procs = f"; {distributed.world_size} processes" if distributed else ""
            print(f"scae: {dataset.name}: {dataset.n_cells} cells × {dataset.n_genes} genes, "
                  f"{len(dataset.classes)} labels ({mode}{counts}); device {device}{procs}", file=sys.stderr)
        config = StudyConfig(
            epochs=args.epochs,
            seed=args.seed,
            hidden=tuple(args.hidden),
            activation=args.activation,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_embed_cells=args.max_embed_cells,
            progress=not args.quiet,
            tsne_workers=available_cores(),
            device=args.device,
            resume=args.resume,
        )
        run_study(dataset, args.out, config, data_seconds=load_seconds, distributed=distributed)
        if main:
            print(f"scae: study finished in {time.perf_counter() - started:.1f} s; report: {args.out / 'report.html'}")
    finally:
        if sys.exc_info()[0] is None:  # after a failure the group may be broken: leave it unjoined
            shutdown_distributed()
    return 0


def run_fit_command(args: argparse.Namespace) -> int:
    from scae.data import stratified_split
    from scae.files import check_writable
    from scae.models import Autoencoder
    from scae.parallel import init_distributed, resolve_device, shutdown_distributed

    device = resolve_device(args.device)
    distributed = init_distributed(device)
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
        for given in (args.h5ad, args.counts, args.labels):
            if given is not None and given.resolve() == out.resolve():
                raise ScaeInputError(f"{given}: is the input, and fit would overwrite it with the model; choose another --out")
        dataset = load_input(args)
        train_idx, test_idx = stratified_split(dataset.labels, 0.2, args.seed)
        source = dataset.source()
        model = Autoencoder(
            latent_dim=args.latent, hidden=tuple(args.hidden), activation=args.activation, loss=args.loss,
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
            random_state=args.seed, device=args.device, progress=not args.quiet and main,
        ).fit(source.subset(train_idx), eval_X=source.subset(test_idx), description=f"ae{args.latent}",
              distributed=distributed)
        if main:
            model.save(out)
            last = model.history_[-1]
            print(f"scae: trained {dataset.n_cells} cells × {dataset.n_genes} genes for {args.epochs} epoch(s) "
                  f"at {model.train_cells_per_second_:.0f} cells/s; test loss {last['test_loss']:.5g}; model: {out}")
    finally:
        if sys.exc_info()[0] is None:  # after a failure the group may be broken: leave it unjoined
            shutdown_distributed()
    return 0


def _refuse_overwriting_input(args: argparse.Namespace) -> None:
    """The study writes results.h5ad; it must never replace the file it reads."""
    written = (args.out / "results.h5ad").resolve()
    for given in (args.h5ad, args.counts, args.labels):
        if given is not None and given.resolve() == written:
            raise ScaeInputError(
                f"{given}: is the input, and the study would overwrite it with its results.h5ad; "
                "choose another --out directory"
            )


def run_simulate_command(args: argparse.Namespace) -> int:
    from scae.files import atomic_path, write_text
    from scae.simulate import simulate_dataset

    dataset = simulate_dataset(args.cells, args.genes, args.populations, args.seed)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        X = dataset.X.toarray() if hasattr(dataset.X, "toarray") else dataset.X
        with atomic_path(args.out / "counts.npy") as tmp:
            buffer = io.BytesIO()
            np.save(buffer, X.astype(np.float32), allow_pickle=False)
            tmp.write_bytes(buffer.getvalue())
        write_text(args.out / "labels.txt", "\n".join(dataset.labels) + "\n")
    except OSError as err:
        raise ScaeInputError(f"{args.out}: cannot write the output directory ({err.strerror or err})") from None
    print(f"scae: wrote {args.out / 'counts.npy'} ({dataset.n_cells} × {dataset.n_genes}) and {args.out / 'labels.txt'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scae`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "study":
            return run_study_command(args)
        if args.command == "fit":
            return run_fit_command(args)
        return run_simulate_command(args)
    except ScaeInputError as err:
        print(f"scae: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("scae: interrupted; no report.html or metrics.json was written for this run", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if not _in_process_group():
            raise
        # a collective failed: another process of the torchrun group died or stopped
        rank = os.environ.get("RANK", "?")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"scae: error: process {rank}: the torchrun group broke off (another process failed or was "
              f"stopped; see its message); stopping. ({first[:200]})", file=sys.stderr)
        return EXIT_USAGE


def _in_process_group() -> bool:
    """Whether this process was started by torchrun in a group of several (without importing torch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


if __name__ == "__main__":
    sys.exit(main())
