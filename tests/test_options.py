"""Options checked at the boundary: the command line, ``Autoencoder`` parameters and ``StudyConfig``."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scae import cli, params
from scae.cli import main
from scae.errors import ScaeInputError
from scae.likelihoods import LIKELIHOODS
from scae.models import ACTIVATIONS, NORMS, Autoencoder
from scae.parallel import DEVICES
from scae.results import DEFAULT_RUNS, RunSpec, StudyConfig
from scae.training import LR_SCHEDULES

STUDY_SEED_MAX = 2**32 - 1 - (params.DEFAULT_KMEANS_SEEDS - 1)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``scae argv`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize(
    "option,value,expected",
    [
        ("--learning-rate", "-1", "a finite number > 0 and <= 10"),
        ("--learning-rate", "0", "a finite number > 0 and <= 10"),
        ("--learning-rate", "nan", "a finite number > 0 and <= 10"),
        ("--learning-rate", "inf", "a finite number > 0 and <= 10"),
        ("--learning-rate", "1e30", "a finite number > 0 and <= 10"),
        ("--learning-rate", "fast", "a finite number > 0 and <= 10"),
        ("--seed", "-5", f"an integer in [0, {STUDY_SEED_MAX}]"),
        ("--seed", "1099511627776", f"an integer in [0, {STUDY_SEED_MAX}]"),
        ("--seed", "1.5", f"an integer in [0, {STUDY_SEED_MAX}]"),
        ("--epochs", "0", "an integer in [1, 1000000]"),
        ("--epochs", "ten", "an integer in [1, 1000000]"),
        ("--epochs", "1e3", "an integer in [1, 1000000]"),
        ("--batch-size", "0", "an integer in [1, 10000000]"),
        ("--hidden", "0", "an integer in [1, 100000]"),
        ("--hidden", "100000000000", "an integer in [1, 100000]"),
        ("--max-embed-cells", "0", "an integer >= 1"),
        ("--max-embed-cells", "-20", "an integer >= 1"),
        ("--epochs", "1_0", "an integer in [1, 1000000]"),  # Python's int() takes these three
        ("--epochs", "\u0661\u0660", "an integer in [1, 1000000]"),  # Arabic-Indic 10
        ("--epochs", "\uff11", "an integer in [1, 1000000]"),  # full-width 1
        ("--learning-rate", "1_0e-3", "a finite number > 0 and <= 10"),
    ],
)
def test_study_option_out_of_range_is_one_line(tmp_path, capsys, option, value, expected):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["study", "--out", str(out), option, value], capsys)
    assert code == 2
    assert stdout == ""
    assert stderr == f"scae: error: argument {option}: expected {expected}, got {value} (see 'scae study --help')\n"
    assert not out.exists()


def test_value_with_whitespace_is_quoted_and_stays_on_one_line(tmp_path, capsys):
    code, _, stderr = run_cli(["study", "--out", str(tmp_path / "o"), "--epochs", "1\n0"], capsys)
    assert code == 2
    assert stderr == "scae: error: argument --epochs: expected an integer in [1, 1000000], got '1\\n0' (see 'scae study --help')\n"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["fit", "--latent", "0"], "argument --latent: expected an integer in [1, 100000], got 0"),
        (["fit", "--loss", "mae"], "argument --loss: invalid choice: 'mae'"),
        (["fit", "--seed", "-1"], f"argument --seed: expected an integer in [0, {STUDY_SEED_MAX}], got -1"),
        (["simulate", "--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], got -1"),
        (["simulate", "--cells", "0"], "argument --cells: expected an integer in [1, 10000000], got 0"),
        (["simulate", "--genes", "5"], "argument --genes: expected an integer in [10, 100000], got 5"),
        (["simulate", "--populations", "1"], "argument --populations: expected an integer in [2, 1000], got 1"),
        (["simulate", "--cells", "10000000", "--genes", "1000"],
         "argument --cells: 10000000 cells × 1000 genes is more than 1,000,000,000 entries"),
        (["study", "--activation", "swish"], "argument --activation: invalid choice: 'swish'"),
        (["study", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["study", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["study", "--hidden"], "argument --hidden: expected at least one argument"),
        (["study"], "the following arguments are required: --out"),
    ],
)
def test_usage_errors_are_one_line_without_usage_block(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    if argv != ["study"]:  # that case is about the missing --out
        argv = [*argv[:1], "--out", str(out), *argv[1:]]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 2
    assert stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("scae: error: ")
    assert needle in stderr
    assert "usage:" not in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_an_unknown_option_points_at_the_commands_own_help(tmp_path, capsys):
    code, _, stderr = run_cli(["fit", "--out", str(tmp_path / "m.pt"), "--no-such-option"], capsys)
    assert code == 2
    assert stderr == "scae: error: unrecognized arguments: --no-such-option (see 'scae fit --help')\n"


def test_an_unknown_option_before_the_command_points_at_scaes_own_help(tmp_path, capsys):
    code, _, stderr = run_cli(["--no-such-option", "fit", "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 2
    assert stderr == "scae: error: unrecognized arguments: --no-such-option (see 'scae --help')\n"
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("argv", [["study", "--epoch", "3"], ["fit", "--late", "3"], ["simulate", "--cell", "300"]])
def test_abbreviated_options_are_refused(tmp_path, capsys, argv):
    """'--epoch' is not taken for '--epochs': an option added later could make it mean another."""
    out = tmp_path / "out"
    code, _, stderr = run_cli([*argv[:1], "--out", str(out), *argv[1:]], capsys)
    assert code == 2
    assert stderr == f"scae: error: unrecognized arguments: {' '.join(argv[1:])} (see 'scae {argv[0]} --help')\n"
    assert not out.exists()


def test_control_characters_of_a_file_name_stay_escaped_on_the_error_line(tmp_path, capsys):
    """A line break in a path would split the error line; an escape code would move the terminal's cursor."""
    counts = tmp_path / "mi\nssing\x1b[2J.npy"
    (tmp_path / "l.txt").write_text("a\nb\n")
    code, stdout, stderr = run_cli(["study", "--counts", str(counts), "--labels", str(tmp_path / "l.txt"),
                                    "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and stdout == ""
    assert stderr == f"scae: error: {tmp_path}/mi\\nssing\\x1b[2J.npy: counts file not found\n"


def test_no_command_is_one_line(capsys):
    code, _, stderr = run_cli([], capsys)
    assert code == 2
    assert stderr == "scae: error: the following arguments are required: command (see 'scae --help')\n"


def test_network_too_large_refused_before_anything(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run_cli(["study", "--out", str(out), "--hidden", "100000", "100000"], capsys)
    assert code == 2
    assert stderr == (
        "scae: error: argument --hidden: widths 100000 100000 with latent size 50 give the network "
        "20,010,400,050 parameters before any gene is counted; at most 1,000,000,000 are allowed: "
        "choose smaller widths (see 'scae study --help')\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("argv", [["study", "--help"], ["fit", "--help"], ["--help"]])
def test_help_still_works(capsys, argv):
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0
    assert stdout.startswith("usage: scae") and stderr == ""


def test_help_states_the_ranges(capsys):
    _, stdout, _ = run_cli(["study", "--help"], capsys)
    text = " ".join(stdout.split())
    assert "training epochs, 1 to 1000000" in text
    assert f"seed of every random choice, 0 to {STUDY_SEED_MAX}" in text
    assert "Adam learning rate, > 0 and <= 10" in text


def stub_study(received: list):
    """Stands in for ``run_study_command``: builds the StudyConfig the real one would, trains nothing."""

    def run(args) -> int:
        received.append(StudyConfig(
            epochs=args.epochs, seed=args.seed, hidden=tuple(args.hidden), activation=args.activation,
            batch_size=args.batch_size, learning_rate=args.learning_rate, max_embed_cells=args.max_embed_cells,
            progress=not args.quiet, device=args.device, resume=args.resume,
        ))
        return 0

    return run


@pytest.mark.parametrize(
    "extra",
    [
        ["--learning-rate", "10", "--seed", str(STUDY_SEED_MAX)],
        ["--epochs", "1", "--batch-size", "1", "--hidden", "1", "--max-embed-cells", "1"],
        ["--hidden", "256", "64", "--learning-rate", "1e-5", "--seed", "0"],
    ],
)
def test_values_at_the_bounds_are_accepted(tmp_path, capsys, extra):
    received: list = []
    with mock.patch.object(cli, "run_study_command", stub_study(received)):
        code, _, stderr = run_cli(["study", "--out", str(tmp_path / "out"), "--quiet", *extra], capsys)
    assert code == 0, stderr
    assert len(received) == 1


def test_seed_at_the_bound_works_in_the_study_scorer():
    """The largest accepted seed is still valid for every k-means repeat (seed … seed + 4)."""
    from sklearn.utils import check_random_state

    check_random_state(STUDY_SEED_MAX + params.DEFAULT_KMEANS_SEEDS - 1)
    with pytest.raises(ValueError):
        check_random_state(STUDY_SEED_MAX + params.DEFAULT_KMEANS_SEEDS)


VALUED_OPTIONS = [
    "--counts", "--labels", "--h5ad", "--label-key", "--layer", "--normalize", "--out", "--epochs", "--seed",
    "--hidden", "--activation", "--batch-size", "--learning-rate", "--device", "--max-embed-cells",
]
FLAGS = ["--stream", "--no-stream", "--resume", "--quiet"]
values = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(1, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e30", "1e-3", "0", "1", "", " ", "relu", "tanh", "cpu", "auto",
                     "none", "log1p"]),
    st.text(max_size=12),
)
pair = st.tuples(st.sampled_from(VALUED_OPTIONS), values).map(list)  # an option with a value
items = st.one_of(pair, pair, pair, st.sampled_from(FLAGS).map(lambda flag: [flag]), values.map(lambda v: [v]))
argv_lists = st.tuples(st.booleans(), st.lists(items, max_size=6)).map(
    lambda drawn: (["--out", "out"] if drawn[0] else []) + [token for item in drawn[1] for token in item]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv_lists)
def test_random_study_arguments_run_or_give_one_line(tokens):
    # tokens that ask for help would print it and exit 0; they are not what this test is about
    if any(t.startswith("-h") or t.split("=")[0] == "--help" for t in tokens):
        return
    argv = ["study", *tokens]
    received: list = []
    stderr = io.StringIO()
    with mock.patch.object(cli, "run_study_command", stub_study(received)), \
            contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    if code == 0:
        assert len(received) == 1  # every value the parser let through, StudyConfig accepts too
        assert stderr.getvalue() == ""
    else:
        assert code == 2
        lines = stderr.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("scae: error: "), stderr.getvalue()
        assert received == []


# ---------------------------------------------------------------- shared rules
def test_rule_names_match_the_implementations():
    assert params.ACTIVATIONS == tuple(ACTIVATIONS)
    assert params.LOSSES == tuple(LIKELIHOODS)
    assert params.NORMS == NORMS and params.LR_SCHEDULES == LR_SCHEDULES
    assert params.DEVICES == DEVICES
    assert cli.STUDY_MAX_LATENT == max(spec.latent_dim for spec in DEFAULT_RUNS)
    assert StudyConfig().kmeans_seeds == params.DEFAULT_KMEANS_SEEDS


@pytest.mark.parametrize(
    "rule,value,ok",
    [
        (params.SEED, 0, True), (params.SEED, 2**32 - 1, True), (params.SEED, 2**32, False),
        (params.SEED, np.int64(7), True), (params.SEED, True, False), (params.SEED, 3.0, False),
        (params.LEARNING_RATE, 10, True), (params.LEARNING_RATE, 10.000001, False),
        (params.LEARNING_RATE, np.float32(1e-3), True), (params.LEARNING_RATE, math.nan, False),
        (params.FRACTION, 0.0, False), (params.FRACTION, 1.0, False), (params.FRACTION, 0.5, True),
        (params.HIDDEN, (), True), (params.HIDDEN, [3, 4], True), (params.HIDDEN, "12", False),
        (params.HIDDEN, 100, False), (params.HIDDEN, (4, 0), False), (params.HIDDEN, (4, True), False),
        (params.BOOLEAN, np.bool_(True), True), (params.BOOLEAN, 1, False),
    ],
)
def test_rules(rule, value, ok):
    if ok:
        rule(value)
    else:
        with pytest.raises(params.InvalidValue):
            rule(value)


def test_network_parameter_count_matches_torch():
    from scae.models import AutoencoderNet

    net = AutoencoderNet(37, 5, (11, 7))
    assert params.network_parameters(37, 5, (11, 7)) == sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------- Autoencoder parameters
AE_EXPECTED = {
    "latent_dim": "an integer in [1, 100000]",
    "hidden": "a sequence of integers in [1, 100000], e.g. (100,) or (256, 64)",
    "epochs": "an integer in [1, 1000000]",
    "batch_size": "an integer in [1, 10000000]",
    "learning_rate": "a finite number > 0 and <= 10",
    "random_state": "an integer in [0, 4294967295]",
    "loss": "one of: mse, nonzero_mse, poisson, nb, zinb",
    "activation": "one of: relu, elu, gelu, tanh, sigmoid, leaky_relu",
    "device": "one of: auto, cpu, cuda, mps",
    "progress": "True or False",
}


@pytest.mark.parametrize(
    "name,value",
    [
        ("latent_dim", 0), ("latent_dim", -1), ("latent_dim", 2.5), ("latent_dim", True), ("latent_dim", "10"),
        ("latent_dim", 10**12),
        ("hidden", (0,)), ("hidden", (10, 0)), ("hidden", (10**12,)), ("hidden", 100), ("hidden", "100"),
        ("hidden", (True,)), ("hidden", (1.5,)),
        ("epochs", 0), ("epochs", 2.0), ("epochs", None),
        ("batch_size", 0), ("batch_size", -128),
        ("learning_rate", -1.0), ("learning_rate", 0.0), ("learning_rate", math.nan), ("learning_rate", math.inf),
        ("learning_rate", 1e30), ("learning_rate", "0.1"), ("learning_rate", True),
        ("random_state", -5), ("random_state", 2**40), ("random_state", 1.5), ("random_state", None),
        ("loss", "mae"), ("activation", "swish"), ("device", "tpu"), ("progress", "yes"),
    ],
)
def test_autoencoder_bad_parameter_refused_at_fit(small_dense, name, value):
    model = Autoencoder(**{"epochs": 1, name: value})
    with pytest.raises(ScaeInputError) as err:
        model.fit(small_dense[:20])
    assert str(err.value) == f"{name} must be {AE_EXPECTED[name]}; got {value!r}"
    assert isinstance(err.value, ValueError)
    assert not hasattr(model, "net_") and not hasattr(model, "history_")
    assert getattr(model, name) is value  # __init__ stores, fit never rewrites a parameter


def test_autoencoder_init_only_stores(small_dense):
    model = Autoencoder(learning_rate=math.nan, hidden=[8])  # no error until fit
    assert model.hidden == [8]
    Autoencoder(learning_rate=1e-3, hidden=[8], epochs=1, latent_dim=2).fit(small_dense[:30])  # a list is fine


def test_autoencoder_network_too_large_refused_before_allocating(small_dense):
    with pytest.raises(ScaeInputError, match=r"^the network 120 → 100000 → 100000 → 10 → 100000 → 100000 → 120 "
                                             r"would have 20,026,400,130 parameters, more than 1,000,000,000"):
        Autoencoder(hidden=(100_000, 100_000), epochs=1).fit(small_dense[:10])


def test_refit_with_bad_parameters_keeps_the_fitted_model(small_dense):
    model = Autoencoder(latent_dim=2, hidden=(4,), epochs=1).fit(small_dense[:40])
    before = model.transform(small_dense[:5])
    model.set_params(learning_rate=-1.0)
    with pytest.raises(ScaeInputError, match="learning_rate"):
        model.fit(small_dense[:40])
    np.testing.assert_array_equal(model.transform(small_dense[:5]), before)


# ---------------------------------------------------------------- StudyConfig
@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("epochs", 0, "an integer in [1, 1000000]"),
        ("seed", -5, f"an integer in [0, {STUDY_SEED_MAX}]"),
        ("seed", 2**32 - 1, f"an integer in [0, {STUDY_SEED_MAX}]"),
        ("hidden", (0,), "a sequence of integers in [1, 100000], e.g. (100,) or (256, 64)"),
        ("activation", "swish", "one of: relu, elu, gelu, tanh, sigmoid, leaky_relu"),
        ("batch_size", 0, "an integer in [1, 10000000]"),
        ("learning_rate", math.nan, "a finite number > 0 and <= 10"),
        ("learning_rate", 1e30, "a finite number > 0 and <= 10"),
        ("test_fraction", 0.0, "a finite number > 0 and < 1"),
        ("test_fraction", 1.0, "a finite number > 0 and < 1"),
        ("kmeans_seeds", 0, "an integer in [1, 1000]"),
        ("max_embed_cells", 0, "an integer >= 1"),
        ("tsne_workers", -1, "an integer >= 0"),
        ("max_layer_entries", 0, "an integer >= 1"),
        ("sample_layer_entries", -1, "an integer >= 1"),
        ("device", "tpu", "one of: auto, cpu, cuda, mps"),
        ("progress", 1, "True or False"),
    ],
)
def test_study_config_bad_field(field, value, expected):
    with pytest.raises(ScaeInputError) as err:
        StudyConfig(**{field: value})
    assert str(err.value) == f"{field} must be {expected}; got {value!r}"


def test_study_config_seed_range_follows_kmeans_seeds():
    StudyConfig(seed=2**32 - 1, kmeans_seeds=1)
    with pytest.raises(ScaeInputError, match=r"seed must be an integer in \[0, 4294967286\]"):
        StudyConfig(seed=2**32 - 1, kmeans_seeds=10)


def test_study_config_runs_checked():
    with pytest.raises(ScaeInputError, match="runs must have distinct names; got a, a"):
        StudyConfig(runs=(RunSpec("a", 2, "mse"), RunSpec("a", 3, "mse")))
    with pytest.raises(ScaeInputError, match=r"^runs\['b'\]\.loss must be one of: mse, nonzero_mse, poisson, nb, zinb; got 'mae'$"):
        StudyConfig(runs=(RunSpec("b", 2, "mae"),))
    with pytest.raises(ScaeInputError, match="runs must be a non-empty tuple of RunSpec"):
        StudyConfig(runs=())


def test_study_config_keeps_valid_values_and_tuples_hidden():
    config = StudyConfig(hidden=[64, 32], seed=STUDY_SEED_MAX, learning_rate=10)
    assert config.hidden == (64, 32) and config.to_dict()["hidden"] == [64, 32]
    assert config.seed == STUDY_SEED_MAX


def test_no_output_for_bad_options_even_via_fit_command(tmp_path, capsys):
    model = Path(tmp_path / "models" / "m.pt")
    code, _, stderr = run_cli(["fit", "--out", str(model), "--learning-rate", "inf"], capsys)
    assert code == 2 and stderr.count("\n") == 1
    assert not model.parent.exists()


# ---------------------------------------------------------------- memory and libraries
def _raising(error: BaseException):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize(("error", "line"), [
    (MemoryError(), "out of memory: the input or the network does not fit; try --stream for a large input, fewer "
                    "genes (--top-genes), a smaller --hidden or --batch-size, or a machine with more memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 9600000000 bytes."), "out of memory: the input or the network does not fit; try"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory on the GPU: the input or"),
    (ImportError("libtorch_cpu.so: failed to map segment from shared object", name="torch._C"),
     "cannot load torch._C (libtorch_cpu.so: failed to map segment from shared object); reinstall scae and its "
     "dependencies (see the README's set-up)"),
])
def test_running_out_of_memory_or_a_library_that_cannot_load_is_one_line(tmp_path, capsys, monkeypatch, error, line):
    monkeypatch.setattr("scae.__main__.address_space_limit", lambda: None)
    with mock.patch.object(cli, "run_study_command", _raising(error)):
        code, stdout, stderr = run_cli(["study", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"scae: error: {line}") and stderr.count("\n") == 1, stderr


def test_an_address_space_limit_is_named_in_the_out_of_memory_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scae.__main__.address_space_limit", lambda: 4 * 2**30)
    with mock.patch.object(cli, "run_study_command", _raising(MemoryError())):
        code, _, stderr = run_cli(["study", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert stderr.startswith("scae: error: out of memory (the process's address space is limited to 4,096 MiB "
                             "(ulimit -v)): the input")


def test_an_address_space_too_small_for_the_libraries_is_refused_before_anything(tmp_path):
    """Under ``ulimit -v`` of about 1 GiB PyTorch's import aborted natively (std::bad_alloc) or SciPy's
    OpenBLAS retried for ever: the command refuses first, one line, nothing written."""
    import resource
    import subprocess
    import sys

    from conftest import REPO, scae_env

    limit = 1024 * 2**20
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "scae.cli", "study", "--out", str(out)], cwd=REPO, env=scae_env(),
        capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("scae: error: the process's address space is limited to 1,024 MiB (ulimit -v); scae needs "
                           "at least 1,280 MiB to load PyTorch and its libraries: raise the limit\n")
    assert not out.exists()


@pytest.mark.parametrize("limited", [True, False])
def test_openblas_runs_single_threaded_under_a_tight_address_space_limit(limited):
    """SciPy's OpenBLAS, unable to map its threads' buffers under ``ulimit -v``, retried for ever."""
    import resource
    import subprocess
    import sys

    from conftest import scae_env

    env = {k: v for k, v in scae_env().items() if k != "OPENBLAS_NUM_THREADS"}
    limit = 1536 * 2**20  # tight: below 2 GiB and 128 MiB per core
    code = ("from scae.__main__ import prepare_environment; prepare_environment(); import os; "
            "print(os.environ.get('OPENBLAS_NUM_THREADS'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))) if limited else None)
    assert proc.stdout.strip() == ("1" if limited else "None"), proc.stderr


def test_fit_settings_that_do_not_go_together_are_refused_before_the_input_is_read(tmp_path, capsys):
    code, _, stderr = run_cli(["fit", "--counts", str(tmp_path / "missing.npy"), "--labels", str(tmp_path / "l.txt"),
                               "--log-mse-weight", "1", "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 2
    assert stderr.startswith("scae: error: log_mse_weight must be 0 with loss 'mse'")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize(("message", "remedy"), [
    ("libtorch_cpu.so: failed to map segment from shared object", "the process's address space is limited to 4,096 "
                                                                  "MiB (ulimit -v), too little to load it: raise the limit"),
    ("No module named 'openTSNE'", "reinstall scae and its dependencies (see the README's set-up)"),
])
def test_a_library_that_cannot_load_is_blamed_on_the_address_space_only_when_it_lacked_room(
        tmp_path, capsys, monkeypatch, message, remedy):
    monkeypatch.setattr("scae.__main__.address_space_limit", lambda: 4 * 2**30)
    with mock.patch.object(cli, "run_study_command", _raising(ImportError(message, name="x"))):
        code, _, stderr = run_cli(["study", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and stderr == f"scae: error: cannot load x ({message}); {remedy}\n"
