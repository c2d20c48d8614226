#!/usr/bin/env python3
"""The layer rule, checked on the sources: every #include "x/..." of a file may reach only its own layer and the
layers below it. The build enforces the same through per-layer include roots (third_party/cmake/moelab_layers.cmake);
this test names the offending file and line in words. Usage: check_layers.py SOURCE_DIR"""
import pathlib
import re
import sys

# Each layer and what its files may include, by path prefix (a layer always reaches itself).
BELOW = {
    "engine": [],
    "data": [],
    "nn": ["engine", "data"],
    "moe/analysis": ["engine", "data", "nn", "moe"],
    "moe": ["engine", "data", "nn"],  # the model does not depend on the metrics in moe/analysis
    "optim": ["engine", "data", "nn", "moe"],
    "apps/train": ["engine", "data", "nn", "moe", "moe/analysis", "optim"],
    "apps/analysis": ["engine", "data", "nn", "moe", "moe/analysis", "optim", "apps/train"],
    "apps/report": ["engine", "data", "nn", "moe", "moe/analysis", "optim", "apps/train", "apps/analysis"],
    "apps/study": ["engine", "data", "nn", "moe", "moe/analysis", "optim", "apps/train", "apps/analysis",
                   "apps/report"],
}
for tool, library in [("moe-train", "apps/train"), ("moe-bench", "apps/train"), ("moe-eval", "apps/analysis"),
                      ("moe-analyze", "apps/report"), ("moe-study", "apps/study")]:
    BELOW["apps/" + tool] = BELOW[library] + [library]
LAYERS = sorted(BELOW, key=len, reverse=True)  # longest prefix first: moe/analysis before moe
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def layer_of(path: str):
    return next((layer for layer in LAYERS if path == layer or path.startswith(layer + "/")), None)


def main(root: pathlib.Path) -> int:
    problems = []
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root).as_posix()
        if file.suffix not in (".h", ".cpp", ".cu", ".cuh") or rel.startswith(("build/", "third_party/")):
            continue
        layer = layer_of(rel)
        if layer is None:
            continue  # tests/ and scripts may include anything
        allowed = [layer] + BELOW[layer]
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            m = INCLUDE.match(line)
            if not m:
                continue
            target = layer_of(m.group(1))
            if target is not None and target not in allowed:
                problems.append(f"{rel}:{number}: includes {m.group(1)}, but {layer} may include only "
                                f"{', '.join(allowed)}")
    for p in problems:
        print(p)
    print(f"layer rule: {len(problems)} upward include(s)" if problems else "layer rule: every include goes down")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
