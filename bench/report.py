"""Print a markdown table from a pytest-benchmark JSON file written by the benchmarks.

    python bench/report.py bench/results/latest.json

Per workload: each contender's median time, its ratio to MemmapExecutor's,
the peak memory of parent + workers above the baseline and its ratio to the
workload's array size, and which of mmexec's targets hold. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WORKLOADS = {
    "S1": "S1: one 200 MB array passed whole to 64 tasks, each sums a slice (fresh array object each round)",
    "S1-reuse": "S1-reuse: as S1, the same unchanged array object every round",
    "S2": "S2: 16 distinct 50 MB arrays, one task each (fresh array objects each round)",
    "S3": "S3: 20,000 calls of x + 1 through map / Parallel, default settings",
    "S4": "S4: 16 tasks each returning a new 50 MB array",
    "S5": "S5: row sums of a 10 x 1e6 float64 memmap written into an output np.memmap",
    "warm": "Warm start: a second executor (or Parallel call) on a warm pool, up to its first trivial result",
    "cold": "Cold start: a fresh process's first executor (or Parallel call), up to its first trivial result "
    "(numpy and the library already imported)",
    "D1": "D1: one 100 MB array passed whole to 8 tasks on a dask LocalCluster (fresh array object each round)",
    "D1-reuse": "D1-reuse: as D1, the same unchanged array object every round",
    # Per-task cost workloads (bench_pertask.py); the sizes come from the rows (MMEXEC_BENCH_QUICK shrinks them).
    "P1": "P1: repeated Parallel calls on one unchanged 160 MB array (8 calls each): fresh calls against calls in "
    "one with-block",
    "J1": "J1: scikit-learn GridSearchCV(Ridge(), 4 alphas, cv=3, refit=False) on a 160 MB X, per joblib backend",
    "U1": "U1: S1's 64 tasks through one MemmapExecutor.map on one unchanged 200 MB array, the same object every "
    "round: dirty pages, every byte, a memmap argument, the floor",
    "U2": "U2: the caller's in-place rewrite (a += 1.0) of a 200 MB array handed to a map before it, against one "
    "never handed over",
    "T1": "T1: {tasks:,} x submit(tiny, i), then every result in order",
    "T2": "T2: list(map(tiny, range({tasks:,}))), default arguments",
    "T3": "T3: {tasks} bytes payloads of {payload_bytes:MiB} each, each sent to a task that returns a new bytes "
    "of the same size (fresh payload objects each round)",
    "T4": "T4: dask.multiprocessing.get(dsk, key, pool=executor) on {dask_tasks} tasks: {tasks_less_one} sums "
    "of a {array_bytes:MiB} array carried in the graph, and their reduction (fresh array objects each round)",
}
#: Workloads whose table gives the time per task and ratios to ProcessPoolExecutor (bench_pertask.py).
PER_TASK = ("T1", "T2", "T3", "T4")
#: Their reference rows: every ratio column divides by one of these rows' median.
PER_TASK_REFS = {"T2": ("ppe", "ppe-tuned")}
PER_TASK_REF = ("ppe",)
ORDER = ["ppe", "ppe-tuned", "ppe-paths", "ppe-fork", "ppe-forkserver", "ppe-spawn", "loky", "joblib", "mmexec",
         "mmexec-map", "mmexec-Parallel"]
#: The rows mmexec's targets apply to.
MMEXEC = ("mmexec", "mmexec-map", "mmexec-Parallel")
#: The row every ratio is taken against.
BASE = "mmexec"


@dataclass
class Row:
    workload: str
    contender: str
    label: str
    median: float
    rounds: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_mb(self) -> float | None:
        peak = self.info.get("peak_bytes")
        return None if peak is None else peak / 1e6

    @property
    def peak_ratio(self) -> float | None:
        peak, ref = self.info.get("peak_bytes"), self.info.get("ref_bytes")
        return None if peak is None or not ref else peak / ref


Group = dict[str, Row]


@dataclass(frozen=True)
class Target:
    workload: str
    text: str
    short: str
    test: Callable[[Row, Group], bool | None]  # None: cannot tell (a row missing)


def _vs(other: str, factor: float) -> Callable[[Row, Group], bool | None]:
    def test(row: Row, group: Group) -> bool | None:
        ref = group.get(other)
        return None if ref is None else row.median <= factor * ref.median

    return test


def _mem(limit: float) -> Callable[[Row, Group], bool | None]:
    def test(row: Row, group: Group) -> bool | None:
        ratio = row.peak_ratio
        return None if ratio is None else ratio <= limit

    return test


TARGETS = [
    Target("S1", "S1 <= 100 ms", "<=100 ms", lambda r, g: r.median <= 0.100),
    Target("S1", "S1 <= 1/2 joblib.Parallel", "<=1/2 joblib", _vs("joblib", 0.5)),
    Target("S1", "S1 peak memory <= 1.2x array size", "memory <=1.2x", _mem(1.2)),
    Target("S2", "S2 <= 300 ms", "<=300 ms", lambda r, g: r.median <= 0.300),
    Target("S3", "S3 <= 2x ProcessPoolExecutor(chunksize=2500)", "<=2x tuned PPE", _vs("ppe-tuned", 2.0)),
    Target("S4", "S4 <= 200 ms", "<=200 ms", lambda r, g: r.median <= 0.200),
    Target("S5", "S5 <= 40 ms", "<=40 ms", lambda r, g: r.median <= 0.040),
    Target("warm", "second executor ready <= 5 ms", "<=5 ms", lambda r, g: r.median <= 0.005),
    Target("cold", "first executor's first result <= 2x ProcessPoolExecutor (forkserver)", "<=2x PPE forkserver",
           _vs("ppe-forkserver", 2.0)),
    Target("P1", "a fresh mmexec.Parallel call <= 1.3x a call in one with-block", "<=1.3x with-block",
           lambda r, g: None if r.contender == "mmexec" else _vs("mmexec", 1.3)(r, g)),
    Target("J1", "GridSearchCV on the 'mmexec' joblib backend <= joblib's default backend", "<=joblib default",
           _vs("joblib", 1.0)),
    Target("U1", "an unchanged array <= 1.15x an np.memmap argument", "<=1.15x memmap arg",
           _vs("mmexec-memmap", 1.15)),
    Target("U1", "an unchanged array <= 1.2x the floor", "<=1.2x floor", _vs("mmexec-floor", 1.2)),
    Target("U2", "the caller's rewrite of a handed array <= 1.5x that of an untouched one", "<=1.5x untouched",
           _vs("untouched", 1.5)),
]


def load(path: str) -> tuple[dict[str, Group], dict[str, Any]]:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, Group] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        workload = info.get("workload") or b.get("group") or "?"
        contender = info.get("contender") or b.get("param") or b["name"]
        row = Row(workload, contender, info.get("label", contender), b["stats"]["median"], b["stats"]["rounds"], info)
        groups.setdefault(workload, {})[contender] = row
    return groups, data


def fmt_time(s: float) -> str:
    if s >= 10:
        return f"{s:.1f} s"
    if s >= 1:
        return f"{s:.2f} s"
    ms = s * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def mark(ok: bool | None) -> str:
    return "?" if ok is None else "PASS" if ok else "FAIL"


class _Sizes(dict[str, Any]):
    """``str.format`` fields of a per-task workload's title: ``{x:MiB}`` writes a byte count in MiB."""

    def __missing__(self, key: str) -> Any:
        if key == "tasks_less_one" and "dask_tasks" in self:
            return self["dask_tasks"] - 1
        raise KeyError(key)


class _Bytes(int):
    def __format__(self, spec: str) -> str:
        if spec == "MiB":
            mib = self / 2**20
            return f"{mib:g} MiB"
        return super().__format__(spec)


def title(workload: str, group: Group) -> str:
    """The workload's heading; per-task workloads' sizes come from their rows' ``extra_info``."""
    text = WORKLOADS.get(workload, workload)
    if workload not in PER_TASK:
        return text
    info = next(iter(group.values())).info
    fields = _Sizes({k: _Bytes(v) if k.endswith("_bytes") and isinstance(v, int) else v for k, v in info.items()})
    try:
        text = text.format_map(fields)
    except (KeyError, ValueError):
        pass
    if any(r.info.get("quick") for r in group.values()):
        text += " [QUICK MODE: shrunk sizes, not a measurement]"
    return text


def per_task_table(w: str, group: Group) -> list[str]:
    """One per-task workload: time per task and ratios to ProcessPoolExecutor (defaults, or tuned for T2)."""
    refs = list(PER_TASK_REFS.get(w, PER_TASK_REF))
    ref_labels = [group[k].label if k in group else k for k in refs]
    out = [
        "| contender | median | per task | 1st call | rounds | "
        + "".join(f"time / {label} | " for label in ref_labels)
        + "peak memory | peak / size | notes |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(refs) + "---:|---:|---|",
    ]
    keys = [k for k in ORDER if k in group] + sorted(k for k in group if k not in ORDER)
    for k in keys:
        row = group[k]
        tasks = row.info.get("tasks")
        per_task = "–" if not tasks else f"{row.median / tasks * 1e6:,.1f} µs"
        ratios = []
        for ref in refs:
            base = group.get(ref)
            ratios.append(fmt_ratio(None if base is None else row.median / base.median))
        peak = row.peak_mb
        mem = "–" if peak is None else f"{peak:,.0f} MB" if abs(peak) >= 10 else f"{peak:.1f} MB"
        first = "–" if row.info.get("first_call_s") is None else fmt_time(row.info["first_call_s"])
        check = row.info.get("check")
        note = f"note: {check}" if check and check != "correct" else ""
        if row.info.get("chunksize"):
            note = "; ".join(x for x in (f"chunksize={row.info['chunksize']}", note) if x)
        out.append(
            f"| {row.label} | {fmt_time(row.median)} | {per_task} | {first} | {row.rounds} | "
            + "".join(f"{r} | " for r in ratios)
            + f"{mem} | {fmt_ratio(row.peak_ratio)} | {note} |"
        )
    return out


def table(groups: dict[str, Group]) -> list[str]:
    out: list[str] = []
    workloads = [w for w in WORKLOADS if w in groups] + sorted(w for w in groups if w not in WORKLOADS)
    for w in workloads:
        group = groups[w]
        if w in PER_TASK:
            out += ["", f"### {title(w, group)}", ""]
            out += per_task_table(w, group)
            continue
        base = group.get(BASE)
        out += ["", f"### {WORKLOADS.get(w, w)}", ""]
        out += [
            "| contender | median | 1st call | rounds | time / MemmapExecutor "
            "| peak memory | peak / array size | targets |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        keys = [k for k in ORDER if k in group] + sorted(k for k in group if k not in ORDER)
        for k in keys:
            row = group[k]
            ratio = None if base is None else row.median / base.median
            peak = row.peak_mb
            mem = "–" if peak is None else f"{peak:,.0f} MB" if abs(peak) >= 10 else f"{peak:.1f} MB"
            marks = []
            if k in MMEXEC:
                marks = [f"{mark(t.test(row, group))} {t.short}" for t in TARGETS if t.workload == w]
            first = "–" if row.info.get("first_call_s") is None else fmt_time(row.info["first_call_s"])
            check = row.info.get("check")
            if check and check != "correct":
                marks.append(f"note: {check}")
            out.append(
                f"| {row.label} | {fmt_time(row.median)} | {first} | {row.rounds} | {fmt_ratio(ratio)} | "
                f"{mem} | {fmt_ratio(row.peak_ratio)} | {'; '.join(marks)} |"
            )
    return out


def summary(groups: dict[str, Group]) -> list[str]:
    present = [k for k in MMEXEC if any(k in g for g in groups.values())]
    labels = {k: r.label for g in groups.values() for k, r in g.items()}
    out = ["", "### Targets", "", "| target | " + " | ".join(labels[k] for k in present) + " |"]
    out.append("|---|" + "---|" * len(present))
    for t in TARGETS:
        group = groups.get(t.workload, {})
        cells = []
        for k in present:
            row = group.get(k)
            if row is None:
                cells.append("–")
                continue
            value = fmt_time(row.median)
            if "memory" in t.text:
                value = fmt_ratio(row.peak_ratio)
            cells.append(f"{mark(t.test(row, group))} ({value})")
        out.append(f"| {t.text} | " + " | ".join(cells) + " |")
    return out


def header(data: dict[str, Any], groups: dict[str, Group]) -> list[str]:
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    rows = [r for g in groups.values() for r in g.values()]
    loads = [r.info[k] for r in rows for k in ("loadavg_before", "loadavg_after") if k in r.info]
    workers = {r.info.get("workers") for r in rows}
    cpu = machine.get("cpu", {})
    lines = [
        f"## mmexec transfer benchmarks ({data.get('datetime', '?')})",
        "",
        f"- machine: {cpu.get('brand_raw') or machine.get('processor') or '?'}, "
        f"{cpu.get('count', '?')} CPUs, Python {machine.get('python_version', '?')}; "
        f"workers per pool: {', '.join(str(w) for w in sorted(x for x in workers if x is not None)) or '?'}",
        f"- commit: {commit.get('id', '?')[:10]}{' (dirty)' if commit.get('dirty') else ''} "
        f"on {commit.get('branch', '?')}",
    ]
    if loads:
        lines.append(f"- 1-minute load average during the run: {min(loads):.2f} to {max(loads):.2f}")
    lines.append(
        "- peak memory: parent + all workers (PSS, shared-memory files counted once), "
        "highest sample during the last round, above the baseline taken before the first (warmup) round "
        "(input data made, pool warm)"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    args = parser.parse_args(argv)
    groups, data = load(args.json)
    if not groups:
        print("no benchmarks in", args.json, file=sys.stderr)
        return 1
    print("\n".join(header(data, groups) + table(groups) + summary(groups)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
