"""All-or-nothing outputs: the lock, the staging folder, commit and abort, inputs inside --out."""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest

import scae
from scae import files, outputs
from scae.cli import main
from scae.embeddings import TSNEConfig
from scae.errors import ScaeInputError
from scae.files import LOCK_NAME, STAGING_NAME, OutputDir, OutputWriteError, refuse_inputs_inside
from scae.study import RunSpec, StudyConfig

ONE_RUN = (RunSpec("ae10", 10, "mse"),)


def tiny_config(**kwargs) -> StudyConfig:
    return StudyConfig(epochs=1, progress=False, kmeans_seeds=1, hidden=(8,), runs=ONE_RUN,
                       tsne=TSNEConfig(early_exaggeration_iter=20, n_iter=20), **kwargs)


@pytest.fixture(scope="module")
def tiny_dataset():
    return scae.simulate_dataset(90, 20, 3, seed=0)


def test_open_removes_last_report_and_stale_staging_but_keeps_other_outputs(tmp_path):
    out = tmp_path / "a" / "b"
    out.mkdir(parents=True)
    for name in ("report.html", "metrics.json", "results.h5ad"):
        (out / name).write_text("old")
    (out / STAGING_NAME / "figures").mkdir(parents=True)
    (out / STAGING_NAME / "figures" / "half.png").write_text("partial")
    (out / STAGING_NAME / "models").mkdir()
    (out / STAGING_NAME / "models" / "ae10.pt").write_text("model")
    with OutputDir(out).open() as output:
        assert not (out / "report.html").exists() and not (out / "metrics.json").exists()
        assert (out / "results.h5ad").read_text() == "old"  # replaced only by a successful commit
        assert list(output.staging.rglob("*.*")) == []  # the stale staging folder was emptied
        assert (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()


def test_open_keeps_staged_models_for_resume(tmp_path):
    models = tmp_path / STAGING_NAME / "models"
    models.mkdir(parents=True)
    (models / "ae10.pt").write_text("model")
    with OutputDir(tmp_path).open(keep_models=True) as output:
        assert (output.models / "ae10.pt").read_text() == "model"


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    with OutputDir(tmp_path).open():
        with pytest.raises(ScaeInputError, match="another scae command is writing to this directory"):
            OutputDir(tmp_path).open()
    with OutputDir(tmp_path).open():  # released: a later study may write
        pass


def test_commit_moves_everything_and_puts_the_report_last(tmp_path, monkeypatch):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "q4_latent_2d.png").write_text("old")  # a figure of an earlier run
    (tmp_path / "reconstructions.h5ad").write_text("stale")
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real_replace(a, b)))
    with OutputDir(tmp_path).open() as output:
        (output.staging / "figures" / "q1_loss_history.png").write_text("new")
        (output.models / "ae10.pt").write_text("m")
        for name in ("results.h5ad", "metrics.json", "report.html"):
            (output.staging / name).write_text(name)
        output.commit()
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["q1_loss_history.png"]
    assert (tmp_path / "models" / "ae10.pt").read_text() == "m"
    assert not (tmp_path / "reconstructions.h5ad").exists()  # stale file of a larger input removed
    assert not (tmp_path / STAGING_NAME).exists()
    final_moves = [name for name in moved if name in ("metrics.json", "report.html")]
    assert final_moves == ["metrics.json", "report.html"] and moved[-1] == "report.html"


def test_a_failed_write_leaves_no_report_or_metrics_and_keeps_trained_models(tmp_path, tiny_dataset, monkeypatch):
    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "write_text", disk_full)
    (tmp_path / "results.h5ad").write_text("previous run")
    with pytest.raises(OutputWriteError, match="cannot write the outputs .*No space left on device"):
        scae.run_study(tiny_dataset, tmp_path, tiny_config())
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "report.html").exists()
    assert (tmp_path / "results.h5ad").read_text() == "previous run"
    staged = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / STAGING_NAME).rglob("*"))
    assert staged == [f"{STAGING_NAME}/models", f"{STAGING_NAME}/models/ae10.pt"]  # for --resume
    assert not (tmp_path / LOCK_NAME).exists()


def test_resume_reuses_a_model_staged_by_a_failed_run(tmp_path, tiny_dataset, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(outputs, "write_text", lambda path, text: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        with pytest.raises(OutputWriteError):
            scae.run_study(tiny_dataset, tmp_path, tiny_config())
    result = scae.run_study(tiny_dataset, tmp_path, tiny_config(resume=True))
    assert result.runs["ae10"].resumed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["runs"]["ae10"]["resumed"] is True
    assert (tmp_path / "models" / "ae10.pt").is_file() and not (tmp_path / STAGING_NAME).exists()


def test_an_interrupt_removes_the_staged_outputs(tmp_path, tiny_dataset, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "build_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scae.run_study(tiny_dataset, tmp_path, tiny_config())
    assert sorted(p.name for p in tmp_path.iterdir()) == [STAGING_NAME]
    assert [p.name for p in (tmp_path / STAGING_NAME).iterdir()] == ["models"]


@pytest.mark.parametrize("inside", ["report.html", "metrics.json", "results.h5ad", "figures/x.txt",
                                    "models/labels.txt", f"{STAGING_NAME}/a.npy"])
def test_inputs_where_the_study_writes_are_refused(tmp_path, inside):
    target = tmp_path / inside
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("precious")
    with pytest.raises(ScaeInputError, match="is an input, and the study would remove or overwrite it"):
        refuse_inputs_inside(tmp_path, [None, target])
    refuse_inputs_inside(tmp_path / "elsewhere", [target])  # another --out is fine


def test_inputs_elsewhere_in_out_and_links_into_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.txt").write_text("a\n")
    refuse_inputs_inside(tmp_path, [data / "labels.txt"])  # inside --out, but nothing is written there
    (tmp_path / "report.html").write_text("x")
    link = data / "link.txt"
    link.symlink_to(tmp_path / "report.html")
    with pytest.raises(ScaeInputError, match="link.txt: is an input"):
        refuse_inputs_inside(tmp_path, [link])
    os.link(tmp_path / "report.html", data / "hard.txt")
    with pytest.raises(ScaeInputError, match="hard.txt: is an input"):
        refuse_inputs_inside(tmp_path, [data / "hard.txt"])


def test_cli_refuses_an_input_inside_out_before_removing_anything(sim_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    labels = out / "report.html"
    labels.write_bytes((sim_dir / "labels.txt").read_bytes())
    before = labels.read_bytes()
    code = main(["study", "--counts", str(sim_dir / "counts.npy"), "--labels", str(labels), "--out", str(out),
                 "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is an input" in err
    assert labels.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]


def _small_anndata():
    import anndata
    import numpy as np

    return anndata.AnnData(np.ones((50, 40), dtype=np.float32))


def test_write_h5ad_refuses_up_front_when_the_disk_is_too_full(tmp_path, monkeypatch):
    """HDF5 copes badly with a write that fails half-way (every object of the file reports it
    again, and the library may crash at exit): free space is checked against the file's size first."""
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=r"No space left on device: r.h5ad needs about 1.[0-9] MiB, 1 KiB free") as caught:
        files.write_h5ad(_small_anndata(), tmp_path / "r.h5ad")
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == [] and not files.hdf5_write_failed()


def test_write_h5ad_refuses_up_front_beyond_the_file_size_limit(tmp_path, monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda what: (100 * 1024, resource.RLIM_INFINITY))
    with pytest.raises(OSError, match=r"File too large: r.h5ad needs about 1.[0-9] MiB, the file-size limit \(ulimit -f\) is 100 KiB"):
        files.write_h5ad(_small_anndata(), tmp_path / "r.h5ad")
    assert list(tmp_path.iterdir()) == []


def test_a_write_h5ad_failing_half_way_becomes_the_os_error(tmp_path, monkeypatch):
    """h5py reports a failed write as a RuntimeError carrying the C errno in its text."""
    import anndata

    def fails(self, path):
        path.write_bytes(b"half")
        raise RuntimeError("Can't close file (file write failed: ..., errno = 28, error message = 'No space left')")

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", fails)
    monkeypatch.setattr(files, "_hdf5_failed", False)
    before = sys.unraisablehook, sys.excepthook
    try:
        with pytest.raises(OSError) as caught:
            files.write_h5ad(_small_anndata(), tmp_path / "r.h5ad")
        assert (caught.value.errno, caught.value.strerror) == (errno.ENOSPC, os.strerror(errno.ENOSPC))
        assert list(tmp_path.iterdir()) == []  # the partial file is removed
        assert files.hdf5_write_failed()  # the command line then exits without HDF5's clean-up
    finally:
        sys.unraisablehook, sys.excepthook = before


def test_cli_study_on_a_full_disk_is_one_line_and_no_report(sim_dir, tmp_path, monkeypatch, capsys):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=2 * 1024**2))
    out = tmp_path / "out"
    status = main(["study", "--counts", str(sim_dir / "counts.npy"), "--labels", str(sim_dir / "labels.txt"),
                   "--out", str(out), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "cannot write the outputs" in err[0] and "No space left on device: results.h5ad needs about" in err[0]
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()


def test_a_model_file_that_cannot_be_written_is_an_os_error_not_torch_s(tmp_path, monkeypatch):
    """torch.save writing to a full disk raised RuntimeError("[enforce fail at inline_container.cc]");
    the model is now serialised in memory and written by Python, which reports the OS's reason."""
    import numpy as np
    from pathlib import Path

    model = scae.Autoencoder(latent_dim=2, hidden=(4,), epochs=1).fit(np.random.default_rng(0).random((20, 6), dtype=np.float32))

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError) as caught:
        model.save(tmp_path / "m.pt")
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_an_out_path_that_cannot_be_inspected_is_one_clean_error(tmp_path):
    with pytest.raises(ScaeInputError, match="cannot use as the output directory.*File name too long"):
        refuse_inputs_inside(tmp_path / ("a" * 300), [tmp_path / "labels.txt"])


def test_a_staging_name_that_links_elsewhere_loses_only_the_link(tmp_path):
    """OUT/.scae-staging made a link to someone's folder: opening the output removes the link,
    never the files it points to (a hostile test lost a thesis.txt that way)."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    (precious / "models").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / STAGING_NAME).symlink_to(precious)
    with OutputDir(out).open(keep_models=True) as output:
        assert output.staging.is_dir() and not output.staging.is_symlink()
    assert (precious / "thesis.txt").read_text() == "years of work" and (precious / "models").is_dir()


def test_an_out_symlink_loop_is_one_clean_error(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ScaeInputError, match="cannot use as the output directory: Too many levels of symbolic links"):
        refuse_inputs_inside(tmp_path / "a", [tmp_path / "labels.txt"])


def test_an_input_symlink_loop_is_named_as_the_input(tmp_path):
    (tmp_path / "a.npy").symlink_to(tmp_path / "b.npy")
    (tmp_path / "b.npy").symlink_to(tmp_path / "a.npy")
    with pytest.raises(ScaeInputError, match=r"a.npy: cannot be read \(a symbolic link loop"):
        refuse_inputs_inside(tmp_path / "out", [tmp_path / "a.npy"])


def test_a_named_pipe_or_device_is_never_replaced_by_an_output(tmp_path, capsys):
    """An atomic write renames a new file over the name: over a named pipe (or ``/dev/null``, as
    root) that would put a regular file in its place. Every writer refuses, before any work."""
    import numpy as np

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert files.special_file_kind(pipe) == "a named pipe"
    assert files.special_file_kind("/dev/null") == "a device"
    assert files.special_file_kind(tmp_path) is None and files.special_file_kind(tmp_path / "new") is None
    with pytest.raises(ScaeInputError, match="pipe: is a named pipe; expected the path of the output file"):
        files.write_text(pipe, "x")
    model = scae.Autoencoder(latent_dim=2, hidden=(4,), epochs=1).fit(np.ones((12, 3), dtype=np.float32))
    with pytest.raises(ScaeInputError, match="is a named pipe"):
        model.save(pipe)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 6)).astype(np.float32))
    (tmp_path / "y.txt").write_text("a\nb\n" * 20)
    data = ["--counts", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.txt"), "--epochs", "1", "--quiet"]
    assert main(["fit", *data, "--out", str(pipe)]) == 2
    assert "pipe: is a named pipe; expected the path of the model file to write" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "in.h5ad"), "--out", str(pipe), "--quiet"]) == 2
    assert "pipe: is a named pipe; expected the path of the .h5ad file to write" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "report.html")
    assert main(["study", *data, "--out", str(out)]) == 2
    assert "report.html: is a named pipe, where the output report.html goes" in capsys.readouterr().err
    assert files.special_file_kind(pipe) == files.special_file_kind(out / "report.html") == "a named pipe"
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]  # refused before the lock or staging


def test_files_written_together_replace_the_old_set_or_nothing(tmp_path):
    old = {name: tmp_path / name for name in ("a.txt", "b.txt")}
    for name, path in old.items():
        path.write_text(f"old {name}")
    with pytest.raises(RuntimeError), files.atomic_paths(list(old.values())) as temps:
        temps[0].write_text("new a")
        raise RuntimeError("interrupted between the two files")
    assert [p.read_text() for p in old.values()] == ["old a.txt", "old b.txt"]
    with files.atomic_paths(list(old.values())) as temps:
        for tmp, name in zip(temps, old):
            tmp.write_text(f"new {name}")
    assert [p.read_text() for p in old.values()] == ["new a.txt", "new b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary file left


def test_commands_refuse_link_loops_and_outputs_of_the_wrong_kind_before_any_work(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 12)).astype(np.float32))
    (tmp_path / "y.txt").write_text("a\nb\n" * 20)
    data = ["--counts", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.txt"), "--quiet"]
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert main(["fit", *data, "--epochs", "1", "--out", str(tmp_path / "loop1")]) == 2
    assert "loop1: is a loop of symbolic links" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "loop1"), "--out", str(tmp_path / "e.h5ad"), "--quiet"]) == 2
    assert "loop1: is a loop of symbolic links" in capsys.readouterr().err
    bench = [*data, "--methods", "pca10", "--seeds", "1"]
    out = tmp_path / "bench"
    assert main(["benchmark", *bench, "--out", str(out)]) == 0
    assert (out / "benchmark.json").is_file()
    (out / "benchmark.png").unlink()
    os.mkfifo(out / "benchmark.png")
    assert main(["benchmark", *bench, "--out", str(out)]) == 2  # refused up front
    assert "benchmark.png: is a named pipe" in capsys.readouterr().err
    (out / "benchmark.png").unlink()
    (out / "benchmark.html").unlink()
    (out / "benchmark.html").mkdir()
    assert main(["benchmark", *bench, "--out", str(out)]) == 2
    assert "benchmark.html: is a folder, where the output benchmark.html goes" in capsys.readouterr().err
    shutil_out = tmp_path / "bench2"
    shutil_out.mkdir()
    (shutil_out / "benchmark.png").mkdir()
    (shutil_out / "benchmark.png" / "mine.txt").write_text("mine")
    assert main(["benchmark", *bench, "--out", str(shutil_out)]) == 2
    assert "benchmark.png: is a folder, where the output benchmark.png goes" in capsys.readouterr().err
    assert (shutil_out / "benchmark.png" / "mine.txt").read_text() == "mine"
    sim = tmp_path / "sim"
    sim.mkdir()
    os.mkfifo(sim / "labels.txt")
    assert main(["simulate", "--cells", "60", "--genes", "10", "--out", str(sim)]) == 2
    assert sorted(p.name for p in sim.iterdir()) == ["labels.txt"]  # nothing written beside the pipe


def test_a_failed_benchmark_leaves_no_earlier_results(tmp_path, capsys, monkeypatch):
    import numpy as np

    import scae.benchmark

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 6)).astype(np.float32))
    (tmp_path / "y.txt").write_text("a\nb\n" * 20)
    bench = ["--counts", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.txt"), "--quiet",
             "--methods", "pca10", "--seeds", "1", "--out", str(tmp_path / "out")]
    assert main(["benchmark", *bench]) == 0

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "benchmark.html"))

    monkeypatch.setattr(scae.benchmark, "write_benchmark", disk_full)
    assert main(["benchmark", *bench]) == 2
    assert "cannot write the benchmark's results" in capsys.readouterr().err
    assert not (tmp_path / "out" / "benchmark.json").exists() and not (tmp_path / "out" / "benchmark.html").exists()


def test_a_link_at_the_lock_name_is_replaced_not_followed(tmp_path):
    out, target = tmp_path / "out", tmp_path / "elsewhere" / "file"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(target)  # dangling: following it would create a file outside out
    with OutputDir(out).open():
        assert not target.exists() and not target.parent.exists()
        assert (out / LOCK_NAME).is_file() and not (out / LOCK_NAME).is_symlink()


def test_simulate_refuses_a_folder_another_command_writes(tmp_path, capsys):
    with OutputDir(tmp_path).open():
        assert main(["simulate", "--cells", "60", "--genes", "10", "--out", str(tmp_path)]) == 2
    assert "another scae command is writing to this directory; wait for it to finish or choose another --out " \
           "for this simulate" in capsys.readouterr().err
    assert not (tmp_path / "counts.npy").exists()
    assert main(["simulate", "--cells", "60", "--genes", "10", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_benchmark_takes_the_folder_lock_and_leaves_a_study_its_files(tmp_path, capsys):
    assert main(["simulate", "--cells", "60", "--genes", "10", "--out", str(tmp_path / "sim")]) == 0
    data = ["--counts", str(tmp_path / "sim" / "counts.npy"), "--labels", str(tmp_path / "sim" / "labels.txt")]
    out = tmp_path / "shared"
    with OutputDir(out).open():  # a study is writing there
        assert main(["benchmark", *data, "--methods", "pca5", "--seeds", "1", "--out", str(out), "--quiet"]) == 2
    assert "another scae command is writing to this directory; wait for it to finish or choose another --out " \
           "for this benchmark" in capsys.readouterr().err
    assert not (out / "benchmark.json").exists()
    assert main(["benchmark", *data, "--methods", "pca5", "--seeds", "1", "--out", str(out), "--quiet"]) == 0
    assert not (out / LOCK_NAME).exists()
    assert main(["study", *data, "--epochs", "1", "--out", str(out), "--quiet", "--max-embed-cells", "60"]) == 0
    assert (out / "benchmark.png").is_file() and (out / "benchmark.json").is_file()  # a study's own names only
    assert (out / "report.html").is_file()


def test_stale_part_files_of_a_killed_writer_are_removed_under_the_lock(tmp_path):
    from scae.cli import SIMULATE_OUTPUTS
    from scae.files import remove_stale_parts

    for name in SIMULATE_OUTPUTS:
        (tmp_path / f".{name}.abc123xy.part").write_bytes(b"x" * 100)
    (tmp_path / ".counts.npy.keep").write_text("not ours")
    (tmp_path / ".report.html.abcdefgh.part").write_text("another command's")
    (tmp_path / "elsewhere.txt").write_text("kept")
    (tmp_path / ".labels.txt.linkxxxx.part").symlink_to(tmp_path / "elsewhere.txt")
    remove_stale_parts(tmp_path, SIMULATE_OUTPUTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".counts.npy.keep", ".labels.txt.linkxxxx.part", ".report.html.abcdefgh.part", "elsewhere.txt"]
    (tmp_path / ".raw_counts.npy.zzzzzzzz.part").write_bytes(b"y")
    assert main(["simulate", "--cells", "60", "--genes", "10", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / ".raw_counts.npy.zzzzzzzz.part").exists()


@pytest.mark.parametrize("command", ["study", "fit", "embed", "benchmark", "simulate"])
def test_an_empty_output_path_is_refused(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    args = {"embed": ["embed", "in.h5ad"], "benchmark": ["benchmark", "--h5ad", "in.h5ad", "--label-key", "x"]}.get(
        command, [command])
    with pytest.raises(SystemExit) as info:
        main([*args, "--out", ""])
    assert info.value.code == 2
    kind = "a folder" if command in ("study", "benchmark", "simulate") else "a file"
    assert f"argument --out: expected the path of {kind} to write, got ''" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["fit", "embed"])
def test_a_file_output_ending_with_a_slash_is_refused(tmp_path, capsys, command):
    args = ["embed", str(tmp_path / "in.h5ad")] if command == "embed" else ["fit"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--out", f"{tmp_path / 'newdir'}/"])
    assert info.value.code == 2
    assert "(a folder's name)" in capsys.readouterr().err
    assert not (tmp_path / "newdir").exists()


def test_refused_simulate_and_benchmark_leave_no_folder(tmp_path, capsys):
    assert main(["simulate", "--cells", "5", "--populations", "3", "--out", str(tmp_path / "a" / "b")]) == 2
    assert "expected at least 2 cells per population" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["simulate", "--cells", "60", "--genes", "10", "--out", str(tmp_path / "sim")]) == 0
    data = ["--counts", str(tmp_path / "sim" / "counts.npy"), "--labels", str(tmp_path / "sim" / "labels.txt")]
    import torch

    if not torch.cuda.is_available():
        assert main(["benchmark", *data, "--methods", "pca5", "--device", "cuda", "--out", str(tmp_path / "q")]) == 2
        assert "--device cuda: no CUDA GPU is available" in capsys.readouterr().err
        assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("command", ["fit", "embed"])
def test_an_output_that_is_a_link_to_a_pipe_is_refused_and_kept(tmp_path, capsys, command):
    """``--out /dev/stdout`` is a link to a pipe: the atomic rename would have replaced the
    system's link by a regular file."""
    assert main(["simulate", "--cells", "60", "--genes", "10", "--out", str(tmp_path / "sim")]) == 0
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    data = ["--counts", str(tmp_path / "sim" / "counts.npy"), "--labels", str(tmp_path / "sim" / "labels.txt")]
    if command == "embed":
        import anndata as ad
        import numpy as np

        ad.AnnData(X=np.load(tmp_path / "sim" / "raw_counts.npy")).write_h5ad(tmp_path / "in.h5ad")
        args = ["embed", str(tmp_path / "in.h5ad"), "--epochs", "1", "--quiet"]
    else:
        args = ["fit", *data, "--epochs", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "link")]) == 2
    assert f"{tmp_path / 'link'}: is a link to a named pipe" in capsys.readouterr().err
    assert (tmp_path / "link").is_symlink() and (tmp_path / "fifo").is_fifo()


def test_a_link_to_a_pipe_at_a_study_or_benchmark_output_name_is_refused(tmp_path, capsys):
    assert main(["simulate", "--cells", "60", "--genes", "10", "--out", str(tmp_path / "sim")]) == 0
    data = ["--counts", str(tmp_path / "sim" / "counts.npy"), "--labels", str(tmp_path / "sim" / "labels.txt")]
    os.mkfifo(tmp_path / "fifo")
    for command, name in (("study", "report.html"), ("benchmark", "benchmark.png")):
        out = tmp_path / command
        out.mkdir()
        (out / name).symlink_to(tmp_path / "fifo")
        extra = ["--epochs", "1", "--max-embed-cells", "60"] if command == "study" else ["--methods", "pca5", "--seeds", "1"]
        assert main([command, *data, *extra, "--quiet", "--out", str(out)]) == 2
        assert f"{out / name}: is a link to a named pipe, where the output {name} goes" in capsys.readouterr().err
        assert (out / name).is_symlink()


def test_an_output_folder_too_deep_for_its_longest_file_name_is_refused_before_training(tmp_path, monkeypatch):
    """The staging folder's longest names are tried when the folder is opened: a path near the
    system's limit failed only when the figures were written, after the training."""
    from scae.files import OutputDir

    made = []
    real = scae.files._temporary_file

    def too_long_for_figures(directory, prefix, suffix=""):
        made.append(prefix)
        if prefix.startswith(".q3_tsne_original_vs_reconstruction") or prefix.startswith(".q5_"):
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(directory))
        return real(directory, prefix, suffix)

    monkeypatch.setattr(scae.files, "_temporary_file", too_long_for_figures)
    out = tmp_path / "out"
    with pytest.raises(scae.ScaeInputError, match=r": cannot prepare the output directory \(File name too long\)$"):
        OutputDir(out).open()
    assert any(p.startswith(".q") for p in made)
    assert not (out / ".scae-staging").exists() and not (out / ".scae.lock").exists()
