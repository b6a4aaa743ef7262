"""Print the config reference (every section and key, default and meaning) as Markdown.

The comments beside each field in titanlite/config.py are the single source; README.md holds
this script's output between the CONFIG-REFERENCE markers, and a test keeps the two equal.
    python scripts/config_reference.py            # print
    python scripts/config_reference.py --write    # refresh README.md
"""

import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from titanlite import config as config_module  # noqa: E402

BEGIN, END = "<!-- CONFIG-REFERENCE:BEGIN -->", "<!-- CONFIG-REFERENCE:END -->"


def field_comments() -> dict[tuple[str, str], str]:
    """(class name, field) -> the comment on its line in config.py."""
    comments, current = {}, None
    for line in Path(config_module.__file__).read_text().splitlines():
        if match := re.match(r"class (\w+)", line):
            current = match[1]
        elif match := re.match(r"    (\w+): [^=]+= .*?#\s*(.*)$", line):
            comments[(current, match[1])] = match[2]
    return comments


def reference() -> str:
    comments = field_comments()
    lines = []
    for section in dataclasses.fields(config_module.Config):
        cls = section.default_factory
        lines += [f"**[{section.name}]**", "", "| key | default | meaning |", "|---|---|---|"]
        for field in dataclasses.fields(cls):
            default = getattr(cls(), field.name)
            text = comments.get((cls.__name__, field.name), "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{field.name}` | `{default!r}` | {text} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def readme_with_reference(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + reference() + readme[end:]


if __name__ == "__main__":
    if "--write" in sys.argv:
        path = ROOT / "README.md"
        path.write_text(readme_with_reference(path.read_text()))
    else:
        print(reference())
