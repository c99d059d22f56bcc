"""What a training run tells its user: rank 0's lines on the terminal and in RUN/log.txt (appended on resume, as the
official tool keeps one), and a progress bar up to the next status line when stderr is a terminal. Without a
terminal (a log file, a batch scheduler) only the plain lines are written: no bar, no carriage returns."""

from __future__ import annotations

import os
import sys
from typing import IO

LOG_FILE = "log.txt"


class RunLog:
    """log(line) prints on rank 0 and appends the line to RUN/log.txt; file_only=True writes the file alone (long
    details that would flood the terminal). Other ranks print nothing."""

    def __init__(self, run_dir: str | None, rank: int = 0, stream: IO[str] | None = None) -> None:
        self.rank, self.stream = rank, stream
        self.file = open(os.path.join(run_dir, LOG_FILE), "a") if rank == 0 and run_dir is not None else None
        self.progress: Progress | None = None  # cleared from the terminal before each line

    def __call__(self, line: str, file_only: bool = False, flush: bool = True) -> None:  # noqa: ARG002 (print's flush)
        if self.rank != 0:
            return
        if not file_only:
            if self.progress is not None:
                self.progress.clear()
            print(line, file=self.stream or sys.stdout, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Progress:
    """A tqdm bar of the images until the next status line, on rank 0 and only if stderr is a terminal."""

    def __init__(self, rank: int = 0, enabled: bool | None = None) -> None:
        self.enabled = rank == 0 and (sys.stderr.isatty() if enabled is None else enabled)
        self.bar = None

    def start(self, cur_nimg: int, next_status: int) -> None:
        if not self.enabled:
            return
        import tqdm

        self.clear()
        self.bar = tqdm.tqdm(total=max(next_status - cur_nimg, 0), unit="img", leave=False, dynamic_ncols=True,
                             desc=f"to kimg {next_status / 1e3:.1f}", file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def clear(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leave=False: the bar's line is erased
            self.bar = None
