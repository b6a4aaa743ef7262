"""docs/performance.md's results table, generated from the benchmark results under bench/results/.

Each line of a `.jsonl` file is one `bench/gpu_case.sh` case: framework, name, ngpu, gpu, torch,
date, args, tokens_per_second_per_gpu, mfu_percent, peak memory (bench/steady_state.py says which
steps and which peak). The older `.json` files hold the same records as a list under "runs", with
a "purpose" line. Cases of the same name in the same file ran in the same device call, side by
side: the ratio is titanlite over torchtitan within one file.
    python bench/perf_table.py            # print
    python bench/perf_table.py --write    # refresh README.md's and docs/performance.md's tables (between
                                          # the SPEED-TABLE and PERF-TABLE markers)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from steady_state import COMPARED_MEMORY  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# titanlite's variants of one setting (the output head: NAME_logits, NAME_chunked...; step weights against
# autocast: NAME_step, NAME_autocast...) ran beside one torchtitan case NAME; other suffixes name other
# settings, compared with nothing.
VARIANTS = ("_logits", "_chunked", "_step", "_autocast")
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


def variant_of(name: str, names: list[str]) -> str | None:
    """The case among `names` that `name` is a variant of (NAME_logits, NAME_step... of NAME)."""
    return next((other for other in names if name.startswith(tuple(other + suffix for suffix in VARIANTS))), None)


def cell(case: dict | None, with_energy: bool = True) -> str:
    if case is None:
        return "–"
    mfu = f" ({case['mfu_percent']:.1f}%)" if case.get("mfu_percent") else ""
    joules = energy(case) if with_energy else "–"
    joules = f", {joules} mJ/token" if joules != "–" else ""
    return f"{case['tokens_per_second_per_gpu']:,.0f}{mfu}{joules}"


def energy(case: dict | None) -> str:
    """Millijoules per token of GPU 0: its mean power while training over its tokens/s. Cases before
    2026-12-05 kept only the median power: their figure is marked ≈."""
    if case and case.get("joules_per_token"):
        return f"{1000 * case['joules_per_token']:.1f}"
    if case and case.get("power_w"):
        return f"≈{1000 * case['power_w'] / case['tokens_per_second_per_gpu']:.1f}"
    return "–"


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
        partner = variant_of(name, [key[1] for key in rows if key[0] == file and "titanlite" not in rows[key]])
        if "torchtitan" not in pair and partner and "torchtitan" in rows[(file, partner)]:
            pair["torchtitan"] = rows[(file, partner)]["torchtitan"]
            rows[(file, partner)]["paired"] = True
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


# Where titanlite stands: the side-by-side runs a reader asks about first, (results file, case name, setting).
HEADLINES = [
    ("2026-12-06_step_weights_h200.jsonl", "7b_l8_noac_a4_step",
     "8 layers, bf16 (step weights), no AC, A = 4 (both frameworks' fastest bf16)"),
    ("2026-12-06_step_weights_h100.jsonl", "7b_l8_noac_a4_step", "the same on an H100"),
    ("2026-11-30_same_data_1xh200.jsonl", "7b_l8_sac_a4_same_data", "8 layers, bf16, selective AC, A = 4"),
    ("2026-12-05_chunked_loss_float8_rowwise_same_data_h100.jsonl", "7b_l8_noac_a4_float8_rowwise",
     "8 layers, float8 rowwise (both), no AC, A = 4"),
    ("2026-11-30_own_data_float8_1xh200.jsonl", "7b_l8_sac_float8",
     "8 layers, float8 tensorwise (both), selective AC, A = 1, each on its own data"),
    ("2026-11-30_same_data_noac_2xh200.jsonl", "7b_fsdp2_noac_same_data", "32 layers, FSDP 2, bf16, no AC"),
    ("2026-11-30_same_data_2xh200.jsonl", "7b_fsdp2_sac_same_data", "32 layers, FSDP 2, bf16, selective AC"),
    ("2026-12-05_chunked_loss_reversed_whole_7b_h100.jsonl", "7b_l32_full_float8_rowwise_adamw8bit",
     "the whole 7B (32 layers) on one GPU: float8 rowwise, 8-bit AdamW, full AC"),
    ("2026-12-05_13b_and_profile_h200.jsonl", "13b_l40_full_float8_rowwise_adamw8bit",
     "the whole 13B (40 layers) on one GPU: float8 rowwise, 8-bit AdamW, full AC"),
]
SPEED_BEGIN, SPEED_END = "<!-- SPEED-TABLE:BEGIN -->", "<!-- SPEED-TABLE:END -->"
GENERATED = [ROOT / "README.md", ROOT / "docs" / "performance.md"]


def card(case: dict) -> str:
    name = case["gpu"].removeprefix("NVIDIA ").split()[0]
    return f"{case['ngpu']}×{name}"


def headline_table(cases: list[tuple[str, dict]]) -> str:
    """The 7B shape (13B where named), the same data and LR schedule on both sides unless the row says
    otherwise; tokens/s per GPU (MFU); the ratio within one device call."""
    found = {(file, case["name"], case["framework"]): case for file, case in cases}
    lines = ["| setting | GPUs | titanlite tokens/s/GPU (MFU) | torchtitan 0.2.2 | ratio | mJ/token, titanlite / "
             "torchtitan | titanlite peak GiB allocated |", "|---|---|---|---|---|---|---|"]
    for file, name, setting in HEADLINES:
        ours = found[(file, name, "titanlite")]
        partner = variant_of(name, [key[1] for key in found if key[0] == file and key[2] == "torchtitan"])
        theirs = found.get((file, name, "torchtitan")) or found.get((file, partner, "torchtitan"))
        ratio = f"{ours['tokens_per_second_per_gpu'] / theirs['tokens_per_second_per_gpu']:.2f}×" if theirs else "–"
        lines.append(f"| {setting} | {card(ours)} | {cell(ours, False)} | {cell(theirs, False)} | "
                     f"{ratio} | {energy(ours)} / {energy(theirs)} | {ours['peak_allocated_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + body + text[stop:]


def doc_with_table(doc: str, cases: list[tuple[str, dict]]) -> str:
    """A document with the generated tables between their markers (those it has)."""
    if SPEED_BEGIN in doc:
        doc = replace_between(doc, SPEED_BEGIN, SPEED_END, headline_table(cases))
    if BEGIN in doc:
        doc = replace_between(doc, BEGIN, END, table(cases))
    return doc


if __name__ == "__main__":
    if "--write" in sys.argv:
        for path in GENERATED:
            path.write_text(doc_with_table(path.read_text(), read_cases()))
    else:
        print(table(read_cases()))
