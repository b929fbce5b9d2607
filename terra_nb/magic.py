"""The `%%terra` cell magic: run a training-loop cell under a terra_nb Session.

The magic only rewrites and runs the cell and reads the Session's events; it knows nothing of
TensorFlow. Choices DESIGN.md leaves open are written down in docs/magic.md.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import hashlib
import linecache
import os
import types

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, magics_class, output_can_be_silenced
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from terra_nb.session import DEFAULT_TRACE_ITERATIONS, Session
from terra_nb.summary import Report

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MAX_SESSIONS = 32  # cells edited many times would otherwise keep every old trace alive


@magics_class
class TerraMagics(Magics):
    """Holds the Sessions of this IPython session's `%%terra` cells and the last report."""

    def __init__(self, shell=None):
        super().__init__(shell)
        self._sessions: collections.OrderedDict[str, tuple[tuple, Session]] = (
            collections.OrderedDict()
        )
        self.last_report: Report | None = None

    @magic_arguments()
    @argument(
        "--trace",
        type=int,
        default=DEFAULT_TRACE_ITERATIONS,
        metavar="N",
        help=f"iterations to run eagerly while recording ops before co-executing "
        f"(default {DEFAULT_TRACE_ITERATIONS})",
    )
    @argument("--xla", action="store_true", help="compile the graph with XLA")
    @argument(
        "--eager", action="store_true", help="run every iteration plainly eagerly (a baseline)"
    )
    @argument("--no-panel", action="store_true", help="do not display the summary afterwards")
    @argument(
        "--explain",
        action="store_true",
        help="print every graph built and every fallback with its reason and source line",
    )
    @output_can_be_silenced
    @cell_magic
    def terra(self, line, cell):
        """Run a training-loop cell with terra_nb: Terra imperative-symbolic co-execution.

        Write an ordinary eager TensorFlow loop and put `%%terra` on its cell. Each execution
        of the body of the cell's outermost `for`/`while` loop is one iteration. The first
        iterations run eagerly while terra_nb records their TensorFlow ops (tracing); later
        ones run your Python as a skeleton while one compiled graph computes the ops
        (co-execution). Whatever the graph has not seen falls back to eager for that
        iteration and is retraced, so results are those of eager execution. Code before and
        after the loop runs once, as in a plain cell; `break` and `continue` work. A cell
        without a loop is one iteration per run, and re-running it continues its history.

        Afterwards a summary shows the iterations per mode, the median time per iteration,
        the speedup over the measured eager baseline when there is one, and every fallback
        with its reason and source line. `terra_nb.report()` returns it as data.

        Example::

            %%terra --trace 3
            for step in range(100):
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                if step % 10 == 0:
                    print(step, float(loss))
        """
        __tracebackhide__ = True
        options = _parse_options(self.terra, line)
        plan = plan_cell(cell, line)
        settings = (options.trace, options.xla, options.eager)
        session = self._session_for(plan.digest, settings)
        since = session.iterations if plan.has_loop else 0
        namespace = self.shell.user_ns
        namespace[plan.session_name] = session
        try:
            exec(plan.code, namespace)
        except BaseException as error:
            # The same exception, re-raised with a shorter traceback: no new cause to chain.
            raise error.with_traceback(user_traceback(error.__traceback__))  # noqa: B904
        finally:
            namespace.pop(plan.session_name, None)
            result = namespace.pop(plan.result_name, None)
            session.close()
            self.last_report = Report.from_events(session.events, name=session.name, since=since)
        if not options.no_panel:
            display(self.last_report)
        if options.explain:
            print(self.last_report.explain())
        return result

    def _session_for(self, digest: str, settings: tuple) -> Session:
        """The cell's Session; a new one when the cell's options changed."""
        known = self._sessions.pop(digest, None)
        if known is not None and known[0] == settings:
            session = known[1]
        else:
            trace, xla, eager = settings
            session = Session(f"cell-{digest}", trace_iterations=trace, xla=xla, eager=eager)
        self._sessions[digest] = (settings, session)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session


def last_report() -> Report:
    """The report kept by the current IPython shell's `%%terra` magic."""
    from IPython import get_ipython

    shell = get_ipython()
    magics = shell.magics_manager.registry.get(TerraMagics.__name__) if shell else None
    if magics is None or magics.last_report is None:
        raise RuntimeError(
            "terra_nb.report(): no %%terra cell has run in this IPython session yet; "
            "run `%load_ext terra_nb` and a %%terra cell first"
        )
    return magics.last_report


def _parse_options(magic, line: str):
    try:
        options = parse_argstring(magic, line)
    except (UsageError, ValueError) as error:
        raise UsageError(f"%%terra: {error} (see %%terra? for the options)") from None
    if options.trace < 1:
        raise UsageError(f"%%terra: --trace must be at least 1, got {options.trace}")
    return options


# ---- cell rewriting ----


@dataclasses.dataclass(frozen=True)
class CellPlan:
    """A cell compiled for one run: its code and the temporary names it uses."""

    digest: str
    code: types.CodeType
    has_loop: bool
    session_name: str
    result_name: str


def plan_cell(cell: str, line: str = "") -> CellPlan:
    """Compile the cell so that each iteration runs inside `with <session>.iteration():`.

    Line numbers count the `%%terra` line as line 1, as the user sees the cell, and the cell's
    source is registered in linecache so tracebacks show the user's lines.
    """
    digest = hashlib.sha1(cell.encode()).hexdigest()[:12]
    filename = f"<terra-cell-{digest}>"
    source = f"%%terra {line}".rstrip() + "\n" + cell
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    session_name = f"__terra_nb_session_{digest}__"
    result_name = f"__terra_nb_result_{digest}__"
    try:
        tree = ast.parse("\n" + cell, filename)
        has_loop = rewrite_iterations(tree, session_name, result_name)
        code = compile(tree, filename, "exec")
    except SyntaxError as error:
        where = f" on line {error.lineno}" if error.lineno else ""
        text = f": {error.text.strip()}" if error.text and error.text.strip() else ""
        raise UsageError(f"%%terra: {type(error).__name__}{where}: {error.msg}{text}") from None
    return CellPlan(digest, code, has_loop, session_name, result_name)


def rewrite_iterations(tree: ast.Module, session_name: str, result_name: str) -> bool:
    """Wrap the iterations in the session; return whether the cell has a loop.

    The final expression statement is assigned to `result_name` so the magic can return it.
    With a loop, the loop body is one iteration and the session is closed right after the
    loop, so the code after it sees finished work. Without one, the whole cell is one iteration.
    """
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        tree.body[-1] = ast.copy_location(
            ast.Assign(targets=[ast.Name(result_name, ast.Store())], value=last.value), last
        )
    found = find_outermost_loop(tree.body)
    if found is None:
        tree.body = [_iteration(session_name, tree.body or [ast.Pass()], tree.body)]
    else:
        block, position = found
        loop = block[position]
        loop.body = [_iteration(session_name, loop.body, [loop])]
        close = ast.Expr(_call(session_name, "close"))
        block[position] = ast.copy_location(
            ast.Try(body=[loop], handlers=[], orelse=[], finalbody=[close]), loop
        )
    ast.fix_missing_locations(tree)
    return found is not None


def find_outermost_loop(body: list[ast.stmt]) -> tuple[list[ast.stmt], int] | None:
    """The first `for`/`while` not inside another loop, function or class.

    Returns the statement list holding it and its position there. Loops inside top-level
    `with`, `if` and `try` blocks count: `with tf.device(...): for ...` is a training loop.
    """
    for position, statement in enumerate(body):
        if isinstance(statement, (ast.For, ast.While)):
            return body, position
        for block in _blocks(statement):
            found = find_outermost_loop(block)
            if found is not None:
                return found
    return None


def _blocks(statement: ast.stmt) -> list[list[ast.stmt]]:
    if isinstance(statement, (ast.With, ast.AsyncWith)):
        return [statement.body]
    if isinstance(statement, ast.If):
        return [statement.body, statement.orelse]
    if isinstance(statement, (ast.Try, ast.TryStar)):
        handlers = [handler.body for handler in statement.handlers]
        return [statement.body, *handlers, statement.orelse, statement.finalbody]
    return []


def _iteration(session_name: str, body: list[ast.stmt], where: list[ast.stmt]) -> ast.With:
    item = ast.withitem(context_expr=_call(session_name, "iteration"))
    node = ast.With(items=[item], body=body)
    return ast.copy_location(node, where[0]) if where else node


def _call(name: str, method: str) -> ast.Call:
    target = ast.Attribute(ast.Name(name, ast.Load()), method, ast.Load())
    return ast.Call(func=target, args=[], keywords=[])


# ---- tracebacks ----


def user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback without terra_nb's own frames, so the user's cell line is on top.

    If the error was raised inside terra_nb itself, it is terra_nb's bug: keep everything.
    """
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    if not entries or _is_ours(entries[-1]):
        return entries[0] if entries else None
    kept = None
    for entry in reversed(entries):
        if not _is_ours(entry):
            kept = types.TracebackType(kept, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return kept


def _is_ours(entry: types.TracebackType) -> bool:
    return entry.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR + os.sep)
