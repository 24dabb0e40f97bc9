"""What a person sees of a training run: one progress bar fed by the run's reports.

`TrainProgress` is the `on_report` listener of `pretrain()` and `finetune()`. In a terminal it draws one
tqdm bar (step / steps, loss, held-out bits per token or validation accuracy once evaluated, tokens/s and
the ETA). When the stream is not a terminal (a pipe, a log file, a test) a bar's carriage returns would
pile up into one unreadable line, so it prints a plain line instead, at most one per tenth of the run
(and the last step). With `json_lines` it prints every report as one JSON line, for scripts.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

from tqdm.auto import tqdm

PLAIN_LINES = 10
"""Without a terminal: at most this many progress lines per run, one per tenth of the steps."""


class TrainProgress:
    """Shows a run's reports (dicts with `step`, `loss`, `tokens_per_s` and, on evaluation steps,
    `eval_bits_per_token` or `val_accuracy`) as one bar, plain lines, or JSON lines.

    `steps` is the run's total step count. Reports may come from another thread (the metrics relay);
    use it as a context manager so the bar is closed when the run ends, fails or is interrupted."""

    def __init__(
        self,
        label: str,
        steps: int,
        *,
        json_lines: bool = False,
        stream: IO[str] | None = None,
        terminal: bool | None = None,
    ) -> None:
        self.label = label
        self.steps = steps
        self.json_lines = json_lines
        self.stream = stream if stream is not None else (sys.stdout if json_lines else sys.stderr)
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = terminal if terminal is not None else bool(isatty and isatty())
        self._bar: Any = None
        self._lock = threading.Lock()
        self._evaluated: str | None = None
        self._first: tuple[int, float] | None = None  # (step, time) of the first report seen
        self._next_line = 0  # the step from which the next plain line is due

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, metrics: dict[str, Any]) -> None:
        with self._lock:
            if self.json_lines:
                print(json.dumps(metrics, default=str), file=self.stream, flush=True)
                return
            step = int(metrics.get("step", 0))
            now = time.monotonic()
            if self._first is None:
                self._first = (step, now)
            evaluated = _evaluation(metrics)
            if evaluated is not None:
                self._evaluated = evaluated
            summary = self._summary(metrics)
            if self.terminal:
                self._draw(step, summary)
            elif step >= self._next_line or step >= self.steps:
                eta = self._eta(step, now)
                print(
                    f"{self.label}: step {step}/{self.steps} ({100 * step // max(self.steps, 1)}%) "
                    f"{summary}" + (f", ETA {_clock(eta)}" if eta is not None else ""),
                    file=self.stream,
                    flush=True,
                )
                interval = max(self.steps // PLAIN_LINES, 1)
                self._next_line = (step // interval + 1) * interval

    def close(self) -> None:
        """Closes the bar (it stays on screen at its last step); idempotent."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _draw(self, step: int, summary: str) -> None:
        if self._bar is None:
            # created at the first report, so its rate and ETA count training steps, not Ray's start-up
            self._bar = tqdm(
                total=self.steps,
                initial=step,
                desc=self.label,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                # tqdm puts ", " before the postfix itself
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}",
            )
        else:
            self._bar.update(max(step - self._bar.n, 0))
        self._bar.set_postfix_str(summary, refresh=True)

    def _summary(self, metrics: dict[str, Any]) -> str:
        parts = []
        if "loss" in metrics:
            parts.append(f"loss {float(metrics['loss']):.4f}")
        if self._evaluated is not None:
            parts.append(self._evaluated)
        if "tokens_per_s" in metrics:
            parts.append(f"{float(metrics['tokens_per_s']):,.0f} tokens/s")
        return ", ".join(parts)

    def _eta(self, step: int, now: float) -> float | None:
        if self._first is None or step <= self._first[0]:
            return None
        first_step, first_time = self._first
        return (now - first_time) / (step - first_step) * max(self.steps - step, 0)


def _evaluation(metrics: dict[str, Any]) -> str | None:
    """The held-out figure of an evaluation report, as shown beside the loss."""
    if "eval_bits_per_token" in metrics:
        return f"held-out {float(metrics['eval_bits_per_token']):.3f} bits/token"
    if "val_accuracy" in metrics:
        return f"val accuracy {float(metrics['val_accuracy']):.3f}"
    return None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
