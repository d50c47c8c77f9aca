"""All-or-nothing outputs: the lock, the staging folder, commit and abort, inputs inside --out."""

from __future__ import annotations

import errno
import json
import os

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
        with pytest.raises(ScaeInputError, match="another scae study is writing to this directory"):
            OutputDir(tmp_path).open()
    with OutputDir(tmp_path).open():  # released: a later study may write
        pass


def test_commit_moves_everything_and_puts_the_report_last(tmp_path, monkeypatch):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "old.png").write_text("old")
    (tmp_path / "reconstructions.h5ad").write_text("stale")
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real_replace(a, b)))
    with OutputDir(tmp_path).open() as output:
        (output.staging / "figures" / "new.png").write_text("new")
        (output.models / "ae10.pt").write_text("m")
        for name in ("results.h5ad", "metrics.json", "report.html"):
            (output.staging / name).write_text(name)
        output.commit()
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["new.png"]
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
