"""Output files and folders: atomic files, and the study's all-or-nothing output folder.

A file appears under its final name only once it is complete; a study's outputs appear in its
folder only once all of them are (:class:`OutputDir`). Light imports only, so the command line
can check paths before loading anything heavy.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scae.errors import ScaeInputError
from scae.interrupts import Interrupted, raise_if_interrupted, signals_deferred


def path_text(path: str | os.PathLike) -> str:
    """A file name as text that every output can hold (JSON, HDF5, HTML, a figure): bytes that are not
    UTF-8 (a name made on another system, or read under a non-UTF-8 locale) written as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def special_file_kind(path: str | Path, follow: bool = False) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a folder (nor a link,
    unless ``follow``: then what the link leads to): ``"a named pipe"``, ``"a socket"`` or
    ``"a device"``; ``None`` otherwise."""
    try:
        mode = (os.stat if follow else os.lstat)(path).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return None


def irregular_kind(path: str | Path) -> str | None:
    """What ``path`` is when it exists (links followed) but is neither a regular file nor a
    folder: :func:`special_file_kind`'s answer, or ``"not a regular file"``; ``None`` otherwise.
    Readers refuse such a path: a named pipe without a writer (or a device) would block or never end."""
    path = Path(path)
    if not path.exists() or path.is_file() or path.is_dir():
        return None
    return special_file_kind(path.resolve()) or "not a regular file"


def unreplaceable_kind(path: str | Path) -> str | None:
    """:func:`special_file_kind` of ``path``, or ``"a link to …"`` such a file (``/dev/stdout``):
    what an atomic write must not rename a regular file over; ``None`` otherwise."""
    kind = special_file_kind(path)
    if kind is None and os.path.islink(path):
        target = special_file_kind(path, follow=True)
        kind = None if target is None else f"a link to {target}"
    return kind


def check_replaceable(path: str | Path, what: str = "the output file") -> None:
    """Refuse to write ``path`` over a named pipe, socket or device, or a link to one: an atomic
    write renames a new file over the name, which would put a regular file where ``/dev/null``,
    a pipe or the ``/dev/stdout`` link was."""
    kind = unreplaceable_kind(path)
    if kind is not None:
        raise ScaeInputError(f"{path}: is {kind}; expected the path of {what} to write (scae replaces "
                             "regular files only)")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    If the block raises (or the process dies), the final name is never created or replaced
    and the temporary file is removed where possible. A named pipe, socket or device at
    ``path`` is refused (:func:`check_replaceable`), before anything is written.
    """
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(paths: list[str | Path]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together: a temporary path beside each, all
    renamed into place when the block succeeds, with signals held back meanwhile, so that an
    interrupt leaves the old set or the new one, never a mix."""
    paths = [Path(path) for path in paths]
    for path in paths:
        check_replaceable(path)
    temps: list[Path] = []
    try:
        for path in paths:
            fd, tmp_name = _temporary_file(path.parent, f".{_short_name(path.name)}.", ".part")
            os.close(fd)
            temps.append(tmp_name)
        yield temps
        raise_if_interrupted()  # a signal swallowed while the files were written: not complete
        with signals_deferred():
            for tmp, path in zip(temps, paths):
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
                os.replace(tmp, path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


TEMPORARY_NAME_BYTES = 200
"""Longest part of a file's name in its temporary's name (``.NAME.xxxxxxxx.part``): a name of up
to the system's 255 bytes then still leaves room for the rest."""


def _short_name(name: str) -> str:
    """``name``, cut to at most :data:`TEMPORARY_NAME_BYTES` bytes as the file system stores it."""
    encoded = os.fsencode(name)
    if len(encoded) <= TEMPORARY_NAME_BYTES:
        return name
    return os.fsdecode(encoded[:TEMPORARY_NAME_BYTES].decode("utf-8", "ignore").encode("utf-8"))


def remove_stale_parts(folder: str | Path, names: tuple[str, ...]) -> None:
    """Remove the temporary files (``.NAME.*.part``) an earlier writer of ``names`` in ``folder``
    left when it was killed outright (SIGKILL, a power cut): called with the folder's lock held,
    so no other scae command is writing them. Links and folders of that shape are left alone."""
    folder = Path(folder)
    for name in names:
        for part in folder.glob(f".{glob.escape(name)}.*.part"):
            if part.is_file() and not part.is_symlink():
                part.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_file(directory: str | Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """``tempfile.mkstemp`` in ``directory`` and the file's path. ``mkstemp`` takes ``..`` out of
    the folder's name by spelling (``lnk/../x`` as ``x``), another folder when ``lnk`` is a link, so
    it is given the folder as the system finds it (links followed first)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.realpath(directory))
    return fd, Path(name)


def check_writable(directory: str | Path) -> None:
    """Raise ``OSError`` unless a file can be created in ``directory``."""
    fd, name = _temporary_file(directory, ".scae-write-test.")
    os.close(fd)
    os.unlink(name)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


H5AD_MARGIN = (1024**2, 0.1)
"""Space asked for beyond an ``.h5ad`` file's estimated size: 1 MiB plus 10% (HDF5's metadata)."""

_hdf5_failed = False


def write_h5ad(adata, path: str | Path) -> None:
    """Write an AnnData to ``path`` atomically, failing cleanly when the disk cannot take it.

    HDF5 copes badly with a write that fails half-way (disk full, file-size limit): every
    object of the file then reports the error again when it is freed, and the library may
    crash when the process exits. So the free space and the file-size limit are checked first
    against the file's estimated size (its arrays' bytes); a write that fails all the same
    raises ``OSError`` with the operating system's reason, the freed objects stay silent, and
    :func:`hdf5_write_failed` tells the command line to exit without the library's clean-up.

    Raises
    ------
    OSError
        ``ENOSPC`` or ``EFBIG`` (up front or from the write), or what the write reported.
    """
    import resource

    path = Path(path)
    need = int(_anndata_bytes(adata) * (1 + H5AD_MARGIN[1])) + H5AD_MARGIN[0]
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device: {path.name} needs about {_mib(need)}, "
                                    f"{_mib(free)} free", str(path))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < need:
        raise OSError(errno.EFBIG, f"File too large: {path.name} needs about {_mib(need)}, the file-size "
                                   f"limit (ulimit -f) is {_mib(limit)}", str(path))
    global _hdf5_failed
    hooks, failed = (sys.unraisablehook, sys.excepthook), False
    sys.unraisablehook, sys.excepthook = _quiet_h5py_hooks(*hooks)  # a failing write frees objects that fail again
    try:
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp)
    except (OSError, RuntimeError) as err:  # h5py reports write failures as either
        _hdf5_failed = failed = True
        found = re.search(r"errno = (\d+)", str(err))
        code = int(found.group(1)) if found else (getattr(err, "errno", None) or errno.EIO)
        raise OSError(code, os.strerror(code), str(path)) from None
    finally:
        if not failed:  # after a failed write the quiet hooks stay: more of its objects are freed later
            sys.unraisablehook, sys.excepthook = hooks


MAX_KEY_CHARS = 200
"""Longest ``obsm``/``layers`` key :func:`check_h5ad_key` accepts."""


def check_h5ad_key(name: str, key) -> None:
    """Refuse an ``obsm``/``layers`` key an ``.h5ad`` file cannot hold: it must be a non-empty
    string without "/", not "." or ".." (HDF5 makes "a/b" nested groups, and "" or "." the group
    itself: anndata cannot read them back). ``name`` is what the message calls the key."""
    if (not isinstance(key, str) or not key.strip() or "/" in key or key.strip() in (".", "..")
            or not key.isprintable() or len(key) > MAX_KEY_CHARS):
        raise ScaeInputError(f"{name} must be a non-empty name without '/', not '.' or '..' (an .h5ad key) and of "
                             f"at most {MAX_KEY_CHARS} printable characters; got {key!r:.120}")


def hdf5_write_failed() -> bool:
    """Whether a :func:`write_h5ad` in this process failed half-way (see there)."""
    return _hdf5_failed


def _quiet_h5py_hooks(unraisable, excepthook):
    """Hooks that drop the errors the h5py objects of a failed file raise when they are freed
    (h5py prints each one's traceback through ``sys.excepthook``, then reports it as unraisable)."""

    def from_h5py(exc, tb) -> bool:
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return isinstance(exc, RuntimeError) and tb is not None and "h5py" in tb.tb_frame.f_code.co_filename

    def quiet_unraisable(args) -> None:
        if not (isinstance(args.exc_value, RuntimeError) and "h5py" in repr(args.object)):
            unraisable(args)

    def quiet_excepthook(exc_type, exc, tb) -> None:
        if not from_h5py(exc, tb):
            excepthook(exc_type, exc, tb)

    return quiet_unraisable, quiet_excepthook


def _anndata_bytes(adata) -> int:
    """The bytes of an AnnData's arrays (``X``, layers, ``obsm``, ``varm``, ``obsp``, ``varp``) and
    of its cell and gene tables."""
    tables = sum(int(df.memory_usage(index=True, deep=True).sum()) for df in (adata.obs, adata.var))
    arrays = [adata.X, *adata.layers.values(), *adata.obsm.values(), *adata.varm.values(),
              *adata.obsp.values(), *adata.varp.values()]
    total = 0
    for a in arrays:
        if a is None:
            continue
        if hasattr(a, "indptr"):  # scipy sparse
            total += a.data.nbytes + a.indices.nbytes + a.indptr.nbytes
        else:
            total += int(getattr(a, "nbytes", 0))
    return total + tables


def _mib(n: int) -> str:
    """A size in MiB (KiB below one MiB), with a decimal below 10 so that close sizes differ."""
    if n < 1024**2:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024**2:.1f} MiB" if n < 10 * 1024**2 else f"{n / 1024**2:.0f} MiB"


MANAGED_NAMES = ("figures", "models", "results.h5ad", "reconstructions.h5ad", "metrics.json", "report.html")
"""What a study writes in its output folder (and replaces when it finishes), in the order
:meth:`OutputDir.commit` moves them into place: ``metrics.json`` and ``report.html`` last."""
STUDY_FIGURES = frozenset(f"{stem}.png" for stem in (
    "q1_loss_history", "q2_test_mse_history", "q3_pca_original_vs_reconstruction", "q3_tsne_original_vs_reconstruction",
    "q4_latent_2d", "q5_pca_reconstruction_vs_original", "q5_pca_latent_vs_original", "q5_tsne_reconstruction_vs_original",
    "q5_tsne_latent_vs_original", "latent_pca_all", "beyond_tsne_latent", "beyond_tsne_reconstruction", "beyond_pca_latent",
))
"""Every figure a study may draw (``report.figure_plan``'s names; a test keeps the two the same)."""
STUDY_MODELS = frozenset(f"{run}.pt" for run in ("ae10", "ae50", "ae2", "ae10_nonzero", "recommended"))
"""Every model file a study may save (``results.STUDY_RUNS``; a test keeps the two the same)."""
OUTPUT_FOLDERS = {"figures": STUDY_FIGURES, "models": STUDY_MODELS}
"""The output names that are folders (the others are files), and the files a study may write in
each: it replaces such a folder whole, so it refuses to start while one holds anything else."""
STAGING_NAME = ".scae-staging"
LOCK_NAME = ".scae.lock"


def lock_folder(folder: Path, writer: str) -> int:
    """Take the exclusive lock of an scae output folder (``folder/.scae.lock``), or raise
    :class:`ScaeInputError` when another scae command holds it; returns the lock's descriptor
    (:func:`unlock_folder` releases it). A link at the lock's name is replaced, never followed."""
    import fcntl

    lock_path = folder / LOCK_NAME
    if lock_path.is_symlink():  # our name made a link: only the name goes, never what it points to
        _remove(lock_path)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise ScaeInputError(f"{lock_path}: cannot create the lock file ({reason(err)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ScaeInputError(
                f"{folder}: another scae command is writing to this directory; wait for it to finish or "
                f"choose another --out for this {writer}"
            ) from None
        try:  # the file may have been removed by the previous holder: lock the one on disk
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def unlock_folder(folder: Path, fd: int) -> None:
    """Release a lock :func:`lock_folder` took (the lock file is removed first, so that a
    waiting writer that opened it notices and locks a fresh one)."""
    (folder / LOCK_NAME).unlink(missing_ok=True)
    os.close(fd)


class OutputWriteError(ScaeInputError):
    """An output could not be written (disk full, permissions, ...)."""


class OutputDir:
    """A study's output folder, written all-or-nothing.

    While a study runs it holds an exclusive lock on ``path/.scae.lock`` (a second study into
    the same folder is refused) and writes everything into ``path/.scae-staging/``. Only
    :meth:`commit` moves the finished outputs into ``path``: figures, models and ``.h5ad``
    files first, then ``metrics.json``, then ``report.html``. A previous run's ``report.html``
    and ``metrics.json`` are removed by :meth:`open`, so after any failure no complete-looking
    output of the failed run exists. :meth:`abort` removes the staging folder but keeps the
    models trained so far in ``.scae-staging/models``, where ``--resume`` finds them.

    Use as a context manager around :meth:`open`::

        with OutputDir(out).open(keep_models=resume) as output:
            ...  # write into output.staging
            output.commit()
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.shown = self.path  # as given, for messages
        self.staging = self.path / STAGING_NAME
        self._lock_fd: int | None = None
        self._committed = False

    @property
    def models(self) -> Path:
        """Where this run saves its models as they are trained."""
        return self.staging / "models"

    def open(self, keep_models: bool = False) -> OutputDir:
        """Create the folder, take the lock, remove the last run's report and metrics, start staging.

        ``keep_models``: keep the models an interrupted run left in the staging folder (for
        ``--resume``); otherwise a stale staging folder is removed.
        """
        check_output_dir(self.path)
        # from here on the folder as the system finds it: a relative --out ('..', run from inside
        # OUT/models) would otherwise move with the working directory when the commit moves that folder
        self.path = Path(os.path.realpath(self.path))
        self.staging = self.path / STAGING_NAME
        self._lock()
        try:
            for name in ("report.html", "metrics.json"):
                (self.path / name).unlink(missing_ok=True)
            if self.staging.is_symlink() or (self.staging.exists() and not self.staging.is_dir()):
                _remove(self.staging)  # our name, made a link or a file: only the name goes, never what it points to
            if self.staging.exists():
                for entry in self.staging.iterdir():
                    if not (keep_models and entry.name == "models" and entry.is_dir() and not entry.is_symlink()):
                        _remove(entry)
            (self.staging / "figures").mkdir(parents=True, exist_ok=True)
            self.models.mkdir(exist_ok=True)
            self._probe_longest_names()
        except OSError as err:
            with contextlib.suppress(OSError):
                self.abort()  # the staging folders made here (models an earlier run left are kept)
            self.close()
            raise ScaeInputError(f"{self.shown}: cannot prepare the output directory ({reason(err)})") from None
        return self

    def _probe_longest_names(self) -> None:
        """Create and remove the temporary of the longest name to be written in each staging folder:
        a folder path near the system's limit (4,096 bytes) then fails here, before any training,
        and not when the figures are written."""
        names = [name for name in MANAGED_NAMES if name not in OUTPUT_FOLDERS]
        for folder, inside in ((self.staging, names), *((self.staging / sub, OUTPUT_FOLDERS[sub]) for sub in OUTPUT_FOLDERS)):
            fd, probe = _temporary_file(folder, f".{max(inside, key=len)}.", ".part")
            os.close(fd)
            probe.unlink()

    def _lock(self) -> None:
        self._lock_fd = lock_folder(self.path, "study")

    def commit(self) -> None:
        """Move the staged outputs into place; ``metrics.json`` and ``report.html`` last.

        Signals wait until every output is in place (all of them are moved, or none): one that
        came meanwhile raises :class:`~scae.interrupts.Interrupted` with ``outputs_written``.
        """
        raise_if_interrupted()
        try:
            with signals_deferred():
                for name in MANAGED_NAMES:
                    staged, final = self.staging / name, self.path / name
                    if not staged.exists():
                        _remove(final)  # e.g. a stale reconstructions.h5ad from a larger input
                        continue
                    if staged.is_dir() and final.exists():
                        old = self.staging / f"{name}.old"
                        os.replace(final, old)
                        os.replace(staged, final)
                        _remove(old)
                    else:
                        os.replace(staged, final)
                _remove(self.staging)
                self._committed = True
        except OSError as err:
            raise OutputWriteError(f"{self.shown}: cannot move the finished outputs into place ({reason(err)})") from None
        except Interrupted as stop:  # handled as the renames ended
            stop.outputs_written = self._committed
            raise

    def abort(self) -> bool:
        """Remove what this run staged, except its trained models; whether any models were kept."""
        if self._committed or not self.staging.exists():
            return False
        kept = self.models.is_dir() and any(self.models.iterdir())
        for entry in list(self.staging.iterdir()):
            if not (kept and entry.name == "models"):
                _remove(entry)
        if not kept:
            _remove(self.staging)
        return kept

    def close(self) -> None:
        """Release the lock (:func:`unlock_folder`: the lock file is removed, for the race :func:`lock_folder` handles)."""
        if self._lock_fd is not None:
            unlock_folder(self.path, self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and not self._committed:
                self.abort()
        finally:
            self.close()


def reason(err: OSError) -> str:
    return err.strerror or str(err)


def _remove(path: Path) -> None:
    """Remove a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def check_output_dir(out_dir: str | Path, written: tuple[str, ...] = MANAGED_NAMES) -> Path:
    """Create ``out_dir`` if needed and check a file can be written in it (nothing is removed),
    and that none of the names ``written`` there (by default a study's outputs) is a named
    pipe, socket or device, which finishing would replace by a regular file."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_writable(out_dir)
    except OSError as err:
        raise ScaeInputError(
            f"{out_dir}: cannot write the output directory ({reason(err)}); expected a writable directory"
        ) from None
    for name in written:
        path = out_dir / name
        kind = unreplaceable_kind(path)
        if kind is None and name in OUTPUT_FOLDERS and path.exists() and not path.is_dir():
            kind = "a file"
        elif kind is None and name not in OUTPUT_FOLDERS and path.is_dir():
            kind = "a folder"
        if kind is not None:
            raise ScaeInputError(f"{path}: is {kind}, where the output {name} goes (scae replaces regular "
                                 f"files{' and its own folders' if name in OUTPUT_FOLDERS else ''} only); move it "
                                 "or choose another output directory")
        if name in OUTPUT_FOLDERS and path.is_dir() and not path.is_symlink():
            foreign = _not_written_by_a_study(path, OUTPUT_FOLDERS[name])
            if foreign is not None:
                what = ("unreadable" if foreign == path else "a folder" if foreign.is_dir()
                        else f"not a {'figure' if name == 'figures' else 'model'} a study writes")
                raise ScaeInputError(f"{foreign}: is {what}, and the study replaces the whole {name} folder when it "
                                     "finishes; move it or choose another output directory")
    return out_dir


FILE_BROWSER_LITTER = frozenset({".DS_Store", ".localized", "Icon\r", "Thumbs.db", "ehthumbs.db", "desktop.ini",
                                 ".directory"})
"""Files a file browser leaves in a folder it showed (and macOS's ``._NAME`` beside a file ``NAME``):
an output folder may hold them."""


def _not_written_by_a_study(folder: Path, names: frozenset[str]) -> Path | None:
    """The first entry of ``folder`` that is not a file a study writes there (one of ``names``):
    a folder, a note, a user's own figure or model; file-browser litter aside
    (:data:`FILE_BROWSER_LITTER`). ``folder`` itself when it cannot be read."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                ours = entry.name in names or entry.name in FILE_BROWSER_LITTER or entry.name.removeprefix("._") in names
                if not (ours and entry.is_file()):
                    return Path(entry.path)
    except OSError:
        return folder
    return None


def refuse_inputs_inside(out_dir: str | Path, inputs: list[str | Path], written: set[str] | None = None,
                         writer: str = "the study") -> None:
    """Refuse any input file that ``writer`` would remove or replace in ``out_dir``.

    An input is refused when it lies (after resolving links) at a name in ``written`` (by
    default what a study writes: :data:`MANAGED_NAMES`, the staging folder and the lock),
    inside a folder of that name, or is a hard link of a file there. Inputs elsewhere inside
    ``out_dir`` are fine.
    """
    try:
        _refuse_inputs_inside(out_dir, inputs, written, writer)
    except (OSError, RuntimeError) as err:  # a name too long, a folder that cannot be read, a link loop
        if not isinstance(err, OSError):  # pathlib reports a symlink loop as RuntimeError
            err = OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(out_dir))
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(out_dir) else ""
        raise ScaeInputError(
            f"{out_dir}: cannot use as the output directory{where}: {reason(err)}; expected a writable directory"
        ) from None


def _refuse_inputs_inside(out_dir, inputs, written, writer) -> None:
    out = Path(out_dir).resolve()
    written = set(MANAGED_NAMES) | {STAGING_NAME, LOCK_NAME} if written is None else written
    existing = [out / name for name in written]
    existing = [p for base in existing for p in ([base, *base.rglob("*")] if base.is_dir() else [base]) if p.is_file()]
    for given in inputs:
        if given is None:
            continue
        try:
            path = Path(given).resolve()
        except (OSError, RuntimeError):  # pathlib reports a symlink loop as RuntimeError
            raise ScaeInputError(f"{given}: cannot be read (a symbolic link loop or an unreadable path); "
                                 "expected an input file") from None
        inside = path.is_relative_to(out) and path != out and path.relative_to(out).parts[0] in written
        if inside or any(os.path.samefile(path, p) for p in existing if path.exists()):
            raise ScaeInputError(
                f"{given}: is an input, and {writer} would remove or overwrite it in --out {out_dir}; "
                "move the input or choose another --out directory"
            )
