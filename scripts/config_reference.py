"""Print the config reference (every section and key: type, default, allowed values, meaning) as Markdown.

The declarations in titanlite/settings.py (`setting(default, help, choices=..., ge=...)`) are the
single source; README.md holds this script's output between the CONFIG-REFERENCE markers, and a
test keeps the two equal.
    python scripts/config_reference.py            # print
    python scripts/config_reference.py --write    # refresh README.md
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from titanlite.settings import declared_fields  # noqa: E402

BEGIN, END = "<!-- CONFIG-REFERENCE:BEGIN -->", "<!-- CONFIG-REFERENCE:END -->"


def allowed(rules: dict) -> str:
    if rules["choices"]:
        return " \\| ".join(f"`{choice}`" for choice in rules["choices"])
    bounds = [f"{word} {rules[key]:g}" for key, word in (("gt", ">"), ("ge", ">="), ("le", "<=")) if rules[key] is not None]
    return ", ".join(bounds)


def reference() -> str:
    lines, section = [], None
    for dotted, item, kind in declared_fields():
        if dotted.partition(".")[0] != section:
            section = dotted.partition(".")[0]
            lines += ["" if lines else None, f"**[{section}]**", "", "| key | type | default | allowed | meaning |",
                      "|---|---|---|---|---|"]
        text = item.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{dotted}` | {kind.__name__} | `{item.default!r}` | {allowed(item.metadata)} | {text} |")
    return "\n".join(line for line in lines if line is not None) + "\n"


def readme_with_reference(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + reference() + readme[end:]


if __name__ == "__main__":
    if "--write" in sys.argv:
        path = ROOT / "README.md"
        path.write_text(readme_with_reference(path.read_text()))
    else:
        print(reference())
