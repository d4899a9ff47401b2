"""The documentation's relative links lead somewhere: every linked file exists, every #anchor is a heading there."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md", "docs/experiments.md", "docs/speed.md", "datasets/README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    found, seen, in_code = set(), {}, False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(path: str):
    in_code = False
    for number, line in enumerate(open(path, encoding="utf-8"), 1):
        if line.startswith("```"):
            in_code = not in_code
        if not in_code:
            for target in LINK.findall(line):
                if not re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
                    yield number, target


def test_anchor_rule(tmp_path):
    document = tmp_path / "a.md"
    document.write_text("# Set up\n```\n# a comment, not a heading\n```\n## What `--x` does, on CPU\n### Set up\n")
    assert anchors(str(document)) == {"set-up", "what---x-does-on-cpu", "set-up-1"}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_relative_links_resolve(document):
    path = os.path.join(ROOT, document)
    assert os.path.isfile(path), f"{document} is missing"
    broken = []
    for number, target in links(path):
        file, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(linked):
            broken.append(f"{document}:{number}: {target} (no such file)")
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(f"{document}:{number}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
