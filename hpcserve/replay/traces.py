"""The traces the simulator replays, read from CSV and scaled to a site (pure once the rows are read).

Training side: the Alibaba GPU 2023 (openb) pod list (shared/traces/alibaba_gpu2023_openb_pods.csv).
- A pod with a start time and at least one GPU is a job; pods that never ran and 0-GPU pods are skipped.
- Size: a pod of g GPUs asks for g x ``gpu_scale`` GPUs (default: G, the site's GPUs per node, so each
  trace GPU becomes one whole node: the 1/2/4/8-GPU pods become 1/2/4/8-node jobs), as whole nodes
  (ceil(g x scale / G) nodes x G GPUs), or one node of g x scale GPUs when that is less than a node.
- Run time: ``duration_s`` (deletion - scheduling), cut to the training class's ``max_time`` (Slurm's
  time limit; the trace's still-running pods are right-censored anyway).
- Time: the replay takes the trace's last ``days x f`` days and compresses arrivals by f (run times kept),
  f chosen so that the offered load (GPU-seconds asked per second) is ``training_load`` x the GPUs of the
  site's training partition; f is never below 1 and never reaches past the trace's first pod.

Inference side, as a request rate over time (a ``RateCurve``), scaled later to the site's capacity:
- ServeGen ``servegen_total_rate_10min.csv``: one model's total rate per 10-minute window (14 days for
  the language models), linear between window midpoints, repeated after its span (14 days = two weeks,
  so weekdays line up). Token counts are not in that file: the means of the Azure 2023 conversation trace
  (``AZURE_CONV_TOKENS``) stand in.
- Per-request traces (Azure 2023 code/conv, Mooncake): replayed at their real timestamps (the arrivals of
  each replay step are the trace's own in that second, times the site's scale, repeated after the trace's
  span, ``arrival_times``); the rate curve (for scaling, the oracle and foresight) counts them per
  ``bin_s`` bin, linear between bin midpoints; the mean prompt and output tokens come from the file.
"""

from __future__ import annotations

import bisect
import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpcserve.errors import ValidationError

DAY_S = 86400.0
AZURE_CONV_TOKENS = (1155.0, 211.0)  # mean prompt, output tokens of azure_llm_2023_conv.csv (19,366 rows)
SERVEGEN_MODEL = "m-large"


@dataclass(frozen=True, slots=True)
class Pod:
    """One trace row that ran: when it was submitted, how long it ran, how many GPUs it held."""

    submit: float
    duration: float
    gpus: int


@dataclass(frozen=True, slots=True)
class TrainingJob:
    """One training job of the replay: seconds since the replay start, run time, and shape."""

    id: int
    submit: float
    duration: float
    nodes: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, slots=True)
class TrainingWorkload:
    jobs: tuple[TrainingJob, ...]  # in submit order
    compression: float  # trace seconds per replay second
    offered_gpus: float  # mean GPUs asked for over the replay (GPU-seconds / second)

    def gpus_submitted(self, start: float, end: float) -> float:
        """GPUs of the jobs submitted in (start, end]."""
        lo = bisect.bisect_right(self.jobs, start, key=lambda job: job.submit)
        hi = bisect.bisect_right(self.jobs, end, key=lambda job: job.submit)
        return float(sum(job.gpus for job in self.jobs[lo:hi]))


def read_pods(path: Path) -> list[Pod]:
    """The pods of an openb pod CSV that ran on GPUs, in submit order."""
    with _CsvRows(path, ("submit_time_s", "start_time_s", "duration_s", "num_gpus")) as rows:
        pods = [pod for row in rows if (pod := _pod(row)) is not None]
    return sorted(pods, key=lambda pod: pod.submit)


def _pod(row: dict[str, str]) -> Pod | None:
    gpus = int(float(row["num_gpus"] or 0))
    if gpus < 1 or not row["start_time_s"] or not row["duration_s"]:
        return None
    return Pod(float(row["submit_time_s"]), max(float(row["duration_s"]), 0.0), gpus)


def job_shape(pod_gpus: int, gpu_scale: int, per_node: int) -> tuple[int, int]:
    """(nodes, GPUs per node) of a pod of ``pod_gpus`` GPUs: whole nodes, or part of one."""
    gpus = pod_gpus * gpu_scale
    if gpus < per_node:
        return 1, gpus
    return math.ceil(gpus / per_node), per_node


def scale_training(
    pods: Sequence[Pod], *, days: float, per_node: int, gpu_scale: int, target_gpus: float, max_run_s: float
) -> TrainingWorkload:
    """The module docstring's scaling: shapes, time limit, and the window compressed to ``target_gpus``."""
    if not pods:
        return TrainingWorkload((), 1.0, 0.0)
    span = days * DAY_S
    end = pods[-1].submit
    work = [min(p.duration, max_run_s) * _gpus(p, gpu_scale, per_node) for p in pods]
    factor = _compression(pods, work, span, target_gpus)
    start = end - span * factor
    jobs: list[TrainingJob] = []
    for pod in pods:
        if pod.submit < start:
            continue
        nodes, gpn = job_shape(pod.gpus, gpu_scale, per_node)
        submit = min((pod.submit - start) / factor, span)
        jobs.append(TrainingJob(len(jobs), submit, min(pod.duration, max_run_s), nodes, gpn))
    offered = sum(job.duration * job.gpus for job in jobs) / span
    return TrainingWorkload(tuple(jobs), factor, offered)


def _gpus(pod: Pod, gpu_scale: int, per_node: int) -> int:
    nodes, gpn = job_shape(pod.gpus, gpu_scale, per_node)
    return nodes * gpn


def _compression(pods: Sequence[Pod], work: Sequence[float], span: float, target_gpus: float) -> float:
    """The smallest f >= 1 whose last ``span x f`` trace seconds offer ``target_gpus x span`` GPU-seconds;
    the whole trace when even that offers less."""
    end, need, total = pods[-1].submit, target_gpus * span, 0.0
    for index in range(len(pods) - 1, -1, -1):
        total += work[index]
        if total >= need:
            return max((end - pods[index].submit) / span, 1.0)
    return max((end - pods[0].submit) / span, 1.0)


@dataclass(frozen=True, slots=True)
class RateCurve:
    """Requests per second over time: linear between knots, repeated every ``period`` seconds, times
    ``scale``. ``times`` start at 0 and increase; the last knot joins the first of the next period."""

    times: tuple[float, ...]
    rates: tuple[float, ...]
    period: float
    scale: float = 1.0

    def scaled(self, scale: float) -> RateCurve:
        return RateCurve(self.times, self.rates, self.period, scale)

    def rate(self, t: float) -> float:
        local = t % self.period
        i = bisect.bisect_right(self.times, local) - 1
        t0, r0, t1, r1 = self._segment(i)
        return self.scale * (r0 + (r1 - r0) * (local - t0) / (t1 - t0))

    def peak(self, start: float, end: float) -> float:
        """The highest rate in [start, end]: at an end point or at a knot inside."""
        best = max(self.rate(start), self.rate(end))
        base = math.floor(start / self.period) * self.period
        while base < end:
            lo = bisect.bisect_right(self.times, start - base)
            hi = bisect.bisect_left(self.times, end - base)
            if lo < hi:
                best = max(best, self.scale * max(self.rates[lo:hi]))
            base += self.period
        return best

    def per_step(self, step: float, count: int) -> list[float]:
        """Requests arriving in each of ``count`` steps of ``step`` seconds from 0 (midpoint rule)."""
        return [self.rate((k + 0.5) * step) * step for k in range(count)]

    def _segment(self, i: int) -> tuple[float, float, float, float]:
        if i + 1 < len(self.times):
            return self.times[i], self.rates[i], self.times[i + 1], self.rates[i + 1]
        return self.times[i], self.rates[i], self.period, self.rates[0]


@dataclass(frozen=True, slots=True)
class InferenceWorkload:
    curve: RateCurve
    prompt_tokens: float
    output_tokens: float
    source: str
    arrival_times: tuple[float, ...] = ()  # a request trace's own arrivals (seconds, sorted); () for rates

    def per_step(self, step: float, count: int) -> list[float]:
        """Mean requests arriving in each of ``count`` steps: the real timestamps (repeated every curve
        period, times its scale) when the trace has them, else the rate curve's."""
        if not self.arrival_times:
            return self.curve.per_step(step, count)
        period = max(round(self.curve.period / step), 1)
        one = [0.0] * period
        for t in self.arrival_times:
            one[min(int(t // step), period - 1)] += self.curve.scale
        return [one[k % period] for k in range(count)]


def read_inference(path: Path, *, model: str = SERVEGEN_MODEL, bin_s: float = 60.0) -> InferenceWorkload:
    """A ServeGen total-rate file or a per-request trace (told apart by their columns)."""
    with _CsvRows(path, ()) as rows:
        header = rows.fieldnames or ()
        if "total_rate_rps" in header:
            return _servegen(rows, model, path)
        if "arrival_time_s" in header:
            return _requests(rows, bin_s, path)
    raise ValidationError(
        f"{path}: neither a ServeGen rate file (total_rate_rps) nor a request trace (arrival_time_s) "
        "(fix: pass servegen_total_rate_10min.csv or an Azure/Mooncake CSV)"
    )


def _servegen(rows: Iterable[dict[str, str]], model: str, path: Path) -> InferenceWorkload:
    windows = sorted(
        (float(row["window_start_s"]), float(row["total_rate_rps"])) for row in rows if row["model"] == model
    )
    if len(windows) < 2:
        raise ValidationError(f"{path}: no windows for model {model!r} (fix: use m-large, m-mid or m-small)")
    width = windows[1][0] - windows[0][0]
    curve = RateCurve(
        tuple(start - windows[0][0] + width / 2 for start, _ in windows),
        tuple(rate for _, rate in windows),
        len(windows) * width,
    )
    return InferenceWorkload(_from_zero(curve), *AZURE_CONV_TOKENS, f"{path.name} ({model})")


def _requests(rows: Iterable[dict[str, str]], bin_s: float, path: Path) -> InferenceWorkload:
    arrivals, prompt, output = [], 0.0, 0.0
    for row in rows:
        arrivals.append(float(row["arrival_time_s"]))
        prompt += float(row["prompt_tokens"])
        output += float(row["output_tokens"])
    if not arrivals:
        raise ValidationError(f"{path}: no requests")
    bins = [0] * (int(max(arrivals) // bin_s) + 1)
    for t in arrivals:
        bins[int(t // bin_s)] += 1
    curve = RateCurve(
        tuple((i + 0.5) * bin_s for i in range(len(bins))), tuple(n / bin_s for n in bins), len(bins) * bin_s
    )
    count = len(arrivals)
    return InferenceWorkload(
        _from_zero(curve), prompt / count, output / count, path.name, tuple(sorted(arrivals))
    )


def _from_zero(curve: RateCurve) -> RateCurve:
    """The same curve with a knot at 0, on the line from the last knot to the first one of the next period."""
    if curve.times[0] == 0:
        return curve
    last_gap = curve.period - curve.times[-1]
    weight = last_gap / (last_gap + curve.times[0])
    start = curve.rates[-1] + (curve.rates[0] - curve.rates[-1]) * weight
    return RateCurve((0.0, *curve.times), (start, *curve.rates), curve.period, curve.scale)


class _CsvRows:
    """A CSV ``DictReader`` over ``path`` that names the file in its errors."""

    def __init__(self, path: Path, required: Sequence[str]) -> None:
        self.path, self.required = path, required

    def __enter__(self) -> csv.DictReader[str]:
        try:
            self.handle = self.path.open(newline="")
        except OSError as exc:
            raise ValidationError(
                f"cannot read trace {self.path}: {exc.strerror} (fix: check the path)"
            ) from exc
        reader = csv.DictReader(self.handle)
        missing = [name for name in self.required if name not in (reader.fieldnames or ())]
        if missing:
            self.handle.close()
            raise ValidationError(
                f"{self.path}: missing columns {', '.join(missing)} (fix: pass an openb pod CSV)"
            )
        return reader

    def __exit__(self, *exc: object) -> None:
        self.handle.close()
