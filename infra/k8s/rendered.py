"""What k8s/ renders, one digest per object: `python -m infra.k8s.rendered > FILE`.

A layout change in k8s/ (files moved, kustomizations split or nested) must not change
what gets applied. This renders k8s/base and every overlay with `kubectl kustomize`,
drops the hash suffixes kustomize gives generated ConfigMaps and Secrets (from their
names and from every reference to them), puts `<infra/PATH>` in place of every
ConfigMap value that is an infra/ file's content and of a PrometheusRule's groups when
they are infra/prometheus/rules/'s (so editing infra/ changes no digest: the tests check
those contents on their own), and digests each object's canonical JSON.
tests/fixtures/k8s-rendered.json holds the digests of the layout before such a change;
a test compares. After a change meant to alter the output, write the file again and
review which objects it names.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from infra.k8s.check import INFRA, REPO, Manifest, overlays, render

# kustomize's name hash: 10 characters of an alphabet without vowels (hasher.encode).
HASH_SUFFIX = re.compile(r"^(?P<name>.+)-[2456789bcdfghkmt]{10}$")
GENERATED_KINDS = ("ConfigMap", "Secret")


def targets() -> list[Path]:
    """k8s/base and every overlay: what the comparison renders."""
    return [REPO / "k8s" / "base", *overlays()]


def unhashed(docs: list[Manifest]) -> list[Manifest]:
    """The objects with every generated name's hash suffix removed, wherever it appears."""
    names = {}
    for doc in docs:
        name = doc["metadata"]["name"]
        found = HASH_SUFFIX.match(name)
        if doc["kind"] in GENERATED_KINDS and found:
            names[name] = found["name"]

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items()}
        if isinstance(value, list):
            return [strip(item) for item in value]
        if isinstance(value, str):
            return names.get(value, value)
        return value

    stripped: list[Manifest] = [strip(doc) for doc in docs]
    return stripped


def infra_files() -> dict[str, str]:
    """Content -> `<infra/PATH>` for the text files under infra/ (first path wins)."""
    found: dict[str, str] = {}
    for path in sorted(INFRA.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            found.setdefault(text, f"<{path.relative_to(REPO)}>")
    return found


def rule_groups() -> list[Any]:
    """Every group of infra/prometheus/rules/*.yml, in file order."""
    return [
        group
        for path in sorted((INFRA / "prometheus" / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
    ]


def sourced(docs: list[Manifest]) -> list[Manifest]:
    """The objects with infra/ contents named by their path instead of spelt out."""
    files = infra_files()
    groups = rule_groups()
    named = []
    for doc in docs:
        if doc["kind"] == "ConfigMap" and "data" in doc:
            data = {k: files.get(v, v) for k, v in doc["data"].items()}
            doc = {**doc, "data": data}
        if doc["kind"] == "PrometheusRule" and doc["spec"].get("groups") == groups:
            doc = {**doc, "spec": {**doc["spec"], "groups": "<infra/prometheus/rules/*.yml>"}}
        named.append(doc)
    return named


def key(doc: Manifest) -> str:
    """`Kind namespace/name` (no namespace: `Kind name`)."""
    meta = doc["metadata"]
    where = f"{meta['namespace']}/" if "namespace" in meta else ""
    return f"{doc['kind']} {where}{meta['name']}"


def digests(docs: list[Manifest]) -> dict[str, str]:
    """Object key -> sha256 of its canonical JSON (sorted keys), normalised as above."""
    found: dict[str, str] = {}
    for doc in sourced(unhashed(docs)):
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert key(doc) not in found, f"{key(doc)} rendered twice"
        found[key(doc)] = hashlib.sha256(text.encode()).hexdigest()
    return dict(sorted(found.items()))


def rendered() -> dict[str, dict[str, str]]:
    """Digests of every target, by its path relative to k8s/."""
    return {str(path.relative_to(REPO / "k8s")): digests(render(path)) for path in targets()}


def main() -> int:
    json.dump(rendered(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
