"""Shared pieces of the benchmarks: machine and version info, timing, JSON and PNG writing.

Timing habits (gpt-fast, STYLE.md): warm-up iterations are dropped, the device is synchronized
before every clock read, medians are reported. On CUDA the kernel benchmarks use
``triton.testing.do_bench`` (median); on CPU a repeat loop around ``time.perf_counter``.
Nothing here touches a device at import time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

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
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ timing
def time_cpu(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5, min_time_s: float = 0.0,
             device: torch.device | None = None) -> dict[str, float]:
    """Median/min/max seconds of ``fn()`` over ``repeat`` calls after ``warmup`` dropped calls
    (more calls while the total stays under ``min_time_s``). Synchronizes ``device`` around each call."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start_all) < min_time_s and len(times) < 1000:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def time_fn(fn: Callable[[], Any], device: torch.device, *, quick: bool = False) -> dict[str, float]:
    """Median seconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, a repeat loop on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (10, 30) if quick else (25, 100)
        try:
            ms = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        except TypeError:  # older triton: quantiles only
            ms = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])
        ms = float(ms[0] if isinstance(ms, (list, tuple)) else ms)
        return {"median_s": ms / 1e3, "timer": "triton.testing.do_bench(median)"}
    out = time_cpu(fn, warmup=1, repeat=3 if quick else 7, min_time_s=0.0 if quick else 0.5, device=device)
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
    args = " ".join(argv) if argv else ""
    return f"logitfuse bench {name} {args}".strip()


def write_json(out_dir: str | os.PathLike, stem: str, payload: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    payload.setdefault("written_utc", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    return path


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


def save_figure(fig, out_dir: str | os.PathLike, stem: str) -> Path | None:
    if fig is None:
        print("matplotlib not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return None
    import matplotlib.pyplot as plt

    path = Path(out_dir) / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats printed with 3 significant digits."""
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


def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="small grid for a CPU run in a few minutes")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON and PNG (default {DEFAULT_OUT})")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    parser.add_argument("--tag", default="", help="suffix of the output file names (keeps several runs apart)")
    parser.add_argument("--no-plot", action="store_true",
                        help="write the JSON only (redraw later with `logitfuse bench plot FILE.json`)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a shared, loaded CPU, 1 avoids OpenMP "
                             "oversubscription, which can slow small ops 10-20x")


def setup(args) -> torch.device:
    """Apply ``--threads`` and resolve ``--device``; call before :func:`machine_info`."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def run_standalone(name: str, doc: str, add_args: Callable, execute: Callable, argv: list[str] | None) -> int:
    """``main()`` of a benchmark module run on its own (``python benchmarks/bench_NAME.py ...``):
    its parser (first paragraph of ``doc`` as the description), then ``execute(args, argv)``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=f"logitfuse bench {name}", description=doc.split("\n\n")[0])
    add_args(parser)
    return execute(parser.parse_args(argv), argv)
