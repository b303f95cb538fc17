"""The run store: one folder per training run, written atomically, so that sweeps can be killed and resumed.

Layout of a store (one study's results)::

    ROOT/
      study.json                    {"study": NAME, ...}: the marker; a store refuses a folder of another study
      fashion-bn-b2-s0-1a2b3c4d5e/  a finished run
        config.json                 what was run (the run's identity: its name hashes it)
        env.json                    torch / triton / python versions, device, git commit
        metrics.jsonl               one JSON object per line, as logged
        ...                         anything else the run saved (e.g. model.pt)
      .NAME.tmp-HOST-PID/           a run in progress (or killed: removed by clean_stale)

A run is written under the hidden temporary name and renamed to its final name only when its ``with`` block ends
without an exception; the rename is atomic, so a folder with a final name is always a complete run, and a killed
sweep leaves only a hidden temporary folder behind. Plots and reports read finished runs only (:meth:`RunStore.load`).

Metrics are written by Python's :mod:`json`, which writes non-finite floats as ``NaN`` / ``Infinity`` (a diverged
run's loss); :func:`json.loads` reads them back.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["RunStore", "Run", "run_name", "config_hash", "env_info", "git_commit"]

_MARKER = "study.json"
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def config_hash(config: dict, length: int = 10) -> str:
    """A short hex digest of ``config`` (canonical JSON: sorted keys, no spaces): equal configs, equal hashes.

    Example:
        >>> from normlab.lab.runs import config_hash
        >>> config_hash({"a": 1, "b": [2, 3]}) == config_hash({"b": (2, 3), "a": 1})
        True
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_name(prefix: str, config: dict) -> str:
    """A run's folder name: ``prefix`` made filesystem-safe, then the config's hash.

    The readable prefix is for people; the hash makes the name unique to the config, so a sweep recognises its
    finished runs by name alone.

    Example:
        >>> from normlab.lab.runs import run_name
        >>> run_name("fashion-gn:8-b2", {"norm": "gn:8"})
        'fashion-gn-8-b2-2e0aa00515'
    """
    slug = _UNSAFE.sub("-", prefix).strip("-.") or "run"
    return f"{slug}-{config_hash(config)}"


def _jsonable(value):
    """JSON for the values metrics hold besides Python's own: tensors, numpy scalars and arrays, paths, tuples."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist"):  # numpy
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metrics value {value!r} of type {type(value).__name__} is not JSON serializable")


@functools.lru_cache(maxsize=1)
def git_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding normlab's source.

    None when normlab is not run from a git checkout of itself (an installed wheel), git is missing, or git does not
    answer within 5 seconds.
    """
    source = Path(__file__).resolve().parents[1]  # src/normlab

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # a venv or site-packages inside some other repository must not report that repository's commit
    if top is None or not (Path(top) / "src" / "normlab").resolve() == source:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name


def env_info(device: torch.device | str = "cpu", **extra) -> dict:
    """What env.json records: versions, the device, the machine's threads, the git commit, plus ``extra``."""
    device = torch.device(device)
    info = {
        "normlab": _package_version("normlab"),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": _device_name(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    info.update(extra)
    return info


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Run:
    """A run being written; made by :meth:`RunStore.run`.

    Attributes:
        name: the final folder name.
        dir: the folder to write into: the temporary folder while the run is in progress, the final one once the
            ``with`` block has completed.
    """

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.dir = directory
        self._metrics = open(directory / "metrics.jsonl", "a")

    def log(self, **metrics) -> None:
        """Append one line ``metrics`` (as a JSON object) to metrics.jsonl, flushed at once."""
        self._metrics.write(json.dumps(metrics, default=_jsonable) + "\n")
        self._metrics.flush()

    def _close(self) -> None:
        if not self._metrics.closed:
            self._metrics.flush()
            os.fsync(self._metrics.fileno())
            self._metrics.close()


class RunStore:
    """The finished runs of one study in folder ``root``; see the module docstring for the layout.

    Args:
        root: the store's folder; created if missing. It must be empty, or hold the store of the same ``study``
            (its ``study.json``), or hold only hidden entries.
        study: the study's name, written to ``root/study.json``.

    Raises:
        ValueError: if ``root`` holds another study's results (a ``study.json`` naming another study), or visible
            files but no ``study.json``, or is not a folder.

    Example:
        >>> import tempfile
        >>> from normlab.lab.runs import RunStore
        >>> store = RunStore(tempfile.mkdtemp(), study="example")
        >>> with store.run("bn-b2", {"norm": "bn", "batch_size": 2}) as run:
        ...     run.log(epoch=1, test_error=12.5)
        >>> store.is_done("bn-b2"), store.done_runs()
        (True, ['bn-b2'])
        >>> store.load("bn-b2")
        ({'batch_size': 2, 'norm': 'bn'}, [{'epoch': 1, 'test_error': 12.5}])
    """

    def __init__(self, root, study: str) -> None:
        if not isinstance(study, str) or not study or _UNSAFE.search(study):
            raise ValueError(f"RunStore: study={study!r} must be a non-empty name of letters, digits and ._+=-")
        self.root = Path(root)
        self.study = study
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"RunStore: root={str(self.root)!r} exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self._claim()

    def _claim(self) -> None:
        """Write the study marker, or check the one there; refuse a folder of something else."""
        marker = self.root / _MARKER
        if marker.exists():
            try:
                found = json.loads(marker.read_text()).get("study")
            except (OSError, ValueError, AttributeError):
                found = None
            if found != self.study:
                raise ValueError(
                    f"RunStore: {str(self.root)!r} holds the results of study {found!r} (see {_MARKER}), not of "
                    f"{self.study!r}: choose another output folder"
                )
            return
        visible = sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
        if visible:
            shown = ", ".join(visible[:5]) + (", ..." if len(visible) > 5 else "")
            raise ValueError(
                f"RunStore: {str(self.root)!r} is not empty ({shown}) and holds no {_MARKER}: it is not a normlab "
                f"results folder; choose an empty or new output folder for study {self.study!r}"
            )
        # written under a hidden name and renamed, so a concurrent reader (another rank) sees all of it or nothing
        tmp = self.root / f".{_MARKER}.tmp-{os.getpid()}"
        _write_json(tmp, {"study": self.study, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.replace(tmp, marker)

    def path(self, name: str) -> Path:
        """The final folder of run ``name``."""
        if not name or name.startswith(".") or _UNSAFE.search(name):
            raise ValueError(
                f"RunStore: run name={name!r} must be non-empty, not start with '.', and use only "
                "letters, digits and ._+=-"
            )
        return self.root / name

    def is_done(self, name: str) -> bool:
        """Whether run ``name`` finished (its final folder exists)."""
        return (self.path(name) / "config.json").is_file()

    def done_runs(self) -> list[str]:
        """Names of the finished runs, sorted."""
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and self.is_done(p.name))

    def load(self, name: str) -> tuple[dict, list[dict]]:
        """``(config, metrics)`` of the finished run ``name``: config.json and the rows of metrics.jsonl."""
        if not self.is_done(name):
            raise ValueError(f"RunStore: no finished run {name!r} in {str(self.root)!r}")
        folder = self.path(name)
        config = json.loads((folder / "config.json").read_text())
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return config, [json.loads(line) for line in lines if line.strip()]

    def load_env(self, name: str) -> dict:
        """env.json of the finished run ``name``."""
        if not self.is_done(name):
            raise ValueError(f"RunStore: no finished run {name!r} in {str(self.root)!r}")
        return json.loads((self.path(name) / "env.json").read_text())

    def stale(self) -> list[Path]:
        """Temporary folders left by runs whose process died (on this host; other hosts' are left alone)."""
        host, found = socket.gethostname(), []
        for p in self.root.iterdir():
            m = _TMP.match(p.name)
            if m and p.is_dir() and m["host"] == host and not _pid_alive(int(m["pid"])):
                found.append(p)
        return sorted(found)

    def clean_stale(self) -> list[str]:
        """Remove :meth:`stale` temporary folders; return the names of the runs they held (to be redone)."""
        names = []
        for p in self.stale():
            shutil.rmtree(p, ignore_errors=True)
            names.append(_TMP.match(p.name)["name"])
        return names

    @contextlib.contextmanager
    def run(self, name: str, config: dict, env: dict | None = None) -> Iterator[Run]:
        """Write run ``name``: yields a :class:`Run`; the folder gets its final name when the block completes.

        config.json (``config``) and env.json (``env``, default :func:`env_info` on CPU) are written first. On an
        exception the temporary folder is removed and the exception propagates: no final folder appears. If another
        process finished the same run meanwhile, its folder is kept and this one discarded, so a run never exists
        twice.

        Raises:
            ValueError: if run ``name`` is already finished.
        """
        final = self.path(name)
        if self.is_done(name):
            raise ValueError(f"RunStore: run {name!r} is already finished in {str(self.root)!r}")
        tmp = self.root / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        run = None
        try:
            _write_json(tmp / "config.json", config)
            _write_json(tmp / "env.json", env if env is not None else env_info())
            run = Run(name, tmp)
            yield run
            run._close()
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.is_done(name):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # finished by another process first: keep theirs
            _fsync_dir(self.root)
            run.dir = final
        except BaseException:
            if run is not None:
                run._metrics.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r}, study={self.study!r})"
