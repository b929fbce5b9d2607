"""`%%terra --compare`: time the same loop eagerly and as a tf.function, from the same state.

Re-running a training loop changes model state, so the comparison is bracketed by a snapshot:
- tf.Variables (and Keras variables) reachable from the user namespace — directly, through
  `.variables` of models, layers, optimizers, metrics, tf.Modules, or inside lists, tuples
  and dicts one level down — are saved as numpy copies and assigned back;
- Python's `random` and numpy's global RNG states are saved and restored;
- the namespace's bindings are restored: names the loop added are removed, rebound ones are
  put back.
Not restored (documented limits): Python objects mutated in place (a list the loop appends
to), variables created during the comparison, TensorFlow's internal op-seed counter, files
or other I/O. The loop header is evaluated again, so an iterator the run already consumed
yields nothing and that timing is "not run". Output printed during the re-runs is captured,
not shown; it is compared between eager and tf.function.

Both re-runs start from the state the `%%terra` run left and run at most MAX_ITERATIONS;
afterwards that state is restored, so the user keeps exactly the `%%terra` run's results.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import linecache
import random
import re
import statistics
import time
import types

from terra_nb.engine.report import Comparison, Timing
from terra_nb.engine.tolerance import COMPARE_ATOL, RUN_RTOL
from terra_nb.engine.usercode import lines_in

CELL_FILES = ("<terra-cell-", "<terra-compare-")  # the cell's own code, and its step function

MAX_ITERATIONS = 20


class _Timer:
    """Times each body execution; stops the loop after `limit` iterations."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seconds: list[float] = []

    def stop(self) -> bool:
        return len(self.seconds) >= self.limit

    @contextlib.contextmanager
    def iteration(self):
        start = time.perf_counter()
        yield
        self.seconds.append(time.perf_counter() - start)


# ---- building the two loops ----


def build_loops(loop: ast.stmt, filename: str, timer: str, step: str,
                wrap: str) -> tuple[types.CodeType, types.CodeType | None, str]:
    """Code for the eager loop and the tf.function loop (or None and why not).

    `loop` is the cell's outermost loop, parsed with the cell's line numbers, so tracebacks
    point at the user's lines. The step function is real source text (AutoGraph reads it) put
    in linecache under its own name, its body on the same line numbers as in the cell; it is
    decorated with the callable named `wrap`.
    """
    eager = copy.deepcopy(loop)
    eager.body = [_stop_check(timer), _timed(timer, eager.body, eager)]
    eager_code = compile(_module([eager]), filename, "exec")
    if not isinstance(loop, ast.For):
        return eager_code, None, "a while loop's body cannot be passed to tf.function as a step"
    if loop.body[0].lineno == loop.lineno:
        return eager_code, None, "the loop body shares its line with the `for`"
    if _breaks_out(loop.body):
        return eager_code, None, ("the loop body uses break/continue/return/yield, which a "
                                  "tf.function step cannot express")
    params = sorted(_stored_names(loop.target))
    assigned = sorted(_assigned_names(loop.body) - set(params))
    step_file = filename.replace("<terra-cell-", "<terra-compare-")
    source = _step_source(filename, loop, step, params, assigned, wrap)
    linecache.cache[step_file] = (len(source), None, source.splitlines(keepends=True), step_file)
    definition = ast.parse(source, step_file)
    call = ast.Expr(ast.Call(ast.Name(step, ast.Load()),
                             [ast.Name(name, ast.Load()) for name in params], []))
    graph_loop = copy.deepcopy(loop)
    graph_loop.body = [_stop_check(timer), _timed(timer, [ast.copy_location(call, loop)], loop)]
    function_code = (compile(definition, step_file, "exec"),
                     compile(_module([graph_loop]), filename, "exec"))
    return eager_code, function_code, ""


def _step_source(filename: str, loop: ast.For, step: str, params: list, assigned: list,
                 wrap: str) -> str:
    """`def step(params): global ...; <the body's own lines>; step = wrap(step)`.

    The body keeps its line numbers: the `def` and `global` lines fill the lines above it,
    where the cell has its `for` header (line 1 is `%%terra`, so there are always two).
    """
    lines = linecache.getlines(filename)
    first, last = loop.body[0].lineno, loop.body[-1].end_lineno
    indent = lines[first - 1][: len(lines[first - 1]) - len(lines[first - 1].lstrip())]
    body = [("    " + line[len(indent):]) if line.startswith(indent) else line
            for line in lines[first - 1: last]]
    head = [f"def {step}({', '.join(params)}):\n"]
    if assigned:
        head.append(f"    global {', '.join(assigned)}\n")
    pad = ["\n"] * (first - 1 - len(head))
    return "".join(pad + head + body + [f"{step} = {wrap}({step})\n"])


def _module(body):
    module = ast.Module(body=body, type_ignores=[])
    ast.fix_missing_locations(module)
    return module


def _stop_check(timer: str) -> ast.If:
    test = ast.Call(ast.Attribute(ast.Name(timer, ast.Load()), "stop", ast.Load()), [], [])
    return ast.If(test=test, body=[ast.Break()], orelse=[])


def _timed(timer: str, body, where) -> ast.With:
    item = ast.withitem(ast.Call(ast.Attribute(ast.Name(timer, ast.Load()), "iteration",
                                               ast.Load()), [], []))
    return ast.copy_location(ast.With(items=[item], body=body), where)


def _stored_names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)
            and isinstance(n.ctx, ast.Store)}


def _assigned_names(body) -> set[str]:
    """Names the body binds at its own level (not inside nested functions/classes/lambdas)."""
    names: set[str] = set()
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
                             ast.GeneratorExp)):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names


def _breaks_out(body) -> bool:
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Break, ast.Continue, ast.Return, ast.Yield, ast.YieldFrom)):
            return True
        if isinstance(node, (ast.For, ast.While, ast.AsyncFor, ast.FunctionDef,
                             ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            # break/continue inside an inner loop stay inside it; functions have their own
            if isinstance(node, (ast.For, ast.While, ast.AsyncFor)):
                stack.extend(n for n in ast.walk(node) if isinstance(n, (ast.Return, ast.Yield)))
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


# ---- state ----


def reachable_variables(namespace: dict) -> list:
    """Variables the loop can change, found from the user's names (see module docstring)."""
    found: dict[int, object] = {}

    def visit(value, depth: int) -> None:
        if isinstance(value, types.ModuleType) or isinstance(value, type):
            return
        if _is_variable(value):
            found.setdefault(id(value), value)
            return
        owned = getattr(type(value), "variables", None)
        if isinstance(owned, property):
            try:
                for variable in value.variables:
                    if _is_variable(variable):
                        found.setdefault(id(variable), variable)
            except Exception:  # a half-built object: nothing of it to restore
                pass
        elif depth > 0 and isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth - 1)
        elif depth > 0 and isinstance(value, dict):
            for item in value.values():
                visit(item, depth - 1)

    for name, value in list(namespace.items()):
        if not name.startswith("_"):
            visit(value, 1)
    return list(found.values())


def _is_variable(value) -> bool:
    kind = type(value)
    return (hasattr(kind, "assign") and hasattr(kind, "numpy") and hasattr(value, "dtype")
            and "Variable" in "".join(k.__name__ for k in kind.__mro__))


class Snapshot:
    """Saved variable values, RNG states and namespace bindings; `restore()` puts them back."""

    def __init__(self, namespace: dict, variables: list) -> None:
        import numpy as np

        self.namespace = namespace
        self.bindings = dict(namespace)
        self.variables = [(v, np.array(v.numpy(), copy=True)) for v in variables]
        self.python_rng = random.getstate()
        self.numpy_rng = np.random.get_state()

    def values(self) -> list:
        return [variable.numpy() for variable, _ in self.variables]

    def restore(self) -> None:
        import numpy as np

        for variable, value in self.variables:
            variable.assign(value)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)
        for name in [name for name in self.namespace if name not in self.bindings]:
            del self.namespace[name]
        for name, value in self.bindings.items():
            if self.namespace.get(name, _MISSING) is not value:
                self.namespace[name] = value


_MISSING = object()


# ---- running ----


def compare(namespace: dict, eager_code, function_code, why_not: str, timer_name: str,
            wrap_name: str, iterations: int) -> Comparison:
    """Run both loops from the current state, restore it, and say what was measured."""
    import tensorflow as tf

    limit = max(2, min(iterations, MAX_ITERATIONS))
    snapshot = Snapshot(namespace, reachable_variables(namespace))
    try:
        eager, eager_out, eager_values = _run(namespace, eager_code, timer_name, limit, snapshot)
        snapshot.restore()
        timings = [eager]
        if function_code is None:
            timings.append(Timing("tf.function", 0, None, "not run", why_not))
        else:
            wrapped = {}

            def wrap(fn):
                wrapped["fn"] = tf.function(fn)
                return wrapped["fn"]

            namespace[wrap_name] = wrap
            graph, graph_out, graph_values = _run(namespace, function_code, timer_name, limit,
                                                  snapshot, "tf.function")
            fn = wrapped.get("fn")
            if fn is not None:
                graph = _with_retraces(graph, fn)
            if graph.status == "ok" and eager.status == "ok":
                graph = _check_same(graph, eager, eager_out, eager_values, graph_out,
                                    graph_values, snapshot)
            timings.append(graph)
    finally:
        snapshot.restore()
    return Comparison(limit, tuple(timings), len(snapshot.variables))


def _run(namespace, code, timer_name, limit, snapshot, name: str = "eager"):
    timer = _Timer(limit)
    namespace[timer_name] = timer
    out = io.StringIO()
    status, detail = "ok", ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            for part in code if isinstance(code, tuple) else (code,):
                exec(part, namespace)
    except Exception as error:  # the user's code failing in this mode is a result, not a bug
        status, detail = "failed", _error_text(error)
    values = snapshot.values()
    if status == "ok" and not timer.seconds:
        status, detail = "not run", ("the loop yielded no iterations when re-run (an iterator "
                                     "the run consumed, or a while condition now false)")
    median = statistics.median(timer.seconds[1:]) * 1e3 if len(timer.seconds) > 1 else None
    return Timing(name, len(timer.seconds), median, status, detail), out.getvalue(), values


def _with_retraces(timing: Timing, fn) -> Timing:
    try:
        traces = fn.experimental_get_tracing_count()
    except Exception:
        return timing
    return Timing(timing.name, timing.iterations, timing.median_ms, timing.status,
                  timing.detail, traces)


def _check_same(graph, eager, eager_out, eager_values, graph_out, graph_values, snapshot):
    """tf.function 'changed results' when printed output or a variable differs from eager."""
    import numpy as np

    if graph.iterations != eager.iterations:
        return graph
    if graph_out != eager_out:
        detail = (f"printed output differs from eager ({len(eager_out.splitlines())} lines "
                  f"eagerly, {len(graph_out.splitlines())} as tf.function)")
        return _changed(graph, detail)
    for (variable, _), a, b in zip(snapshot.variables, eager_values, graph_values, strict=True):
        if np.issubdtype(np.asarray(a).dtype, np.number) and not np.allclose(
                a, b, rtol=RUN_RTOL, atol=COMPARE_ATOL, equal_nan=True):
            worst = float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))))
            name = getattr(variable, "path", None) or getattr(variable, "name", "a variable")
            return _changed(graph, f"{name} differs from eager by up to {worst:.3g} after "
                                   f"{graph.iterations} iterations (rtol {RUN_RTOL})")
        if not np.issubdtype(np.asarray(a).dtype, np.number) and not np.array_equal(a, b):
            return _changed(graph, f"{getattr(variable, 'name', 'a variable')} differs")
    return graph


def _changed(timing: Timing, detail: str) -> Timing:
    return Timing(timing.name, timing.iterations, timing.median_ms, "changed results", detail,
                  timing.retraces)


def _error_text(error: BaseException) -> str:
    """The error's own message line and the innermost cell line it came from."""
    text = str(error)
    lines = re.findall(r'"<terra-(?:cell|compare)-[0-9a-f]+>", line (\d+)', text)
    lines += [str(line) for line in lines_in(error.__traceback__, CELL_FILES)]
    # AutoGraph wraps errors as "in user code: ... File ..., line N ... Error: message".
    message = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = message[-1] if message else ""
    where = f" at cell line {lines[0] if 'in user code' in text and lines else lines[-1]}" \
        if lines else ""
    name = type(error).__name__
    last = last[len(name) + 2:] if last.startswith(name + ": ") else last
    return f"{name}{where}: {last}"[:300]
