"""Issue 17: every public signature has type hints, and they name real objects.

Public: the names in each API module's ``__all__``, with their classes' public methods and ``__init__``
(inherited ones from pyro_sde bases included).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import typing

import pytest

MODULES = [
    "pyro_sde",
    "pyro_sde.infer",
    "pyro_sde.infer.annealing",
    "pyro_sde.infer.kernels",
    "pyro_sde.infer.bridge",
    "pyro_sde.sde",
    "pyro_sde.diagnostics",
    "pyro_sde.scores",
    "pyro_sde.nn",
    "pyro_sde.targets",
    "pyro_sde.ratio",
    "pyro_sde._progress",  # private, but its options are the trainers' progress_bar=
]
_TYPE_CHECKING = ("TYPE_CHECKING", "typing.TYPE_CHECKING")
_UNCHECKED_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _ours(obj) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.startswith("pyro_sde")


def _methods(cls):
    """``(name, function)`` of a class's public methods, ``__init__`` and properties (their getters),
    over its pyro_sde bases (not torch's or Pyro's)."""
    for klass in cls.__mro__:
        if not _ours(klass):
            continue
        for name, attr in vars(klass).items():
            if name.startswith("_") and name != "__init__":
                continue
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            elif isinstance(attr, property):
                attr = attr.fget
            if inspect.isfunction(attr):
                yield attr


def public_functions(module_names=MODULES) -> dict[str, typing.Callable]:
    """Qualified name -> function, for every public function and method of ``module_names``."""
    found = {}
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not _ours(obj):
                continue
            functions = _methods(obj) if inspect.isclass(obj) else [obj] if inspect.isfunction(obj) else []
            for fn in functions:
                found.setdefault(f"{fn.__module__}.{fn.__qualname__}", fn)
    return found


def missing_hints(fn) -> list[str]:
    """The parameters (except self / cls / *args / **kwargs) and the return (except of ``__init__``)
    of ``fn`` that have no annotation."""
    sig = inspect.signature(fn)
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.name not in ("self", "cls") and p.kind not in _UNCHECKED_KINDS and p.annotation is p.empty
    ]
    if fn.__name__ != "__init__" and sig.return_annotation is sig.empty:
        missing.append("return")
    return missing


def _type_checking_imports(module) -> dict:
    """The names ``module`` imports under ``if TYPE_CHECKING:`` (those imports run here, relative to its
    package; an optional dependency that is not installed is left out)."""
    ns = {"__name__": module.__name__, "__package__": module.__package__}
    for node in ast.parse(inspect.getsource(module)).body:
        if not (isinstance(node, ast.If) and ast.unparse(node.test) in _TYPE_CHECKING):
            continue
        for stmt in node.body:
            try:
                exec(compile(ast.Module([stmt], type_ignores=[]), module.__file__, "exec"), ns)
            except ImportError:  # pragma: no cover - optional dependencies
                pass
    return {k: v for k, v in ns.items() if not k.startswith("__")}


def _annotation_namespace(fn) -> dict:
    """The function's module globals plus the names its module imports under ``TYPE_CHECKING``."""
    module = importlib.import_module(fn.__module__)
    return {**vars(module), **_type_checking_imports(module)}


def test_the_walk_finds_the_api():
    functions = public_functions()
    assert len(functions) > 350
    for name in [
        "pyro_sde.infer.diffusion.sampler.DiffusionSampler.__init__",
        "pyro_sde.infer._base.PosteriorSampler.get_samples",  # inherited by the samplers
        "pyro_sde.sde.models.OrnsteinUhlenbeck.transition_log_prob",
        "pyro_sde.targets.Gaussian.mean",  # a property
        "pyro_sde.infer.precondition.Preconditioner.identity",  # a classmethod
        "pyro_sde._arviz.to_inference_data",
        "pyro_sde.ratio.base.RatioEstimator.fit",  # inherited by the ratio estimators
        "pyro_sde.ratio.tangent._TimeScoreEstimator.__init__",  # a private base of a public class
        "pyro_sde.ratio.sbi.RatioPosterior.get_weighted_samples",
        "pyro_sde.nn.ratio_networks.TimeScoreNetwork.forward",
    ]:
        assert name in functions, name


def test_missing_hints_flags_what_lacks_them():
    def unannotated(a, b: int, *args, c=1, **kwargs):
        return a

    def annotated(a: int, *args: int, c: str = "", **kwargs: float) -> None:
        pass

    assert missing_hints(unannotated) == ["a", "c", "return"]
    assert missing_hints(annotated) == []


def test_type_checking_imports_are_found():
    import pyro_sde.infer.bridge
    import pyro_sde.ratio.base
    import pyro_sde.ratio.paths

    names = _type_checking_imports(pyro_sde.ratio.base)
    assert names["InterpolationPath"] is pyro_sde.ratio.paths.InterpolationPath  # a relative import
    assert "InterpolationPath" not in vars(pyro_sde.ratio.base)  # only under TYPE_CHECKING
    assert _type_checking_imports(pyro_sde.infer.bridge) == {}


def test_public_signatures_have_type_hints():
    offenders = [
        f"{name}({param})"
        for name, fn in sorted(public_functions().items())
        for param in missing_hints(fn)
    ]
    assert not offenders, f"{len(offenders)} public parameters/returns without a type hint:\n" + "\n".join(
        offenders
    )


@pytest.mark.parametrize("module_name", MODULES)
def test_type_hints_resolve(module_name):
    """Every hint is a valid expression naming real objects (no typos hidden by string annotations)."""
    bad = []
    for name, fn in sorted(public_functions([module_name]).items()):
        try:
            typing.get_type_hints(fn, globalns=_annotation_namespace(fn))
        except Exception as error:  # report every failure
            bad.append(f"{name}: {type(error).__name__}: {error}")
    assert not bad, "\n".join(bad)
