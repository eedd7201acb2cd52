"""Draw PNG plots (and print Markdown tables) from the suite's results files.

    python benchmarks/plot.py [benchmarks/results/*.json] [--out DIR] [--markdown]

Per results file ``<device>-<yyyymmdd>.json`` it writes, next to it (or into ``--out``):
- ``<stem>-kernel-<shape>-<head>.png``: median time and peak memory rise per implementation, per mode;
- ``<stem>-e2e.png``: tokens/s and peak memory per path for each end-to-end config (and the largest batch);
- ``<stem>-rss.png``: the CPU host-memory benchmark (peak RSS rise per impl);
- ``<stem>-layouts-<config>-<attn>.png``: a T-SPIN step with padded / packed / shared-prefix batches per r = P/L;
- ``<stem>-loss-paths.png``: the interleaved CPU comparison of the loss paths (min time, RSS rise per peer).
``--markdown`` prints the tables the README shows (time, memory, TFLOP/s, speed-up vs the fastest peer).

    python benchmarks/plot.py FILE... --shapes-figure OUT.png [--mode fwd_bwd] [--head trainable]

draws one figure instead: the median time of every implementation at every shape the files hold (one run split
over several files, e.g. one file per shape), for one mode and head.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OURS = ("default", "triton", "triton_mm", "triton_fused", "torch", "torch_recompute")
PEERS = ("naive", "compile", "cce", "liger")  # exact gradients: "fastest peer" is taken over these
APPROX = ("cce_filter",)  # CCE's default gradient filtering (approximate gradients), shown but not the baseline
IMPL_ORDER = OURS + PEERS + APPROX
MODES = ("forward", "backward", "fwd_bwd")


def load(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        stats = b.get("stats") or {}
        info["median_s"] = stats.get("median")
        info["name"] = b.get("name")
        rows.append(info)
    return rows


def _mib(x):
    return None if x is None else x / 2**20


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def kernel_rows(rows):
    return [r for r in rows if r.get("mode") in MODES and r.get("impl") in IMPL_ORDER
            and not str(r.get("shape", "")).startswith("rss-") and r.get("suite") != "loss_paths"]


def loss_path_rows(rows):
    return [r for r in rows if r.get("suite") == "loss_paths"]


def _bars(ax, groups, impls, values, ylabel, title, log=True):
    import numpy as np

    x = np.arange(len(groups))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        ys = [values.get((g, impl)) for g in groups]
        ax.bar(x + i * width - 0.4 + width / 2, [y if y is not None else 0 for y in ys], width, label=impl)
    ax.set_xticks(x, groups)
    if log and any(v for v in values.values()):
        ax.set_yscale("log")  # kernel peers differ by orders of magnitude
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(path: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(path)
    written = []
    by = defaultdict(list)
    for r in kernel_rows(rows):
        by[(r["shape"], r["head"])].append(r)
    for (shape, head), rs in sorted(by.items()):
        impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rs)]
        t = {(r["mode"], r["impl"]): (r["median_s"] or 0) * 1e3 for r in rs if r.get("median_s")}
        m = {(r["mode"], r["impl"]): _mib(r.get("peak_mem_bytes")) for r in rs if r.get("peak_mem_bytes") is not None}
        ncols = 2 if m else 1
        fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 3.8), squeeze=False)
        dev = rs[0].get("device")
        _bars(axes[0][0], MODES, impls, t, "median time (ms)", f"{shape}, head {head}: time ({dev})")
        if m:
            _bars(axes[0][1], MODES, impls, m, "peak memory rise (MiB)", f"{shape}, head {head}: memory")
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, out_dir / f"{path.stem}-kernel-{shape}-{head}.png"))

    e2e = [r for r in rows if r.get("mode") in ("train_step", "max_batch")]
    if e2e:
        labels = [f"{r['shape'].removesuffix('-e2e')} B={r.get('B')}" + (" (max)" if r["mode"] == "max_batch" else "")
                  for r in e2e]
        groups = sorted(set(labels), key=labels.index)
        paths = sorted({r["impl"] for r in e2e})
        tps = {(lab, r["impl"]): r.get("tokens_per_s") for lab, r in zip(labels, e2e)}
        mem = {(lab, r["impl"]): _mib(r.get("peak_mem_bytes")) for lab, r in zip(labels, e2e)}
        has_mem = any(v is not None for v in mem.values())
        fig, axes = plt.subplots(1, 1 + has_mem, figsize=(6 * (1 + has_mem), 3.8), squeeze=False)
        _bars(axes[0][0], groups, paths, tps, "tokens/s", f"end-to-end T-SPIN step ({e2e[0].get('device')})",
              log=False)
        if has_mem:
            _bars(axes[0][1], groups, paths, mem, "peak memory (MiB)", "end-to-end peak memory", log=False)
        for ax in axes[0]:
            ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, out_dir / f"{path.stem}-e2e.png"))

    written += _plot_layouts(rows, path, out_dir)
    lp = loss_path_rows(rows)
    if lp:
        shapes = sorted({r["shape"] for r in lp}, key=[r["shape"] for r in lp].index)
        impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in lp)]
        t = {(r["shape"], r["impl"]): r.get("min_s") for r in lp}
        m = {(r["shape"], r["impl"]): _mib(r.get("peak_mem_bytes")) for r in lp}
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), squeeze=False)
        _bars(axes[0][0], shapes, impls, t, "min time over interleaved rounds (s)",
              f"T-SPIN loss fwd+bwd, trainable fp32 head, 1 thread ({lp[0].get('device')})", log=False)
        _bars(axes[0][1], shapes, impls, m, "peak RSS rise (MiB)", "host memory (fresh process)", log=False)
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, out_dir / f"{path.stem}-loss-paths.png"))

    rss = [r for r in rows if str(r.get("shape", "")).startswith("rss-")]
    if rss:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar([r["impl"] for r in rss], [_mib(r["peak_mem_bytes"]) for r in rss])
        ax.set_ylabel("peak RSS rise (MiB)")
        ax.set_title(f"{rss[0]['shape']} fwd+bwd, host memory", fontsize=9)
        written.append(_save(fig, out_dir / f"{path.stem}-rss.png"))
    return written


LAYOUTS = ("padded", "packed", "shared_prefix")


def layout_rows(rows):
    """One row per (record, layout) from the layout benchmark's records (their ``layouts`` dict)."""
    out = []
    for r in rows:
        if r.get("mode") != "layout_step":
            continue
        for layout in LAYOUTS:
            one = (r.get("layouts") or {}).get(layout)
            if one is not None:
                out.append(dict(r, layout=layout, **one, is_shared=layout == "shared_prefix"))
    return out


def _plot_layouts(rows, path: Path, out_dir: Path) -> list[Path]:
    """``<stem>-layouts-<config>-<attn>.png``: step time, backbone tokens and peak memory per layout and r."""
    import matplotlib.pyplot as plt

    written = []
    by = defaultdict(list)
    for r in layout_rows(rows):
        by[(r["config"], r["attn"])].append(r)
    for (config, attn), rs in sorted(by.items()):
        groups = [f"r={x}" for x in sorted({r["r"] for r in rs})]
        key = lambda r: (f"r={r['r']}", r["layout"])  # noqa: E731
        panels = [("median step time (s)", {key(r): r.get("step_seconds") for r in rs}),
                  ("backbone tokens", {key(r): r.get("backbone_tokens") for r in rs}),
                  ("peak memory (MiB)", {key(r): _mib(r.get("peak_mem_bytes")) for r in rs})]
        panels = [p for p in panels if any(v is not None for v in p[1].values())]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for ax, (label, values) in zip(axes[0], panels):
            _bars(ax, groups, LAYOUTS, values, label, f"T-SPIN step, {config} ({attn}, {rs[0].get('device')})",
                  log=False)
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, out_dir / f"{path.stem}-layouts-{config}-{attn}.png"))
    return written


def _layout_markdown(rows) -> list[str]:
    rs = layout_rows(rows)
    if not rs:
        return []
    out = ["| config | attn | r = P/L | layout | step s (median) | backbone tokens | tokens / packed "
           "| (P+3L)/(3P+3L) | speed-up vs packed | vs padded | peak mem MiB | load avg (1 min) |", "|---" * 12 + "|"]
    for r in sorted(rs, key=lambda r: (r["config"], r["attn"], r["r"], LAYOUTS.index(r["layout"]))):
        load = r.get("load_avg_before") or [None]
        shared = r["is_shared"]
        out.append(f"| {r['config']} | {r['attn']} | {r['r']} | {r['layout']} | {_fmt(r.get('step_seconds'))} | "
                   f"{r.get('backbone_tokens')} | {_fmt(r.get('tokens_vs_packed'), '.3f')} | "
                   f"{_fmt(r.get('token_ratio_formula'), '.3f')} | "
                   f"{_fmt(r.get('speedup_vs_packed') if shared else None, '.2f')} | "
                   f"{_fmt(r.get('speedup_vs_padded') if shared else None, '.2f')} | "
                   f"{_fmt(_mib(r.get('peak_mem_bytes')), '.0f')} | {_fmt(load[0], '.1f')} |")
    return out + [""]


def markdown(path: Path) -> str:
    rows = load(path)
    out = [f"### {path.name}", ""]
    data = json.loads(path.read_text())
    runs = data.get("tspin_runs") or [data.get("tspin") or (rows[0] if rows else {})]
    for prov in runs:  # a file can accumulate several runs (parts of a suite, a re-measured peer)
        pk = {k: v for k, v in (prov.get("packages") or {}).items() if v}
        out.append(f"- run {prov.get('datetime') or ''}: device `{prov.get('device')}`, torch `{prov.get('torch')}`, "
                   f"triton `{prov.get('triton')}`, commit `{prov.get('commit')}`"
                   + (f", {pk}" if pk else "") + (f", env {prov['env']}" if prov.get("env") else ""))
    out.append("")
    peak = [r for r in rows if r.get("impl") == "matmul_peak"]
    if peak:
        out += [f"dense matmul peak in this run: {_fmt(peak[0].get('tflops'))} TFLOP/s ({peak[0].get('shape')})", ""]
    kr = kernel_rows(rows)
    if kr:
        out += ["| shape | head | mode | impl | median ms | peak mem rise MiB | TFLOP/s "
                "| speed-up vs fastest exact peer | naive mem / this |", "|---|---|---|---|---|---|---|---|---|"]
        idx = {(r["shape"], r["head"], r["mode"], r["impl"]): r for r in kr}
        for shape, head, mode in sorted({k[:3] for k in idx}, key=lambda k: (k[0], k[1], MODES.index(k[2]))):
            peer_t = [idx[(shape, head, mode, p)]["median_s"] for p in PEERS
                      if (shape, head, mode, p) in idx and idx[(shape, head, mode, p)]["median_s"]]
            best = min(peer_t) if peer_t else None
            for impl in IMPL_ORDER:
                r = idx.get((shape, head, mode, impl))
                if r is None:
                    continue
                t, mem = r["median_s"], r.get("peak_mem_bytes")
                speed = best / t if (best and t and impl in OURS) else None
                naive_mem = idx.get((shape, head, mode, "naive"), {}).get("peak_mem_bytes")
                mem_ratio = naive_mem / mem if (naive_mem and mem and impl in OURS) else None
                out.append(f"| {shape} | {head} | {mode} | {impl} | {_fmt(t and t * 1e3)} | "
                           f"{_fmt(_mib(mem), '.1f')} | {_fmt(r.get('tflops'))} | "
                           f"{_fmt(speed, '.2f')} | {_fmt(mem_ratio, '.1f')} |")
        out.append("")
    e2e = [r for r in rows if r.get("mode") in ("train_step", "max_batch")]
    if e2e:
        out += ["| config | path | mode | B | tokens/s | step s | peak mem GiB | largest batch |",
                "|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            pk = r.get("peak_mem_bytes")
            out.append(f"| {r['shape']} | {r['impl']} | {r['mode']} | {r.get('B')} | {_fmt(r.get('tokens_per_s'))} | "
                       f"{_fmt(r.get('step_seconds'))} | {_fmt(pk and pk / 2**30)} | "
                       f"{r.get('max_batch_triplets', '-')} |")
        out.append("")
    out += _layout_markdown(rows)
    lp = loss_path_rows(rows)
    if lp:
        out += ["| shape | impl | units done | min s | median s | rounds | torch / this (time) | RSS rise MiB "
                "| RSS / naive | load avg before, after |", "|---|---|---|---|---|---|---|---|---|---|"]
        idx = {(r["shape"], r["impl"]): r for r in lp}
        for shape in sorted({r["shape"] for r in lp}, key=[r["shape"] for r in lp].index):
            naive_mem = idx.get((shape, "naive"), {}).get("peak_mem_bytes")
            for impl in IMPL_ORDER:
                r = idx.get((shape, impl))
                if r is None:
                    continue
                mem = r.get("peak_mem_bytes")
                ratio = (r.get("time_ratio_vs") or {}).get("torch")
                loadavg = f"{r['load_before'][0]:.1f}, {r['load_after'][0]:.1f}" if r.get("load_before") else "-"
                out.append(f"| {shape} | {impl} | {_fmt(r.get('path_units'))} | {_fmt(r.get('min_s'))} | "
                           f"{_fmt(r.get('median_s'))} | {len(r.get('rounds_s') or [])} | "
                           f"{_fmt(ratio and 1 / ratio, '.3f')} | {_fmt(_mib(mem), '.0f')} | "
                           f"{_fmt(mem / naive_mem if mem and naive_mem else None, '.3f')} | {loadavg} |")
        out.append("")
    rss = [r for r in rows if str(r.get("shape", "")).startswith("rss-")]
    if rss:
        out += ["| host-memory benchmark | impl | peak RSS rise MiB | ratio to reference |", "|---|---|---|---|"]
        for r in rss:
            out.append(f"| {r['shape']} | {r['impl']} | {_fmt(_mib(r['peak_mem_bytes']), '.0f')} | "
                       f"{_fmt(r.get('rise_ratio_vs_reference'), '.3f')} |")
        out.append("")
    return "\n".join(out)


def shapes_figure(files: list[Path], out: Path, mode: str = "fwd_bwd", head: str = "trainable") -> Path:
    """Median time per implementation at every shape in ``files`` (kernel records of one mode and head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for f in files for r in kernel_rows(load(f))
            if r["mode"] == mode and r["head"] == head and r.get("median_s")]
    if not rows:
        raise SystemExit(f"--shapes-figure: no {mode} / {head} kernel records in {[str(f) for f in files]}")
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows)]
    t = {(r["shape"], r["impl"]): r["median_s"] * 1e3 for r in rows}
    fig, ax = plt.subplots(figsize=(11, 4.2))
    _bars(ax, shapes, impls, t, "median time (ms)", f"T-SPIN loss, {mode}, head {head} ({rows[0].get('device')})")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="PNG plots and Markdown tables from benchmarks/results/*.json")
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to each file)")
    p.add_argument("--markdown", action="store_true", help="print the Markdown tables too")
    p.add_argument("--shapes-figure", type=Path, default=None, metavar="PNG",
                   help="one figure: every implementation's time at every shape in FILES (one mode and head)")
    p.add_argument("--mode", default="fwd_bwd", choices=MODES)
    p.add_argument("--head", default="trainable", choices=("trainable", "frozen"))
    a = p.parse_args(argv)
    if a.shapes_figure is not None:
        if not a.files:
            p.error("--shapes-figure needs the results FILES to draw from")
        print(shapes_figure(a.files, a.shapes_figure, a.mode, a.head))
        return 0
    # other JSON lives there too (kernel_resources, the FSDP/LoRA check): only pytest-benchmark files are plotted
    files = a.files or [f for f in sorted(RESULTS.glob("*.json")) if "benchmarks" in json.loads(f.read_text())]
    if not files:
        print(f"no results files under {RESULTS}", file=sys.stderr)
        return 1
    for f in files:
        out_dir = a.out or f.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        for png in plot_file(f, out_dir):
            print(png)
        if a.markdown:
            print(markdown(f))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
