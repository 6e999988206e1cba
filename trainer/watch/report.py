"""``trainer report RUN_DIR``: one self-contained HTML page of a run, with its plots.

Writes ``RUN_DIR/report.html`` (every image embedded as a base64 PNG, no script or style from
the network, so it opens anywhere and can be mailed) and the same PNGs in ``RUN_DIR/report/``:

- loss and the task's first metric per epoch (train, validation; test at the end), the loss at every window;
- throughput over the run;
- each rank's step time split into data, compute and sync, and its sync time p50 and p95;
- each rank's CPU % and resident memory over time;
- starts, restarts, resumes and world-size changes marked on the axes;
- the config, the summary and the platform (``platform.json``).

It reads only what the run wrote (``rank<r>.jsonl``, ``metrics.csv``, ``summary.json``,
``config.json``, ``platform.json``), so it works on a run that is still going or that failed.
Needs matplotlib (``pip install 'trainer[report]'``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.core.errors import UsageError
from trainer.core.fileio import atomic_write_bytes, atomic_write_text
from trainer.lifecycle.rundir import headline_figures
from trainer.watch.machine import PLATFORM_FILE, render

SAMPLE_FILE = "sample.txt"  # what the trained model wrote (Task.sample_text), shown by the report

TIMINGS = ("data_ms", "compute_ms", "sync_ms")


@dataclass
class Attempt:
    """One start of the job's processes, from rank 0's ``first_step`` event."""

    time: float
    step: int
    restarts: int
    resumed_from_step: int | None
    world_size: int | None

    def label(self, first: bool) -> str:
        what = "start" if first else f"restart {self.restarts}" if self.restarts else "relaunch"
        if self.resumed_from_step is not None:
            what += f", resumed from step {self.resumed_from_step}"
        return what + (f", world size {self.world_size}" if self.world_size else "")


@dataclass
class Run:
    """What a run directory holds, read once."""

    path: Path
    config: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    platform: dict[str, Any] | None = None
    epochs: list[dict[str, float]] = field(default_factory=list)
    windows: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # rank -> window records
    ends: dict[int, dict[str, Any]] = field(default_factory=dict)  # rank -> its latest "end" event
    attempts: list[Attempt] = field(default_factory=list)
    t0: float = 0.0  # the first record's time: the time axes start here

    def seconds(self, record: dict[str, Any]) -> float:
        return record["time"] - self.t0


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a killed process
    return out


def load_run(run_dir: Path) -> Run:
    """Read a run directory; one without rank logs is not a run directory (``UsageError``)."""
    logs = sorted(run_dir.glob("rank*.jsonl"), key=lambda p: int(p.stem[4:]) if p.stem[4:].isdigit() else -1)
    logs = [p for p in logs if p.stem[4:].isdigit()]
    if not logs:
        raise UsageError(f"{run_dir} holds no rank<r>.jsonl; pass the --run-dir of a run that has trained")
    run = Run(run_dir, _json(run_dir / "config.json"), _json(run_dir / "summary.json"), _json(run_dir / PLATFORM_FILE))
    try:
        with (run_dir / "metrics.csv").open() as handle:
            run.epochs = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    except OSError:
        pass
    for path in logs:
        rank = int(path.stem[4:])
        records = _jsonl(path)
        run.windows[rank] = [r for r in records if "event" not in r and "time" in r]
        ends = [r for r in records if r.get("event") == "end"]
        if ends:
            run.ends[rank] = ends[-1]
        if rank == 0:
            run.attempts = [
                Attempt(r["time"], r["step"], r["restarts"], r.get("resumed_from_step"), r.get("world_size"))
                for r in records
                if r.get("event") == "first_step"
            ]
    times = [r["time"] for records in run.windows.values() for r in records] + [a.time for a in run.attempts]
    run.t0 = min(times, default=0.0)
    return run


def latest_by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the latest written: steps redone after a resume replace the first try."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


# -- plots ----------------------------------------------------------------------------------------
def over_time(run: Run, records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Seconds since the start and ``key`` of each record, broken (a NaN) where the processes restarted:
    no line is drawn across the time between two starts."""
    restarts = [a.time for a in run.attempts[1:]]
    xs: list[float] = []
    ys: list[float] = []
    for record in records:
        if xs and any(xs[-1] + run.t0 < t <= record["time"] for t in restarts):
            xs.append(float("nan"))
            ys.append(float("nan"))
        xs.append(run.seconds(record))
        ys.append(record.get(key, float("nan")))
    return xs, ys


def _mark_attempts(ax: Any, run: Run, on_time: bool) -> None:
    """Dashed lines where the processes (re)started, on a time axis or at the resumed step."""
    for index, attempt in enumerate(run.attempts):
        if index == 0 and not attempt.resumed_from_step:
            continue
        x = run.seconds({"time": attempt.time}) if on_time else (attempt.resumed_from_step or 0)
        ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(
            attempt.label(index == 0),
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color="tab:red",
        )


def first_metric(run: Run) -> str | None:
    """The task's first metric besides the loss (``accuracy`` for MNIST), from the epoch rows."""
    row = run.epochs[0] if run.epochs else {}
    names = [k.split("_", 1)[1] for k in row if k.startswith(("train_", "val_")) and not k.endswith("_loss")]
    return names[0] if names else None


def plot_epochs(run: Run, ax_loss: Any, ax_metric: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in run.epochs]
    metric = first_metric(run)
    panels = [(ax_loss, "loss"), *([(ax_metric, metric)] if metric else [])]
    for ax, name in panels:
        if all(f"train_{name}" in row for row in run.epochs):  # runs recorded before it was logged lack it
            ax.plot(epochs, [row[f"train_{name}"] for row in run.epochs], "o-", label="train")
        if all(f"val_{name}" in row for row in run.epochs):  # a task may have no validation split
            ax.plot(epochs, [row[f"val_{name}"] for row in run.epochs], "s-", color="tab:orange", label="validation")
        if run.summary and epochs and isinstance(run.summary.get(f"test_{name}"), (int, float)):
            ax.plot([epochs[-1]], [run.summary[f"test_{name}"]], "*", markersize=12, color="tab:green", label="test")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=name, title=f"{name} per epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    if not metric:
        ax_metric.set_axis_off()


def plot_step_loss(run: Run, ax: Any) -> None:
    per_rank = [latest_by_step(records) for records in run.windows.values()]
    steps = sorted({r["step"] for records in per_rank for r in records})
    losses = {step: [] for step in steps}
    for records in per_rank:
        for r in records:
            losses[r["step"]].append(r["loss"])
    ax.plot(steps, [sum(v) / len(v) for v in losses.values()], linewidth=1)
    _mark_attempts(ax, run, on_time=False)
    ax.set(xlabel="step", ylabel="loss", title="training loss per window (mean over ranks)")
    ax.grid(alpha=0.3)


def plot_throughput(run: Run, ax: Any) -> None:
    ax.plot(*over_time(run, run.windows.get(0, []), "samples_per_second"), ".-")
    _mark_attempts(ax, run, on_time=True)
    ax.set(xlabel="seconds since start", ylabel="samples / s", title="throughput (all ranks, per window)")
    ax.grid(alpha=0.3)


def plot_step_split(run: Run, ax: Any) -> None:
    ranks = sorted(run.windows)
    bottom = [0.0] * len(ranks)
    for name in TIMINGS:
        means = []
        for rank in ranks:
            records = run.windows[rank]
            means.append(sum(r[name] for r in records) / len(records) if records else 0.0)
        ax.bar([str(r) for r in ranks], means, bottom=bottom, label=name.removesuffix("_ms"))
        bottom = [b + m for b, m in zip(bottom, means, strict=True)]
    ax.set(xlabel="rank", ylabel="ms per step", title="step time split (mean of windows, all starts)")
    ax.legend()


def plot_sync(run: Run, ax_bars: Any, ax_time: Any) -> None:
    ranks = sorted(run.ends)
    width = 0.4
    for offset, q in ((-width / 2, 50), (width / 2, 95)):
        ax_bars.bar([r + offset for r in ranks], [run.ends[r][f"sync_ms_p{q}"] for r in ranks], width, label=f"p{q}")
    ax_bars.set_xticks(ranks, [str(r) for r in ranks])
    ax_bars.set(xlabel="rank", ylabel="ms", title="sync per step, last start's steps")
    ax_bars.legend()
    for rank, records in sorted(run.windows.items()):
        ax_time.plot(*over_time(run, records, "sync_ms_p95"), label=f"rank {rank}")
    _mark_attempts(ax_time, run, on_time=True)
    ax_time.set(xlabel="seconds since start", ylabel="ms", title="sync p95 per window")
    ax_time.legend()
    ax_time.grid(alpha=0.3)


def plot_resources(run: Run, ax_cpu: Any, ax_rss: Any) -> None:
    """CPU, and memory as RSS (solid: counts the shared libraries and mapping in every rank) beside
    USS (dashed: what the rank alone holds), one colour per rank."""
    for rank, records in sorted(run.windows.items()):
        (line,) = ax_cpu.plot(*over_time(run, records, "cpu_percent"), label=f"rank {rank}")
        ax_rss.plot(*over_time(run, records, "rss_mb"), color=line.get_color(), label=f"rank {rank} RSS")
        if any("uss_mb" in record for record in records):  # rank logs of earlier versions have none
            uss = over_time(run, records, "uss_mb")
            ax_rss.plot(*uss, color=line.get_color(), linestyle="--", label=f"rank {rank} USS")
    for ax, label, title in ((ax_cpu, "CPU % (100 = one core)", "CPU"), (ax_rss, "MB", "memory (RSS, USS)")):
        _mark_attempts(ax, run, on_time=True)
        ax.set(xlabel="seconds since start", ylabel=label, title=f"{title} per rank")
        ax.legend()
        ax.grid(alpha=0.3)


def figures(run: Run) -> dict[str, bytes]:
    """Every plot of the report as PNG bytes, by file stem, in page order."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("trainer report needs matplotlib; install it with pip install 'trainer[report]'") from None
    layouts = [
        ("epochs", 2, lambda axes: plot_epochs(run, *axes)),
        ("step-loss", 1, lambda axes: plot_step_loss(run, *axes)),
        ("throughput", 1, lambda axes: plot_throughput(run, *axes)),
        ("step-time", 1, lambda axes: plot_step_split(run, *axes)),
        ("sync", 2, lambda axes: plot_sync(run, *axes)),
        ("resources", 2, lambda axes: plot_resources(run, *axes)),
    ]
    out = {}
    for stem, panels, draw in layouts:
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels if panels > 1 else 9, 3.6), squeeze=False)
        draw(list(axes[0]))
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        plt.close(fig)
        out[stem] = buffer.getvalue()
    return out


# -- the page -------------------------------------------------------------------------------------
def _table(values: dict[str, Any] | None, missing: str) -> str:
    if not values:
        return f"<p><em>{html.escape(missing)}</em></p>"
    rows = []
    for key, value in sorted(values.items()):
        text = f"{value:.6g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else value
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(text))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


# Sets the title once the page has loaded: whether every image decoded (a headless browser reads it).
CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.title = "report loaded: " + decoded + " of " + images.length + " images decoded";
});
</script>"""

STYLE = """<style>
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
table { border-collapse: collapse; font-size: 0.85em; } th, td { padding: 2px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; font-weight: normal; color: #555; } .cols { display: flex; gap: 2em; flex-wrap: wrap; }
pre { font-size: 0.8em; background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
</style>"""

CAPTIONS = {
    "epochs": "Loss and the task's metric per epoch",
    "step-loss": "Loss per window",
    "throughput": "Throughput",
    "step-time": "Step time per rank",
    "sync": "Gradient sync per rank",
    "resources": "CPU and memory per rank",
}


def page(run: Run, pngs: dict[str, bytes]) -> str:
    """The HTML of the report, images inline."""
    summary = run.summary
    headline = (
        (f"{summary['task']}: " if "task" in summary else "")
        + f"{headline_figures(summary)}, {summary['global_step']} steps at world size "
        f"{summary['world_size']}, {summary['samples_per_second']:.0f} samples/s"
        + (f", {summary['tokens_per_second']:.0f} tokens/s" if summary.get("tokens_per_second") else "")
        + (f", MFU {summary['mfu']:.1%}" if summary.get("mfu") else "")
        + f", {summary['restarts']} restarts"
        + (f", peak USS {summary['peak_uss_mb']:.0f} MB per rank" if "peak_uss_mb" in summary else "")
        if summary
        else "no summary.json: the run has not finished"
    )
    starts = "; ".join(
        f"{a.label(i == 0)} at {run.seconds({'time': a.time}):.1f} s" for i, a in enumerate(run.attempts)
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Training report: {html.escape(run.path.name)}</title>",
        STYLE,
        CHECK_SCRIPT,
        "</head><body>",
        f"<h1>Training report: {html.escape(str(run.path))}</h1>",
        f"<p>{html.escape(headline)}</p>",
        f"<p>Starts: {html.escape(starts or 'none recorded')}</p>",
    ]
    for stem, png in pngs.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{CAPTIONS[stem]}</h2><img alt='{stem}' src='data:image/png;base64,{data}'>")
    platform_text = render(run.platform, None, "recorded by the run") if run.platform else "no platform.json"
    try:  # a text the trained model wrote (a language model's sample), if the task gives one
        sample = (run.path / SAMPLE_FILE).read_text()
        parts.append(f"<h2>A sample from the trained model</h2><pre class='sample'>{html.escape(sample)}</pre>")
    except OSError:
        pass
    parts += [
        "<h2>Summary and config</h2><div class='cols'>",
        f"<div>{_table(summary, 'no summary.json')}</div><div>{_table(run.config, 'no config.json')}</div></div>",
        f"<h2>Platform</h2><pre>{html.escape(platform_text)}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(run_dir: Path) -> Path:
    """Write ``report.html`` and ``report/*.png`` into ``run_dir``; returns the page's path."""
    run = load_run(run_dir)
    pngs = figures(run)
    for stem, png in pngs.items():
        atomic_write_bytes(run_dir / "report" / f"{stem}.png", png)
    path = run_dir / "report.html"
    atomic_write_text(path, page(run, pngs))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trainer report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="The run directory (--run-dir of the run).")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = write_report(Path(args.run_dir))
    except UsageError as exc:
        print(f"trainer report: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path} (plots in {path.parent / 'report'})")
