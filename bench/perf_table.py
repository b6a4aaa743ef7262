"""docs/performance.md's results table, generated from the benchmark results under bench/results/.

Each line of a `.jsonl` file is one `bench/gpu_case.sh` case: framework, name, ngpu, gpu, torch,
date, args, tokens_per_second_per_gpu, mfu_percent, peak memory (bench/steady_state.py says which
steps and which peak). The older `.json` files hold the same records as a list under "runs", with
a "purpose" line. Cases of the same name in the same file ran in the same device call, side by
side: the ratio is titanlite over torchtitan within one file.
    python bench/perf_table.py            # print
    python bench/perf_table.py --write    # refresh docs/performance.md between the PERF-TABLE markers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from steady_state import COMPARED_MEMORY  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# The output head's variants (NAME_logits, NAME_chunked...) ran beside one torchtitan case NAME; other
# suffixes name other settings, compared with nothing.
HEAD_VARIANTS = ("_logits", "_chunked")
BEGIN, END = "<!-- PERF-TABLE:BEGIN -->", "<!-- PERF-TABLE:END -->"


def read_cases(folder: Path = RESULTS) -> list[tuple[str, dict]]:
    """(file name, case) for every successful case, files in name order (dates sort first).

    A `.json` file's "purpose" becomes each of its cases' "command" (how the file was made).
    """
    cases = []
    for path in sorted(folder.glob("*.json*")):
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            document = json.loads(path.read_text())
            records = [dict(run, command=document.get("purpose", "")) for run in document.get("runs", [])]
        cases += [(path.name, case) for case in records
                  if case.get("returncode") == 0 and case.get("tokens_per_second_per_gpu")]
    return cases


def cell(case: dict | None) -> str:
    if case is None:
        return "–"
    mfu = f" ({case['mfu_percent']:.1f}%)" if case.get("mfu_percent") else ""
    energy = f", {1000 * case['joules_per_token']:.1f} mJ/token" if case.get("joules_per_token") else ""
    return f"{case['tokens_per_second_per_gpu']:,.0f}{mfu}{energy}"


def memory(case: dict | None) -> str:
    """Peak reserved GiB (both frameworks log it), and titanlite's allocated in brackets."""
    if case is None or not case.get(COMPARED_MEMORY):
        return "–"
    allocated = f" ({case['peak_allocated_gib']:.1f})" if case.get("peak_allocated_gib") else ""
    return f"{case[COMPARED_MEMORY]:.1f}{allocated}"


def table(cases: list[tuple[str, dict]]) -> str:
    rows, commands, sessions = {}, [], {}
    for file, case in cases:
        if case.get("command"):
            sessions.setdefault(file, case["command"])
        rows.setdefault((file, case["name"]), {})[case["framework"]] = case
        commands.append(f"- `{file}` {case['framework']} `{case['name']}` ({case['ngpu']} GPU): `{case['args']}`")
    lines = ["| results file | setting | GPUs | card | titanlite tokens/s/GPU (MFU), energy | torchtitan | ratio | "
             "titanlite peak GiB reserved (allocated) | torchtitan peak GiB reserved |", "|---|---|---|---|---|---|---|---|---|"]
    for (file, name), pair in rows.items():
        partner = [key for key in rows if key[0] == file and name.startswith(tuple(key[1] + suffix for suffix in HEAD_VARIANTS)) and
                   "torchtitan" in rows[key] and "titanlite" not in rows[key]]
        if "torchtitan" not in pair and partner:
            pair["torchtitan"] = rows[partner[0]]["torchtitan"]
            rows[partner[0]]["paired"] = True
    for (file, name), pair in rows.items():
        if pair.pop("paired", False):
            continue
        ours, theirs = pair.get("titanlite"), pair.get("torchtitan")
        any_case = ours or theirs
        ratio = (f"{ours['tokens_per_second_per_gpu'] / theirs['tokens_per_second_per_gpu']:.3f}×"
                 if ours and theirs else "–")
        lines.append(f"| {file} | {name} | {any_case['ngpu']} | {any_case['gpu']}, torch {any_case['torch']} | "
                     f"{cell(ours)} | {cell(theirs)} | {ratio} | {memory(ours)} | {memory(theirs)} |")
    runs = "".join(f"- `{file}`: `{command}`\n" for file, command in sessions.items())
    return ("\n".join(lines) + "\n\nHow each file was made:\n\n" + runs +
            "\nEach case's arguments (to `bench/gpu_case.sh FRAMEWORK NAME NGPU ...`):\n\n" + "\n".join(commands) + "\n")


def doc_with_table(readme: str, cases: list[tuple[str, dict]]) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table(cases) + readme[end:]


if __name__ == "__main__":
    if "--write" in sys.argv:
        path = ROOT / "docs/performance.md"
        path.write_text(doc_with_table(path.read_text(), read_cases()))
    else:
        print(table(read_cases()))
