"""Folders of images: edit (or discover on) every image, resumable, split across processes by accelerate.

``localdiff edit --images DIR --out-dir OUT ...`` and ``localdiff discover --images DIR --out-dir OUT ...`` run
:func:`run_folder`. Each image's result is written as ``OUT/<name>.<suffix>`` through a temporary file, so an
output that exists is complete: a second run skips those images (and retries the failed ones). Every process
appends what it did to ``OUT/results.part-<rank>.csv`` as it goes; at the end the first process merges the parts
and the rows of earlier runs into ``OUT/results.csv`` (image, status, seconds, error), sorted by image.

Several processes: ``accelerate launch [--cpu] --num_processes N -m localdiff edit --images DIR ...``. Hugging Face
accelerate starts the processes and their process group (gloo on CPUs, NCCL on GPUs); :class:`Workers` gives each
process its share of the images (``PartialState.split_between_processes``) and the device of its rank.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from localdiff.errors import LocalDiffError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RESULT_FIELDS = ("image", "status", "seconds", "error")
RESULTS = "results.csv"


def list_images(folder: str | Path, what: str = "--images") -> list[Path]:
    """The PNG/JPEG files in ``folder``, sorted by name; one clear error if there are none, or if two would write
    the same output (``a.png`` and ``a.jpg``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LocalDiffError(f"{what} {folder} is not a folder; give a folder of PNG/JPEG images")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LocalDiffError(f"{what} {folder} holds no PNG/JPEG images")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise LocalDiffError(f"{seen[f.stem].name} and {f.name} in {folder} would both be written as {f.stem}; "
                                 f"rename one of them")
        seen[f.stem] = f
    return files


@dataclass
class Row:
    image: str
    status: str  # "ok" or "failed"
    seconds: float
    error: str = ""

    def as_csv(self) -> list[str]:
        return [self.image, self.status, f"{self.seconds:.3f}", self.error]


class Workers:
    """This process's place among the processes ``accelerate launch`` started (one process without it)."""

    def __init__(self):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate (or torchrun) with several processes
            from accelerate import PartialState

            self.state = PartialState()

    @property
    def rank(self) -> int:
        return self.state.process_index if self.state else 0

    @property
    def count(self) -> int:
        return self.state.num_processes if self.state else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """``requested`` for this process: a bare ``cuda`` becomes this process's own GPU under accelerate."""
        if self.state is not None and requested == "cuda":
            return str(self.state.device)
        return requested

    def share(self, items: list) -> list:
        """This process's contiguous share of ``items`` (all of them for one process)."""
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as mine:
            return list(mine)

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def pending(images: Sequence[Path], out_dir: Path, suffix: str) -> list[Path]:
    """The images whose output is not there yet."""
    return [f for f in images if not (out_dir / f"{f.stem}{suffix}").is_file()]


def _read_rows(path: Path) -> list[Row]:
    try:
        with open(path, newline="") as fh:
            return [Row(r["image"], r["status"], float(r["seconds"] or 0), r.get("error") or "")
                    for r in csv.DictReader(fh)]
    except (OSError, KeyError, ValueError):  # a part cut short by an interruption: its images are simply redone
        return []


def merge_results(out_dir: Path, images: Sequence[Path], suffix: str) -> list[Row]:
    """Merge ``results.csv`` and the processes' parts into ``results.csv`` (one row per image of ``images``, the
    newest row for each, sorted by name) and remove the parts. An image whose output exists but whose row was lost
    (an interrupted run) counts as done."""
    rows: dict[str, Row] = {r.image: r for r in _read_rows(out_dir / RESULTS)}
    parts = sorted(out_dir.glob("results.part-*.csv"))
    for part in parts:
        for r in _read_rows(part):
            rows[r.image] = r
    merged = []
    for f in images:
        row = rows.get(f.name)
        done = (out_dir / f"{f.stem}{suffix}").is_file()
        if done and (row is None or row.status != "ok"):
            row = Row(f.name, "ok", row.seconds if row else 0.0)
        if row is not None:
            merged.append(row)
    tmp = out_dir / f".{RESULTS}.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(RESULT_FIELDS)
        w.writerows(r.as_csv() for r in merged)
    tmp.replace(out_dir / RESULTS)
    for part in parts:
        part.unlink()
    return merged


# A batch job: the images' paths -> per image, a writer of its output or the exception that stopped it.
Job = Callable[[list[Path]], list["Callable[[Path], None] | Exception"]]


def run_folder(images: Sequence[Path], out_dir: Path, suffix: str, job: Job, *, batch_size: int = 8,
               workers: Workers | None = None, progress: bool = True, desc: str = "images") -> list[Row]:
    """Run ``job`` over the images whose output ``out_dir/<stem><suffix>`` is missing, ``batch_size`` at a time,
    this process's share only, and record every image in the results. Returns the merged rows of all images
    (after every process has finished).

    ``job(paths)`` returns, per path, either a writer ``write(path)`` that saves the result to the path given
    atomically (``save_image``, ``Directions.save``), or the exception that stopped that image (a bad image fails
    alone; the run goes on)."""
    workers = workers or Workers()
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = workers.share(pending(images, out_dir, suffix))
    part = out_dir / f"results.part-{workers.rank}.csv"
    bar = tqdm(total=len(todo), desc=desc if workers.count == 1 else f"{desc} [{workers.rank}]", unit="img",
               disable=not progress, position=workers.rank, leave=workers.count == 1)
    with open(part, "a", newline="") as fh:
        writer = csv.writer(fh)
        if fh.tell() == 0:
            writer.writerow(RESULT_FIELDS)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            t0 = time.perf_counter()
            try:
                results = job(batch)
            except (LocalDiffError, RuntimeError, OSError, ValueError) as exc:  # the whole batch failed
                results = [exc] * len(batch)
            each = (time.perf_counter() - t0) / len(batch)
            for path, result in zip(batch, results):
                t1 = time.perf_counter()
                if not isinstance(result, Exception):
                    try:
                        result(out_dir / f"{path.stem}{suffix}")
                    except (LocalDiffError, OSError, ValueError) as exc:
                        result = exc
                seconds = each + time.perf_counter() - t1
                if isinstance(result, Exception):
                    message = _one_line(result)
                    print(f"localdiff: {message if path.name in message else f'{path.name}: {message}'}",
                          file=sys.stderr)
                    writer.writerow(Row(path.name, "failed", seconds, message).as_csv())
                else:
                    writer.writerow(Row(path.name, "ok", seconds).as_csv())
                fh.flush()
            bar.update(len(batch))
    bar.close()
    workers.wait()
    if workers.is_main:
        merge_results(out_dir, images, suffix)
    workers.wait()
    return _read_rows(out_dir / RESULTS)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def summary(rows: Sequence[Row], images: Sequence[Path]) -> tuple[int, int, int]:
    """(done, failed, missing) over ``images``."""
    by_name = {r.image: r for r in rows}
    done = sum(1 for f in images if f.name in by_name and by_name[f.name].status == "ok")
    failed = sum(1 for f in images if f.name in by_name and by_name[f.name].status == "failed")
    return done, failed, len(images) - done - failed
