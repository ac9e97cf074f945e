"""Writes cluster/settings.yaml into the cluster files, so each deployment value is set in one place.

A line that takes a setting ends in ``# settings: <key>``; its value (the scalar before the comment) is replaced by
``settings[<key>]``. Usage, from the repository root:

    python cluster/sync_settings.py            # rewrite the files that differ, list them
    python cluster/sync_settings.py --check    # exit 1 and list the files that differ (CI, tests)
    python cluster/sync_settings.py --get image    # print one setting (for `docker build -t "$(...)"`)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import yaml

CLUSTER = os.path.dirname(os.path.abspath(__file__))
SETTINGS = os.path.join(CLUSTER, "settings.yaml")

# `key: value  # settings: name`, `- value  # settings: name`, `- &anchor value  # settings: name`
_MARKED = re.compile(r"^(?P<head>.*?(?::|-)[ \t]+(?:&[\w-]+[ \t]+)?)(?P<value>[^\s#]+)"
                     r"(?P<tail>[ \t]+#[ \t]*settings:[ \t]*(?P<key>\w+).*)$")


def load_settings(path: str = SETTINGS) -> dict[str, str]:
    with open(path) as f:
        settings = yaml.safe_load(f) or {}
    for key, value in settings.items():
        text = str(value)
        # The value is written as a plain YAML scalar: it must read back as the same string.
        if not text or re.search(r"\s|#", text) or yaml.safe_load(f"k: {text}") != {"k": text}:
            raise ValueError(f"{path}: {key}={value!r} must be one word that YAML reads back as itself")
        settings[key] = text
    return settings


def sync_text(text: str, settings: dict[str, str], where: str = "<text>") -> tuple[str, set[str]]:
    """Returns ``text`` with every marked value replaced, and the setting keys it uses."""
    used: set[str] = set()
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        if "settings:" not in line:
            continue
        body = line.rstrip("\r\n")
        match = _MARKED.match(body)
        if match is None:
            continue
        key = match["key"]
        if key not in settings:
            raise KeyError(f"{where}:{number} names setting {key!r}, which {SETTINGS} does not define")
        used.add(key)
        lines[number - 1] = match["head"] + settings[key] + match["tail"] + line[len(body):]
    return "".join(lines), used


def target_files(root: str = CLUSTER) -> list[str]:
    found = []
    for folder, _dirs, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if n.endswith((".yaml", ".yml")) and n != "settings.yaml"]
    return sorted(found)


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".sync-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def sync(check: bool, settings_path: str = SETTINGS, root: str = CLUSTER) -> list[str]:
    """Rewrites (or with ``check`` only lists) the files whose marked values differ from the settings."""
    settings = load_settings(settings_path)
    differing = []
    for path in target_files(root):
        with open(path) as f:
            text = f.read()
        new, _ = sync_text(text, settings, where=path)
        if new != text:
            differing.append(path)
            if not check:
                _write_atomic(path, new)
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    parser.add_argument("--get", metavar="KEY", help="print one setting and exit")
    args = parser.parse_args(argv)
    if args.get:
        settings = load_settings()
        if args.get not in settings:
            print(f"unknown setting {args.get!r}; known: {', '.join(settings)}", file=sys.stderr)
            return 2
        print(settings[args.get])
        return 0
    differing = sync(check=args.check)
    for path in differing:
        print(("differs from settings.yaml: " if args.check else "updated: ") + os.path.relpath(path))
    return 1 if args.check and differing else 0


if __name__ == "__main__":
    sys.exit(main())
