"""Shared pieces of the benchmarks: machine and version info, timing, JSON and PNG writing.

Timing habits (gpt-fast, STYLE.md), kept in one place: :func:`measure` drops warm-up calls,
synchronizes the device before every clock read (:func:`now`) and reports the median of the
repeats; :class:`CallTimer` times the calls of something that runs inside a loop the benchmark does
not own (a processor inside ``generate``). Single operations on CUDA go through
``triton.testing.do_bench`` instead (:func:`time_fn`). Nothing here touches a device at import time,
and matplotlib (the optional ``bench`` extra) is imported only to draw.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from logitfuse.fileio import atomic_write, atomic_write_text

DEFAULT_OUT = "benchmarks/results"


# ------------------------------------------------------------------------------------ devices
def resolve_device(name: str | None) -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU; anything else as given (checked)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA but torch.cuda.is_available() is False; use --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ timing
def now(device: torch.device | None = None) -> float:
    """``time.perf_counter()`` after the work queued on ``device`` has finished (CUDA is asynchronous).

    >>> now(torch.device("cpu")) <= now()
    True
    """
    if device is not None:
        synchronize(device)
    return time.perf_counter()


def measure(fn: Callable[[], Any], device: torch.device | None = None, *, warmup: int = 1, repeat: int = 5,
            min_time_s: float = 0.0) -> dict[str, Any]:
    """Seconds per call of ``fn()``: the one timing helper of the benchmarks.

    ``warmup`` calls are made and dropped (caches, thread pools, lazy compilation), then ``fn`` runs
    ``repeat`` times (more while their total stays under ``min_time_s``, at most 1000), each call
    between two clock reads taken after synchronizing ``device`` (:func:`now`). Reports the median,
    the minimum and the maximum, the number of timed calls and every time.

    >>> calls = []
    >>> timing = measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeat=3)
    >>> len(calls), timing["n"], len(timing["times_s"]), timing["min_s"] <= timing["median_s"] <= timing["max_s"]
    (5, 3, 3, True)
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    started = now(device)
    while len(times) < repeat or (now() - started < min_time_s and len(times) < 1000):
        t0 = now(device)
        fn()
        times.append(now(device) - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times),
            "times_s": times}


class CallTimer:
    """Wraps a callable and records the seconds of each call (device synchronized around it).

    For time spent inside a loop the benchmark does not own (a processor's calls inside
    ``generate``, a backend's ``advance`` inside the processor): :attr:`times_s` per call,
    :attr:`seconds` in total.

    >>> double = CallTimer(lambda x: 2 * x)
    >>> double(3), double(4), len(double.times_s), double.seconds >= 0
    (6, 8, 2, True)
    """

    def __init__(self, fn: Callable[..., Any], device: torch.device | None = None):
        self.fn, self.device, self.times_s = fn, device, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = now(self.device)
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times_s.append(now(self.device) - t0)

    @property
    def seconds(self) -> float:
        return sum(self.times_s)

    @property
    def calls(self) -> int:
        return len(self.times_s)


def time_fn(fn: Callable[[], Any], device: torch.device, *, quick: bool = False) -> dict[str, Any]:
    """Median seconds of a single operation ``fn()`` (a kernel, a sampling step): on CUDA
    ``triton.testing.do_bench`` (which also flushes the L2 cache between calls), elsewhere :func:`measure`."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (10, 30) if quick else (25, 100)
        try:
            ms = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        except TypeError:  # older triton: quantiles only
            ms = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])
        ms = float(ms[0] if isinstance(ms, (list, tuple)) else ms)
        return {"median_s": ms / 1e3, "timer": "triton.testing.do_bench(median)"}
    out = measure(fn, device, warmup=1, repeat=3 if quick else 7, min_time_s=0.0 if quick else 0.5)
    out["timer"] = "perf_counter repeat loop (median)"
    return out


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, *, quick: bool = False) -> float:
    """Measured device-to-device copy bandwidth in bytes/s: ``dst.copy_(src)`` counts read + write."""
    n = nbytes // 4
    src = torch.randn(n, device=device) if device.type == "cuda" else torch.ones(n)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick=quick)["median_s"]
    return 2 * n * 4 / t


# ------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: host, CPU, GPU, load, library versions, git commit."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "versions": {name: _version(name) for name in ("torch", "triton", "transformers", "flashinfer-python", "logitfuse")},
    }
    info["versions"]["torch"] = torch.__version__
    try:
        info["loadavg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    try:
        root = Path(__file__).resolve().parents[1]  # benchmarks/common.py -> the repository
        info["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except Exception:
        info["git_commit"] = None
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line for RESULTS.md."""
    dev = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
    v = info["versions"]
    load = info.get("loadavg_1_5_15")
    load_s = f", load avg {load[0]:.1f}" if load else ""
    return f"{dev}; torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}{load_s}"


# ------------------------------------------------------------------------------------ output
def command_line(name: str, argv: list[str] | None) -> str:
    """The command a JSON records.

    >>> command_line("decode", ["--quick", "--threads", "1"])
    'logitfuse bench decode --quick --threads 1'
    """
    args = " ".join(argv) if argv else ""
    return f"logitfuse bench {name} {args}".strip()


def write_json(out_dir: str | os.PathLike, stem: str, payload: dict[str, Any]) -> Path:
    """``out_dir/stem.json``, written atomically, with the time of writing added."""
    payload.setdefault("written_utc", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return atomic_write_text(Path(out_dir) / f"{stem}.json", json.dumps(payload, indent=1, default=str) + "\n")


def report(args, name: str, argv: list[str] | None, started: float, machine: dict[str, Any], stem: str,
           result: dict[str, Any], plot: Callable[[dict[str, Any], Any, str], Path | None],
           columns: list[tuple[str, str]], **extra: Any) -> int:
    """Write the JSON (machine, command, wall time, ``extra``, ``result``) and the PNG, print the table."""
    stem += f"_{args.tag}" if args.tag else ""
    payload = {"benchmark": name, "command": command_line(name, argv), "quick": args.quick,
               "wall_s": round(time.perf_counter() - started, 1), "machine": machine,
               **extra, **result}
    path = write_json(args.out, stem, payload)
    png = None if args.no_plot else plot(result, args.out, stem)
    print(markdown_table(result["rows"], columns))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        return False


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 3.6):
    """A matplotlib figure with the Agg backend, or ``None`` when matplotlib is absent (the optional
    ``bench`` extra: ``pip install logitfuse[bench]``)."""
    if not have_matplotlib():
        return None, None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def plot_per_vocab_size(rows: list[dict], out_dir: str | os.PathLike, stem: str, *, impls, metric: str, ylabel: str,
                        title: str, keep=lambda row: True, hline: tuple[float, str] | None = None) -> Path | None:
    """One log-log panel per LLM input (dense, top-k): ``row[f"{impl}_{metric}"]`` against the
    vocabulary size, a line per implementation and batch size (``impls``: ``(name, style)`` pairs;
    ``keep`` filters rows; ``hline``: a reference level and its label). ``title`` is formatted with
    ``llm_kind``."""
    fig, axes = new_figure(ncols=2)
    if fig is None:
        return save_figure(fig, out_dir, stem)
    for ax, llm_kind in zip(axes, ("dense", "topk")):
        for impl, style in impls:
            key = f"{impl}_{metric}"
            for batch in sorted({r["B"] for r in rows}):
                pts = [(r["V"], r[key]) for r in rows if r["llm"] == llm_kind and r["B"] == batch and key in r and keep(r)]
                if pts:
                    ax.plot(*zip(*sorted(pts)), style, label=f"{impl} B={batch}", markersize=4)
        if hline is not None:
            ax.axhline(hline[0], color="k", lw=0.8, label=hline[1])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(ylabel)
        ax.set_title(title.format(llm_kind=llm_kind))
        ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, out_dir, stem)


def save_figure(fig, out_dir: str | os.PathLike, stem: str) -> Path | None:
    if fig is None:
        print("matplotlib not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return None
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(Path(out_dir) / f"{stem}.png", lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats printed with 3 significant digits, missing values as —.

    >>> print(markdown_table([{"B": 1, "ms": 0.123456}, {"B": 8}], [("B", "batch"), ("ms", "ms")]))
    | batch | ms |
    |---|---|
    | 1 | 0.123 |
    | 8 | — |
    """
    def fmt(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def add_common_args(parser, *, device: str = "auto") -> None:
    """The options every benchmark takes (``device``: the default of ``--device``)."""
    parser.add_argument("--quick", action="store_true", help="small grid for a CPU run in a few minutes")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON and PNG (default {DEFAULT_OUT})")
    parser.add_argument("--device", default=device, help=f"auto (CUDA when available), cpu or cuda[:N] (default {device})")
    parser.add_argument("--tag", default="", help="suffix of the output file names (keeps several runs apart)")
    parser.add_argument("--no-plot", action="store_true",
                        help="write the JSON only (redraw later with `logitfuse bench plot FILE.json`)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; `remote` gives llama.cpp as many). On a shared, loaded CPU, 1 avoids OpenMP "
                             "oversubscription, which can slow small ops 10-20x")


def setup(args) -> torch.device:
    """Apply ``--threads`` and resolve ``--device``; call before :func:`machine_info`."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)

