"""Pictures: SLO attainment against request rate for each system, and one request's per-layer timeline.

`python -m hma bench plots --attainment a.json b.json --out attainment.png`: the JSON of
`bench serve --goodput-search` runs (one curve each; --labels names them), of `plan` (one curve
per deployment) or of `bench systems` (one per system and trace; --trace picks one), each point a
rate the goodput search tried, with the 90% line goodput is read at. (bench systems stops a probe
once its verdict is decided and counts what it cancelled as missed, so its points are lower bounds
of the attainment; the verdict, above or below 90%, is exact.)
`python -m hma bench plots --timeline timeline.json --out timeline.png`: what the router's
GET /debug/timeline/<request id> returns; per layer, prefill compute (from the previous layer's
end) and the KV's transfer (computed on the prefill host -> landed on the decode host), and when
decoding started: the pipeline at work is transfer bars that overlap the compute bars after them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hma.bench.goodput import TARGET_ATTAINMENT


def attainment_curves(results: list[dict], labels: list[str] | None = None,
                      trace: str | None = None) -> dict[str, list[tuple[float, float]]]:
    """label -> (rate, attainment) points sorted by rate, from serve, plan and systems JSON results
    (systems: a curve per system, of `trace` only if given, named after the file's label if given,
    else its model)."""
    curves = {}
    for i, result in enumerate(results):
        if "systems" in result:  # bench systems: a curve per system and trace
            for system in result["systems"]:
                for t in system["traces"]:
                    if t["probes"] and trace in (None, t["trace"]):
                        name = labels[i] if labels and i < len(labels) else result['model'].removeprefix('random:')
                        label = f"{name} {system['label']} [{t['trace']}]"
                        curves[label] = sorted((p["rate"], p["slo_attainment"]) for p in t["probes"])
        elif "rows" in result:  # plan: a curve per deployment
            for row in result["rows"]:
                if row.get("tried"):
                    curves[row["deployment"]] = sorted((t["rate"], t["slo_attainment"]) for t in row["tried"])
        else:
            label = labels[i] if labels and i < len(labels) else f"{result['model']} @ {result['base_url']}"
            curves[label] = sorted((t["rate"], t["slo_attainment"]) for t in result["goodput_search"]["tried"])
    return curves


def plot_attainment(curves: dict[str, list[tuple[float, float]]], path: Path, title: str = "") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in curves.items():
        rates, values = zip(*points)
        ax.plot(rates, [100 * v for v in values], marker="o", label=label)
    ax.axhline(100 * TARGET_ATTAINMENT, color="grey", linestyle="--", linewidth=1)
    ax.set(xscale="log", xlabel="request rate (requests/s)", ylabel="SLO attainment (%)", ylim=(0, 102), title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(timeline: dict, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.patches import Patch
    t0 = timeline["begin_at"]
    layers = sorted(timeline["layers"])  # [layer, computed_at, landed_at]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.18 * len(layers)))
    previous = t0
    for layer, computed, landed in layers:
        ax.broken_barh([(1e3 * (previous - t0), 1e3 * (computed - previous))], (layer - 0.4, 0.35), color="tab:blue")
        ax.broken_barh([(1e3 * (computed - t0), 1e3 * max(landed - computed, 1e-6))], (layer, 0.35), color="tab:orange")
        previous = computed
    handles = [Patch(color="tab:blue", label="prefill compute (layer 0: from the request's begin)"),
               Patch(color="tab:orange", label="KV transfer (computed -> landed)")]
    if timeline.get("first_token_at"):
        handles.append(ax.axvline(1e3 * (timeline["first_token_at"] - t0), color="tab:green",
                                  label="first token on the decode host"))
    ax.set(xlabel="ms since the decode host asked for the prefill", ylabel="layer",
           title=f"request {timeline['request_id']}: {timeline['num_prompt_tokens']} prompt tokens, "
                 f"{timeline['kv_format']} KV")
    ax.invert_yaxis()
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files, no display
    import matplotlib.pyplot as plt

    return plt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hma bench plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attainment", type=Path, nargs="*", default=[], help="serve or plan JSON files")
    parser.add_argument("--labels", default="",
                        help="comma-separated names for the files' curves (systems files: before each system's)")
    parser.add_argument("--title", default="")
    parser.add_argument("--trace", default=None, help="systems files: only this trace's curves")
    parser.add_argument("--timeline", type=Path, default=None,
                        help="a /debug/timeline/<id> JSON, or a bench systems JSON with --system")
    parser.add_argument("--system", default=None, help="whose timeline in a bench systems JSON (hma, disagg-bf16)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if bool(args.attainment) == bool(args.timeline):
        parser.error("give --attainment files or one --timeline file")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.timeline:
        timeline = json.loads(args.timeline.read_text())
        if args.system:
            timeline = next(s["timeline"] for s in timeline["systems"] if s["system"] == args.system)
        plot_timeline(timeline, args.out)
    else:
        results = [json.loads(p.read_text()) for p in args.attainment]
        curves = attainment_curves(results, [x for x in args.labels.split(",") if x], args.trace)
        plot_attainment(curves, args.out, args.title)
    print(f"wrote {args.out}")
