"""The verifier service uses its target engine only through :class:`cosine.engine.backend.TargetBackend`, and
both engines of the package (the model engine and the simulation's) implement it."""

from __future__ import annotations

import ast
import pathlib

from cosine.engine.backend import TargetBackend
from cosine.engine.runner import ModelRunner
from cosine.engine.target import TargetVerifier
from cosine.sim.engines import SimModel, SimTarget

from .helpers import tiny_llama

SERVICE = pathlib.Path(__file__).resolve().parent.parent / "cosine" / "service"
MEMBERS = {name for name in dir(TargetBackend) if not name.startswith("_")} | set(
    TargetBackend.__protocol_attrs__ if hasattr(TargetBackend, "__protocol_attrs__") else ())


def _engine_uses(tree: ast.AST) -> set[str]:
    """Attributes read off anything named ``engine`` (``engine.x``, ``self.engine.x``, ``book.engine.x``)."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            if name == "engine":
                used.add(node.attr)
    return used


def test_the_service_layer_touches_only_the_backend_interface():
    used = {}
    for path in SERVICE.glob("*.py"):
        for attr in _engine_uses(ast.parse(path.read_text())):
            used.setdefault(attr, []).append(path.name)
    assert used, "the walk found no use of the engine at all"
    outside = {a: files for a, files in used.items() if a not in MEMBERS}
    assert not outside, f"the service reaches past TargetBackend: {outside}"


def test_the_reference_and_simulated_engines_implement_it():
    assert isinstance(TargetVerifier(ModelRunner(tiny_llama()), None), TargetBackend)
    assert isinstance(SimTarget(SimModel(97)), TargetBackend)
