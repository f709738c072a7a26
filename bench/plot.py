"""Draw the median time of each contender, one horizontal bar chart per workload, from a benchmark JSON file.

    python bench/plot.py [bench/results/latest.json] [-o docs/img/bench.png]

Reads the pytest-benchmark JSON that ``python -m bench`` writes, groups its rows
by workload and contender as ``bench/report.py`` does, and writes a PNG with
matplotlib (Agg backend: no display needed). The time axis is logarithmic,
since one workload's contenders can differ by a factor of several hundred;
each bar is labelled with its median. mmexec's rows are drawn in a second colour.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, run as a script or as bench.plot

import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = ROOT / "bench" / "results" / "latest.json"
DEFAULT_OUTPUT = ROOT / "docs" / "img" / "bench.png"
#: Colours: the other contenders, and mmexec's rows (MemmapExecutor, its map, mmexec.Parallel, DaskExecutor).
OTHER, MMEXEC = "#9e9e9e", "#1f77b4"
COLUMNS = 2


def is_mmexec(contender: str) -> bool:
    return contender.startswith("mmexec")


def ordered_workloads(groups: dict[str, report.Group]) -> list[str]:
    return [w for w in report.WORKLOADS if w in groups] + sorted(w for w in groups if w not in report.WORKLOADS)


def ordered_rows(group: report.Group) -> list[report.Row]:
    keys = [k for k in report.ORDER if k in group] + sorted(k for k in group if k not in report.ORDER)
    return [group[k] for k in keys]


def tick(seconds: float) -> str:
    """An axis label for a power of ten seconds: 1 µs ... 100 ms, 1 s, 10 s, ..."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale * 0.999:
            return f"{seconds / scale:g} {unit}"
    return f"{seconds:g} s"


def subtitle(data: dict[str, Any], source: str) -> str:
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    cpu = machine.get("cpu", {})
    dirty = " (dirty)" if commit.get("dirty") else ""
    return (
        f"{source}: run of {data.get('datetime', '?')[:19].replace('T', ' ')} UTC, "
        f"commit {commit.get('id', '?')[:7]}{dirty}; {cpu.get('brand_raw') or machine.get('processor') or '?'}, "
        f"{cpu.get('count', '?')} CPUs, Python {machine.get('python_version', '?')}. "
        "Median time per contender, log scale; lower is better; mmexec's rows in blue."
    )


def draw(groups: dict[str, report.Group], data: dict[str, Any], source: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    workloads = ordered_workloads(groups)
    columns = min(COLUMNS, len(workloads))
    rows_per_line = [workloads[i:i + columns] for i in range(0, len(workloads), columns)]
    heights = [max(len(groups[w]) for w in line) + 1.6 for line in rows_per_line]
    fig, axes = plt.subplots(
        len(rows_per_line), columns, figsize=(7.5 * columns, 0.34 * sum(heights) + 1.0),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )
    for line, ax_line in zip(rows_per_line, axes, strict=False):
        for ax, workload in zip(ax_line, [*line, None], strict=False):
            if workload is None:
                ax.axis("off")
                continue
            rows = ordered_rows(groups[workload])
            medians = [r.median for r in rows]
            y = range(len(rows))
            ax.barh(list(y), medians, color=[MMEXEC if is_mmexec(r.contender) else OTHER for r in rows])
            ax.set_yticks(list(y), [r.label for r in rows], fontsize=8)
            ax.invert_yaxis()
            ax.set_xscale("log")
            low, high = min(medians), max(medians)
            ax.set_xlim(10 ** math.floor(math.log10(low) - 0.3), high * 12)
            for i, value in enumerate(medians):
                ax.text(value * 1.08, i, report.fmt_time(value), va="center", fontsize=7.5)
            ax.set_title("\n".join(textwrap.wrap(report.title(workload, groups[workload]), 72)), fontsize=8.5,
                         loc="left")
            ax.xaxis.set_major_locator(LogLocator(base=10))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: tick(x)))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="x", labelsize=7.5)
            ax.set_xlabel("median time (log scale)", fontsize=7.5)
            ax.grid(axis="x", which="major", linewidth=0.4, alpha=0.5)
    fig.suptitle("\n".join(textwrap.wrap(subtitle(data, source), 75 * columns)), fontsize=9.5)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", default=str(DEFAULT_INPUT),
                        help="file written by python -m bench (default: bench/results/latest.json)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT),
                        help="PNG to write (default: docs/img/bench.png)")
    args = parser.parse_args(argv)
    groups, data = report.load(args.json)
    if not groups:
        print("no benchmarks in", args.json, file=sys.stderr)
        return 1
    output = Path(args.output)
    draw(groups, data, Path(args.json).name, output)
    print(f"wrote {output} ({sum(len(g) for g in groups.values())} rows, {len(groups)} workloads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
