"""The generated parts of docs/: the config reference (docs/config.md) and the file map (docs/architecture.md).

Both come from the code: the settings' declarations in titanlite/config/settings.py
(`setting(default, help, choices=..., ge=...)`), and the files of titanlite/ with their line
counts and first docstring lines. Each sits between BEGIN/END markers in its doc; a test keeps
the docs equal to this script's output.
    python scripts/generate_docs.py            # print both
    python scripts/generate_docs.py --write    # refresh the docs
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from titanlite.config.settings import declared_fields  # noqa: E402

PACKAGE = ROOT / "titanlite"


def allowed(rules: dict) -> str:
    if rules["choices"]:
        return " \\| ".join(f"`{choice}`" for choice in rules["choices"])
    words = (("gt", ">"), ("ge", ">="), ("le", "<="), ("lt", "<"))
    bounds = [f"{word} {rules[key]:g}" for key, word in words if rules[key] is not None]
    return ", ".join(bounds)


def config_reference() -> str:
    lines, section = [], None
    for dotted, item, kind in declared_fields():
        if dotted.partition(".")[0] != section:
            section = dotted.partition(".")[0]
            lines += ["" if lines else None, f"**[{section}]**", "", "| key | type | default | allowed | meaning |",
                      "|---|---|---|---|---|"]
        text = item.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{dotted}` | {kind.__name__} | `{item.default!r}` | {allowed(item.metadata)} | {text} |")
    return "\n".join(line for line in lines if line is not None) + "\n"


def summary(path: Path) -> str:
    """The first line of a module's docstring."""
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    return docstring.split("\n")[0].replace("|", "\\|")


def file_map() -> str:
    """Every file of titanlite/, package by package, with its line count and what it is."""
    lines = ["| file | lines | what it is |", "|---|---|---|"]
    commands = sorted(path for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    packages = sorted(path for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists())
    for path in commands:
        lines.append(f"| `{path.relative_to(ROOT)}` | {len(path.read_text().splitlines())} | {summary(path)} |")
    for package in packages:
        files = sorted(path for path in package.glob("*.py") if path.name != "__init__.py")
        total = sum(len(path.read_text().splitlines()) for path in files)
        lines.append(f"| **`{package.relative_to(ROOT)}/`** | **{total}** | **{summary(package / '__init__.py')}** |")
        lines += [f"| `{path.relative_to(ROOT)}` | {len(path.read_text().splitlines())} | {summary(path)} |"
                  for path in files]
    return "\n".join(lines) + "\n"


GENERATED = {"docs/config.md": ("CONFIG-REFERENCE", config_reference), "docs/architecture.md": ("FILE-MAP", file_map)}


def with_generated(text: str, marker: str, content: str) -> str:
    begin, end = f"<!-- {marker}:BEGIN -->", f"<!-- {marker}:END -->"
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + content + text[stop:]


def current(doc: str) -> str:
    """`doc` (a path under the repository) as this script would write it."""
    marker, make = GENERATED[doc]
    return with_generated((ROOT / doc).read_text(), marker, make())


if __name__ == "__main__":
    for doc, (marker, make) in GENERATED.items():
        if "--write" in sys.argv:
            (ROOT / doc).write_text(current(doc))
        else:
            print(make())
