"""The `%%terra` cell magic: run a training-loop cell under a terra_nb Session.

The magic only rewrites and runs the cell and reads the Session's events; it knows nothing of
TensorFlow. Its design choices are written down in docs/magic.md.
"""

from __future__ import annotations

import ast
import collections
import copy
import dataclasses
import hashlib
import linecache
import logging
import types
import warnings

from IPython.core.error import UsageError
from IPython.core.inputtransformer2 import TransformerManager
from IPython.core.magic import Magics, cell_magic, magics_class, output_can_be_silenced
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from terra_nb.engine.report import Report
from terra_nb.engine.session import DEFAULT_TRACE_ITERATIONS, Session
from terra_nb.engine.usercode import innermost_user_frame, user_traceback

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
        self.last_panel = None  # the last run's Panel (tests and users may inspect it)

    @magic_arguments()
    @argument(
        "--trace",
        type=int,
        default=DEFAULT_TRACE_ITERATIONS,
        metavar="N",
        help="iterations to run eagerly while recording ops before co-executing "
        "(default: one, and a second when the first creates variables)",
    )
    @argument("--xla", action="store_true", help="compile the graph with XLA")
    @argument(
        "--eager", action="store_true", help="run every iteration plainly eagerly (a baseline)"
    )
    @argument("--no-panel", action="store_true", help="do not display the summary afterwards")
    @argument(
        "--self-check",
        action="store_true",
        help="never replay library code: every Keras call, TensorFlow function and gradient "
        "runs its own Python each iteration and the traced graph checks its ops (slower; rules "
        "out a replay when results look wrong)",
    )
    @argument(
        "--explain",
        action="store_true",
        help="print an explain report: graphs built with their ops, feeds and fetches, and "
        "every fallback with its reason, source line and a suggestion",
    )
    @argument(
        "--compare",
        action="store_true",
        help="afterwards, re-run the loop eagerly and as a tf.function from the same state "
        "(variables and RNG states restored after), and report measured ratios, marking where "
        "tf.function failed or changed results",
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

        The run's second iteration (and every 100th after it) runs plainly eagerly, without
        recording: the eager baseline, measured in the run itself, that every speedup shown is
        taken against. In a notebook a live panel shows the state (tracing / co-executing /
        fallback / eager back-off), the iteration count (with a progress bar when the loop's
        length is known), a chart of per-iteration time with the eager time marked and each
        iteration's speedup, a time breakdown, every fallback with its reason and source line,
        the traced graph, and TensorFlow warnings raised during the run. Afterwards (and in a
        terminal) a summary shows the iterations per mode, the median time per iteration, the
        speedup of co-executed iterations and of the whole run (warm-up included) over the
        eager baseline. A speedup is shown only over measured plain-eager time and names it.
        `terra_nb.report()` returns the summary as data; `terra_nb.plot()` draws the timeline.

        `--compare` re-runs the loop (at most 20 iterations each) eagerly and as a
        tf.function from the state the run left, restoring reachable variables, `random`
        and numpy RNG states and namespace bindings afterwards; objects mutated in place are
        not restored. See docs/magic.md.

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
        settings = (options.trace, options.xla, options.eager, options.self_check)
        session = self._session_for(plan.digest, settings)
        since = session.iterations if plan.has_loop else 0
        if plan.has_loop:
            session.start_run()
        panel = live = handle = None
        if not options.no_panel:
            from terra_nb.notebook.panel import Panel

            panel = Panel(session, since=since)
            panel.attach()
            live = _is_live(self.shell)
            if live:
                handle = display(panel.mimebundle(), raw=True, display_id=True)
        self.last_panel = panel
        loop = LoopLength(panel.set_total if panel is not None else None)
        namespace = self.shell.user_ns
        namespace[plan.session_name] = session
        namespace[plan.loop_name] = loop
        capture = WarningCapture(pass_through=panel is None,
                                 on_warning=panel.add_warning if panel is not None else None)
        error = None
        try:
            with capture:
                exec(plan.code, namespace)
        except BaseException as caught:
            error = caught
        finally:
            namespace.pop(plan.session_name, None)
            namespace.pop(plan.loop_name, None)
            result = namespace.pop(plan.result_name, None)
            session.close()
        comparison = None
        if options.compare and error is None and plan.loop is not None:
            comparison = _compare(namespace, plan, session.iterations - since)
        report = Report.from_session(session, since=since, comparison=comparison,
                                     warnings=tuple(capture.messages),
                                     stopped=_stopped(error, plan.filename))
        report = _locate_failure(report, error, plan.filename)
        self.last_report = report
        if panel is not None:
            panel.finish(report)
            if handle is not None:
                handle.update(panel.mimebundle(), raw=True)
        if error is not None:
            raise _shown_as_the_users(error, self.shell)
        if panel is not None and not live:
            display(report)
        if options.explain:
            print(report.explain())
        return result

    def _session_for(self, digest: str, settings: tuple) -> Session:
        """The cell's Session; a new one when the cell's options changed."""
        known = self._sessions.pop(digest, None)
        if known is not None and known[0] == settings:
            session = known[1]
        else:
            trace, xla, eager, self_check = settings
            session = Session(f"cell-{digest}", trace_iterations=trace, xla=xla, eager=eager,
                              self_check=self_check, baseline=True)
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
    if options.trace is not None and options.trace < 1:
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
    loop_name: str = ""
    filename: str = ""
    loop: ast.stmt | None = None  # the outermost loop as written (for --compare)


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
    loop_name = f"__terra_nb_loop_{digest}__"
    try:
        # IPython syntax (`%magic`, `!cmd`) becomes the Python IPython would run; each such
        # line stays one line, so line numbers stay the user's
        tree = ast.parse("\n" + TransformerManager().transform_cell(cell), filename)
        found = find_outermost_loop(tree.body)
        loop = copy.deepcopy(found[0][found[1]]) if found is not None else None
        has_loop = rewrite_iterations(tree, session_name, result_name, loop_name)
        code = compile(tree, filename, "exec")
    except SyntaxError as error:
        where = f" on line {error.lineno}" if error.lineno else ""
        text = f": {error.text.strip()}" if error.text and error.text.strip() else ""
        raise UsageError(f"%%terra: {type(error).__name__}{where}: {error.msg}{text}") from None
    return CellPlan(digest, code, has_loop, session_name, result_name, loop_name, filename, loop)


def rewrite_iterations(tree: ast.Module, session_name: str, result_name: str,
                       loop_name: str = "") -> bool:
    """Wrap the iterations in the session; return whether the cell has a loop.

    The final expression statement is assigned to `result_name` so the magic can return it.
    With a loop, the loop body is one iteration and the session is closed right after the
    loop, so the code after it sees finished work. Without one, the whole cell is one iteration.
    With `loop_name`, a `for` loop's iterable (or the first argument of `enumerate(...)`) is
    passed through `loop_name.sized(...)`, which notes its length and returns it unchanged.
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
        if loop_name and isinstance(loop, ast.For):
            _measure_iterable(loop, loop_name)
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


def _measure_iterable(loop: ast.For, loop_name: str) -> None:
    """Wrap the iterable in `loop_name.sized(...)`; evaluation order is unchanged."""
    target = loop.iter
    if (isinstance(target, ast.Call) and isinstance(target.func, ast.Name)
            and target.func.id == "enumerate" and target.args
            and not isinstance(target.args[0], ast.Starred)):
        target.args[0] = _sized(loop_name, target.args[0])
    else:
        loop.iter = _sized(loop_name, target)


def _sized(loop_name: str, node: ast.expr) -> ast.Call:
    call = _call(loop_name, "sized")
    call.args = [node]
    return ast.copy_location(call, node)


def _call(name: str, method: str) -> ast.Call:
    target = ast.Attribute(ast.Name(name, ast.Load()), method, ast.Load())
    return ast.Call(func=target, args=[], keywords=[])


# ---- run helpers: live display, loop length, warnings, --compare, where it stopped ----


def _is_live(shell) -> bool:
    """A kernel with a frontend that can show widgets (not terminal IPython)."""
    return getattr(shell, "kernel", None) is not None


class LoopLength:
    """`sized(iterable)`: notes the loop's length when the iterable has a `len()`.

    The rewritten loop calls it once with the iterable it already evaluated, so nothing is
    evaluated twice; `len()` is asked only of objects whose type defines `__len__`.
    """

    def __init__(self, on_total=None) -> None:
        self.total: int | None = None
        self._on_total = on_total

    def sized(self, iterable):
        if hasattr(type(iterable), "__len__"):
            try:
                length = len(iterable)
            except Exception:  # e.g. a tf.data.Dataset of unknown cardinality
                length = None
            if isinstance(length, int) and length >= 0:
                self.total = length
                if self._on_total is not None:
                    self._on_total(length)
        return iterable


class WarningCapture:
    """Collects Python warnings and `tensorflow`-logger warnings raised during the run.

    With a panel they are shown there (and in the report) instead of the cell's stderr; with
    `pass_through` (no panel) they are also shown as usual. Filters are left as they are:
    what Python would show once is recorded once.
    """

    def __init__(self, *, pass_through: bool, on_warning=None) -> None:
        self.pass_through = pass_through
        self._on_warning = on_warning
        self._counts: dict[str, int] = {}
        self._catch = None
        self._logger = logging.getLogger("tensorflow")

    @property
    def messages(self) -> list[str]:
        return [text if count == 1 else f"{text} (x{count})"
                for text, count in self._counts.items()]

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        self._show_previous = warnings.showwarning
        warnings.showwarning = self._show
        self._logger.addFilter(self._filter)
        return self

    def __exit__(self, *exc_info) -> None:
        self._logger.removeFilter(self._filter)
        self._catch.__exit__(*exc_info)

    def _record(self, text: str) -> None:
        text = " ".join(text.split())
        first = text not in self._counts
        self._counts[text] = self._counts.get(text, 0) + 1
        if first and self._on_warning is not None:
            self._on_warning(text)

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        self._record(f"{category.__name__}: {message} ({filename}:{lineno})")
        if self.pass_through:
            self._show_previous(message, category, filename, lineno, file, line)

    def _filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        self._record(f"tensorflow {record.levelname}: {record.getMessage()}")
        return self.pass_through


def _compare(namespace: dict, plan: CellPlan, iterations: int):
    """`--compare`: the loop re-run eagerly and as a tf.function (terra_nb/notebook/compare.py)."""
    from terra_nb.engine.report import Comparison, Timing
    from terra_nb.notebook import compare

    names = [f"__terra_nb_{kind}_{plan.digest}__" for kind in ("timer", "step", "wrap")]
    try:
        eager, graph, why_not = compare.build_loops(copy.deepcopy(plan.loop), plan.filename,
                                                    *names)
        # TF's warnings during the re-runs (e.g. tf.function retracing) are not the run's.
        with WarningCapture(pass_through=False):
            return compare.compare(namespace, eager, graph, why_not, names[0], names[2],
                                   iterations)
    except Exception as error:  # never fail the user's cell because a comparison could not run
        detail = f"the comparison itself failed: {type(error).__name__}: {error}"
        return Comparison(0, (Timing("eager", 0, None, "not run", detail),), 0)


def _traceback_of(error: BaseException | None):
    return error.__traceback__ if error is not None else None


def _shown_as_the_users(error: BaseException, shell) -> BaseException:
    """The user's exception, with terra_nb's frames left out, to re-raise as it is.

    IPython shows the frames above the magic too: the cell's `run_cell_magic(...)` line, which
    holds the whole cell as one string. The exception is given a `_render_traceback_` (IPython's
    hook for exceptions that format themselves) that formats from the first line of the cell:
    the user's traceback, in the shell's own style, nothing lost below it.
    """
    shown = user_traceback(error.__traceback__)
    error = error.with_traceback(shown)

    def render() -> list[str]:
        return shell.InteractiveTB.structured_traceback(type(error), error, shown, tb_offset=0)

    if shell is not None and getattr(shell, "InteractiveTB", None) is not None:
        try:
            error._render_traceback_ = render
        except AttributeError:  # an exception type without attributes: shown as IPython does
            pass
    return error


def _stopped(error: BaseException | None, filename: str) -> str:
    if error is None:
        return ""
    frame = innermost_user_frame(_traceback_of(error), filename=filename)
    message = str(error).strip().splitlines()
    text = type(error).__name__ + (f": {message[0]}" if message else "")
    if frame is not None:
        text += f" at cell line {frame.lineno}: {frame.source}"
    return text


def _locate_failure(report: Report, error: BaseException | None, filename: str) -> Report:
    """Give the failed iteration the cell line it stopped at, when the engine had none."""
    if error is None or not report.failures or report.failures[-1].user_frame is not None:
        return report
    frame = innermost_user_frame(_traceback_of(error), filename=filename)
    if frame is None:
        return report
    failures = report.failures[:-1] + (dataclasses.replace(report.failures[-1],
                                                           user_frame=frame),)
    return dataclasses.replace(report, failures=failures)
