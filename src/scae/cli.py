"""Command line: ``scae study`` runs the autoencoder study, ``scae simulate`` writes the built-in data.

Problems with the input or the output directory are reported as one line on stderr with exit
status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import numpy as np

from scae import __version__
from scae import params as rules
from scae.errors import ScaeInputError
from scae.interrupts import Interrupted, kill_child_processes, signals_raise_interrupted

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``scae: error: …``, exit 2), no usage block.

    Subparsers inherit the class (``add_subparsers`` uses the parser's own type). Options whose
    ranges depend on each other (the network's size) are checked after parsing.
    """

    def error(self, message: str, prog: str | None = None) -> NoReturn:
        message = " ".join(message.split())  # one line, whatever the value held
        self.exit(EXIT_USAGE, f"scae: error: {message} (see '{prog or self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        hidden = getattr(parsed, "hidden", None)
        if hidden is not None:  # the part of the network's size that does not depend on the genes
            problem = rules.network_too_large(getattr(parsed, "latent", STUDY_MAX_LATENT), tuple(hidden))
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
    study.add_argument("--out", type=Path, required=True, help="output directory")
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
    fit.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    fit.add_argument("--latent", type=_option(rules.WIDTH), default=10,
                     help=f"latent size, 1 to {rules.MAX_WIDTH} (default 10)")
    fit.add_argument("--loss", choices=rules.LOSSES, default="mse", help="training loss (default mse)")
    _add_training_arguments(fit)
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    simulate = sub.add_parser("simulate", help="write the built-in dataset as counts.npy (log-normalized) + "
                              "raw_counts.npy + labels.txt")
    simulate.add_argument("--out", type=Path, required=True, help="output directory")
    simulate.add_argument("--cells", type=_option(SIMULATE_CELLS), default=5000)
    simulate.add_argument("--genes", type=_option(SIMULATE_GENES), default=1000)
    simulate.add_argument("--populations", type=_option(SIMULATE_POPULATIONS), default=3)
    simulate.add_argument("--seed", type=_option(rules.SEED), default=0)
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
    source.add_argument("--top-genes", type=_option(rules.AT_LEAST_ONE), metavar="N",
                        help="keep the N most highly variable genes, measured on the training cells "
                             "(seurat_v3 on raw counts, else seurat); N at most the number of genes")
    source.add_argument("--normalize", choices=["auto", "log1p", "none"], default="auto",
                        help="raw counts: auto (default) treats a matrix of non-negative integers as raw counts, "
                             "which the models see as log1p(counts / library size × 1e4), computed per batch; "
                             "log1p: always; none: never")
    source.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="stream the matrix from disk instead of loading it (a CSR .h5ad, or a memory-mapped "
                             ".npy); default: stream when its dense float32 form exceeds 1 GiB")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=_option(rules.EPOCHS), default=50,
                        help=f"training epochs, 1 to {rules.MAX_EPOCHS} (default 50)")
    seed = rules.study_seed()
    parser.add_argument("--seed", type=_option(seed), default=0,
                        help=f"seed of every random choice, {seed.low} to {seed.high} (default 0)")
    parser.add_argument("--hidden", type=_option(rules.WIDTH), nargs="+", default=[100], metavar="WIDTH",
                        help=f"hidden layer widths, input side first, each 1 to {rules.MAX_WIDTH} (default 100)")
    parser.add_argument("--activation", default="relu", choices=rules.ACTIVATIONS,
                        help="activation of the hidden layers (default relu)")
    parser.add_argument("--batch-size", type=_option(rules.BATCH_SIZE), default=128,
                        help=f"minibatch size, over all processes together, 1 to {rules.MAX_BATCH_SIZE} (default 128)")
    parser.add_argument("--learning-rate", type=_option(rules.LEARNING_RATE), default=1e-3,
                        help=f"Adam learning rate, > 0 and <= {rules.MAX_LEARNING_RATE:g} (default 1e-3)")
    parser.add_argument("--device", choices=rules.DEVICES, default="auto",
                        help="where models train and predict (default auto: a GPU when there is one)")


SIMULATE_CELLS = rules.Integer(1, 10_000_000)
SIMULATE_GENES = rules.Integer(10, 100_000)
SIMULATE_POPULATIONS = rules.Integer(2, 1000)
SIMULATE_MAX_ENTRIES = 1_000_000_000
"""``scae simulate`` writes a dense float32 matrix: at most 4 GB."""


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
    from scae.simulate import simulate_dataset

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
    return simulate_dataset()


def check_top_genes(top_genes: int | None, n_genes: int) -> None:
    """Refuse ``--top-genes N`` above the number of genes of the input (known once it is read)."""
    if top_genes is not None and top_genes > n_genes:
        raise ScaeInputError(
            f"--top-genes {top_genes}: the input has {n_genes} genes; expected at most {n_genes}"
        )


def run_study_command(args: argparse.Namespace) -> int:
    from scae.files import check_output_dir, refuse_inputs_inside

    refuse_inputs_inside(args.out, [args.h5ad, args.counts, args.labels, args.raw_counts])  # before anything is removed
    check_output_dir(args.out)  # fail fast (every process), before loading or training
    distributed = None
    if _in_process_group():  # join the group first, so that no process is left waiting for one that stopped
        distributed = _join_process_group(args.device)
    try:
        main = distributed is None or distributed.is_main
        started = time.perf_counter()
        dataset = load_input(args)  # input errors come before the heavy imports below
        load_seconds = time.perf_counter() - started
        from scae.parallel import resolve_device
        from scae.params import check_parameter_count
        from scae.study import StudyConfig, available_cores, run_study

        check_parameter_count(dataset.n_genes, STUDY_MAX_LATENT, tuple(args.hidden))
        device = resolve_device(args.device)  # fail fast on a device that is not there
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
        if distributed is not None and sys.exc_info()[0] is None:  # after a failure the group may be broken
            from scae.parallel import shutdown_distributed

            shutdown_distributed()
    return 0


def _join_process_group(device_name: str):
    """Under torchrun: the device of this process and its place in the group."""
    from scae.parallel import init_distributed, resolve_device

    return init_distributed(resolve_device(device_name))


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
        for given in (args.h5ad, args.counts, args.labels, args.raw_counts):
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


def run_simulate_command(args: argparse.Namespace) -> int:
    from scae.files import atomic_path, write_text
    from scae.simulate import simulate_dataset

    dataset = simulate_dataset(args.cells, args.genes, args.populations, args.seed)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, matrix in (("counts.npy", dataset.X), ("raw_counts.npy", dataset.raw)):
            dense = matrix.toarray() if hasattr(matrix, "toarray") else matrix
            with atomic_path(args.out / name) as tmp:
                buffer = io.BytesIO()
                np.save(buffer, dense.astype(np.float32), allow_pickle=False)
                tmp.write_bytes(buffer.getvalue())
            del dense, buffer
        write_text(args.out / "labels.txt", "\n".join(dataset.labels) + "\n")
    except OSError as err:
        raise ScaeInputError(f"{args.out}: cannot write the output directory ({err.strerror or err})") from None
    print(f"scae: wrote {args.out / 'counts.npy'} (log-normalized, {dataset.n_cells} × {dataset.n_genes}), "
          f"{args.out / 'raw_counts.npy'} (its raw counts) and {args.out / 'labels.txt'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scae`` command; returns the exit status.

    SIGINT and SIGTERM stop the command (worker processes included) with one line on stderr and
    exit status 130 or 143; the previous signal handlers are restored on return.
    """
    args = build_parser().parse_args(argv)
    with signals_raise_interrupted():
        try:
            return _run_command(args)
        except (Interrupted, KeyboardInterrupt) as stop:
            kill_child_processes()  # any worker its owner had no chance to stop
            if not isinstance(stop, Interrupted):
                stop = Interrupted(signal.SIGINT)
            unwritten = _NOT_WRITTEN_WHEN_INTERRUPTED.get(args.command, "")
            print(f"scae: interrupted ({stop.signal_name}){unwritten}", file=sys.stderr)
            if argv is None:  # the process's own command line: it exits next
                gc.freeze()  # skips the collections of interpreter shutdown (about 1.5 s with torch loaded)
            return stop.exit_status


_NOT_WRITTEN_WHEN_INTERRUPTED = {
    "study": "; no report.html or metrics.json was written for this run",
    "fit": "; no model file was written",
}


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; problems the user can fix become one line and exit status 2."""
    try:
        if args.command == "study":
            return run_study_command(args)
        if args.command == "fit":
            return run_fit_command(args)
        return run_simulate_command(args)
    except ScaeInputError as err:
        print(f"scae: error: {err}", file=sys.stderr)
        return EXIT_USAGE
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
