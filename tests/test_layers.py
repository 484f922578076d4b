"""The layering rules, checked on the source: a change that breaks one fails here.

- backbones import nothing of pipeline, cli, train, eval (a model is usable without them);
- face, media and audio import no backbone (and face code knows no model);
- the pipeline (and the runner, analysis, cache) import no training code;
- eval imports no training code; train imports eval's metric modules only, never its protocol.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dubber"


def imports_of(path: Path):
    """Every dubber module a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("dubber")}


def modules(*parts: str):
    for part in parts:
        target = PACKAGE / part
        yield from (sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")])


def starts(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


RULES = [
    (("backbones",), ("dubber.pipeline", "dubber.cli", "dubber.train", "dubber.eval", "dubber.batch", "dubber.apply")),
    (("face", "media", "audio", "errors"), ("dubber.backbones", "dubber.pipeline", "dubber.train", "dubber.eval")),
    (("pipeline", "apply", "analysis", "cache", "conditioning", "data", "batch", "blend"), ("dubber.train", "dubber.eval")),
    (("eval",), ("dubber.train",)),
    (("train",), ("dubber.eval.run", "dubber.pipeline", "dubber.cli")),
]


@pytest.mark.parametrize("sources, forbidden", RULES, ids=lambda v: "+".join(v) if isinstance(v[0], str) else None)
def test_layering(sources, forbidden):
    broken = [f"{path.relative_to(PACKAGE)} imports {name}" for path in modules(*sources)
              for name in sorted(imports_of(path)) if starts(name, forbidden)]
    assert not broken, "\n".join(broken)


def test_the_checker_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dubber.train.loop import train\n    import dubber.eval.run\n")
    assert {"dubber.train.loop", "dubber.eval.run"} <= imports_of(source)
