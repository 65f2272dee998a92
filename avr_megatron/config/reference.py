"""The recipe reference (docs/recipe_reference.md), generated from the schema's source.

The comments above each field of avr_megatron/config/schema.py are the only description a key
has: this module reads them with `tokenize` and finds the fields with `ast`, takes types and
defaults from the dataclasses themselves, and writes one Markdown table per section.

    python -m avr_megatron.config.reference            # rewrite docs/recipe_reference.md
    python -m avr_megatron.config.reference --check    # exit 1 if stale or a field lacks a comment
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import yaml

from avr_megatron.config import schema

SCHEMA_PATH = Path(schema.__file__)
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "recipe_reference.md"
COMMAND = "python -m avr_megatron.config.reference"


@dataclass
class FieldDoc:
    cls: str
    name: str
    line: int
    comment: str


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
    """Line -> text of whole-line comments, and line -> text of comments after code."""
    own, trailing = {}, {}
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (trailing if tok.start[0] in code_lines else own)[tok.start[0]] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            for line in range(tok.start[0], tok.end[0] + 1):
                code_lines.add(line)
    return own, trailing


def field_docs(source: str | None = None) -> dict[str, dict[str, FieldDoc]]:
    """class name -> field name -> its comment: the run of whole-line comments directly above
    the field, then a comment at the end of the field's line."""
    source = SCHEMA_PATH.read_text() if source is None else source
    own, trailing = _comments(source)
    docs: dict[str, dict[str, FieldDoc]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in own:
                above.insert(0, own[line])
                line -= 1
            parts = above + ([trailing[stmt.lineno]] if stmt.lineno in trailing else [])
            fields[stmt.target.id] = FieldDoc(node.name, stmt.target.id, stmt.lineno,
                                              " ".join(p for p in parts if p))
    return docs


def missing_comments(docs: dict[str, dict[str, FieldDoc]] | None = None) -> list[str]:
    """Fields of the config tree (reachable from AvrConfig) that have no comment."""
    docs = field_docs() if docs is None else docs
    missing = []
    for _, cls, _ in _sections():
        for f in dataclasses.fields(cls):
            doc = docs.get(cls.__name__, {}).get(f.name)
            if doc is None or not doc.comment:
                line = f":{doc.line}" if doc else ""
                missing.append(f"{cls.__name__}.{f.name} ({SCHEMA_PATH.name}{line})")
    return sorted(set(missing))


def _sections(cls=schema.AvrConfig, instance=None, path: str = ""):
    """(dotted path, dataclass, default instance) for every section, depth first."""
    instance = cls() if instance is None else instance
    if path:
        yield path, cls, instance
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(type(value), value, f"{path}.{f.name}" if path else f.name)


def _render_default(value) -> str:
    if dataclasses.is_dataclass(value):
        return "(section)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _anchor(path: str) -> str:
    return path.replace(".", "")


def render(docs: dict[str, dict[str, FieldDoc]] | None = None) -> str:
    docs = field_docs() if docs is None else docs
    out = [
        "# Recipe reference",
        "",
        f"<!-- Generated from avr_megatron/config/schema.py by `{COMMAND}`; do not edit. -->",
        "",
        "Every key a recipe (or a `key=value` override) may set, by section: its type, its "
        "default and what it does. Types are Python annotations (`Optional[X]`: X or `null`). "
        "How recipes inherit, pick presets and are validated: [recipes.md](recipes.md).",
        "",
        "Sections: " + ", ".join(f"[`{p}`](#{_anchor(p)})" for p, _, _ in _sections()),
        "",
    ]
    for path, cls, instance in _sections():
        out += [f"## {path}", ""]
        if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
            out += [" ".join(cls.__doc__.split()), ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            doc = docs.get(cls.__name__, {}).get(f.name)
            comment = doc.comment if doc else ""
            key = f"{path}.{f.name}"
            if dataclasses.is_dataclass(value):
                type_, default = "section", f"see [`{key}`](#{_anchor(key)})"
            else:
                type_, default = f"`{f.type}`", _render_default(value)
            out.append(f"| `{key}` | {_cell(type_)} | {_cell(default)} | {_cell(comment)} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 when the file is stale or a field lacks a comment")
    ap.add_argument("--output", type=Path, default=DOC_PATH)
    args = ap.parse_args(argv)
    docs = field_docs()
    text = render(docs)
    missing = missing_comments(docs)
    status = 0
    if missing:
        print("schema fields without a comment (the comment is the key's documentation):\n  "
              + "\n  ".join(missing), file=sys.stderr)
        status = 1
    if args.check:
        if not args.output.is_file() or args.output.read_text() != text:
            print(f"{args.output} is out of date: run `{COMMAND}`", file=sys.stderr)
            status = 1
        return status
    from avr_megatron.runtime.files import atomic_write_text

    atomic_write_text(args.output, text)
    print(f"wrote {args.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
