"""Whose code is this: the user's or a library's. The one place that decides it.

User code is what the user wrote: notebook cells (this cell or earlier ones, whose classes and
functions live in the kernel's `__main__` and have no source file), `%%terra` cells, scripts and
tests. Library code is anything installed (TensorFlow, Keras, the standard library, terra_nb
itself). The engine asks this for every op's program location (Terra's node identity: the
user's call-site stack), before replaying a library call (only library code may be replayed
without running its Python), and when it shows an error (the user's frames, not ours).
"""

from __future__ import annotations

import linecache
import os
import site
import sys
import sysconfig
import threading
import types

from terra_nb.engine.events import UserFrame

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _library_prefixes() -> tuple[str, ...]:
    prefixes = {PACKAGE_DIR}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            prefixes.add(os.path.abspath(path) + os.sep)
    for path in site.getsitepackages() + [site.getusersitepackages()]:
        prefixes.add(os.path.abspath(path) + os.sep)
    return tuple(sorted(prefixes))


_LIBRARY_PREFIXES = _library_prefixes()
_is_user_file: dict[str, bool] = {}


def is_user_file(filename: str) -> bool:
    """User code is anything not installed as a library (notebook cells, scripts, tests)."""
    known = _is_user_file.get(filename)
    if known is None:
        if filename.startswith("<frozen") or filename.startswith("<string"):
            known = False
        else:
            known = not os.path.abspath(filename).startswith(_LIBRARY_PREFIXES)
        _is_user_file[filename] = known
    return known


# id(code) -> is_user_file of its file. By id: code objects compare equal across files (the
# same source in a library and in a cell), and a code object's hash is computed anew at each
# lookup (~35 ns against ~10 by id; an op's walk visits ~24 frames on bert_cls). The codes are
# held in _JUDGED so that none of those ids is reused.
_is_user_code: dict[int, bool] = {}
_JUDGED: list = []


def is_user_code(code: types.CodeType) -> bool:
    """`is_user_file` of a code object's file, cached per code object (asked for every op)."""
    known = _is_user_code.get(id(code))
    if known is None:
        known = is_user_file(code.co_filename)
        _JUDGED.append(code)
        _is_user_code[id(code)] = known
    return known


def _code_of(function) -> types.CodeType | None:
    return getattr(getattr(function, "__func__", function), "__code__", None)


def is_library_function(function) -> bool:
    """A function (or bound method) whose Python code is a library's. Anything else (the
    user's code, or a callable whose code cannot be seen, e.g. a functools.partial) is not."""
    code = _code_of(function)
    return code is not None and not is_user_code(code)


_is_user_class: dict = {}


def is_user_class(cls: type) -> bool:
    """A class the user wrote: defined in `__main__` (a notebook cell or the script being
    run), or in a module whose file is not a library's. A module without a file (made at run
    time) is judged by the code of the functions the class defines itself."""
    known = _is_user_class.get(cls)
    if known is None:
        known = _class_is_user(cls)
        _is_user_class[cls] = known
    return known


def _class_is_user(cls: type) -> bool:
    module_name = getattr(cls, "__module__", None)
    if module_name == "__main__":
        return True
    filename = getattr(sys.modules.get(module_name), "__file__", None)
    if filename:
        return is_user_file(filename)
    codes = (_code_of(value) for value in vars(cls).values())
    return any(code is not None and is_user_code(code) for code in codes)


# ---- program locations (Terra's node identity) ----

Location = tuple  # ((filename, lineno), ...) innermost first


def user_location(stop_frame, depth: int = 2, known_above=None) -> Location:
    """The user frames from the caller `depth` levels up to `stop_frame` (inclusive).

    Terra's node-equality criterion is op type + attributes + program location; the location
    is this call-site stack. The loop-trip part is carried by the TraceGraph itself (nodes are a
    sequence per path). Called for every op, so the verdict is cached per code object.
    `known_above` (a frame, the location of its caller) ends the walk at that frame: an op
    inside an observed library call need not walk the stack above the call again.
    """
    frame = sys._getframe(depth)
    frames = []
    known = _is_user_code
    above, location_above = known_above or (None, ())
    while frame is not None:
        if frame is above:
            frames.extend(location_above)
            break
        code = frame.f_code
        user = known.get(id(code))
        if user is None:
            user = is_user_code(code)
        if user:
            frames.append((code.co_filename, frame.f_lineno))
        if frame is stop_frame:
            break
        frame = frame.f_back
    else:
        frames.extend(_thread_base.location)
    return tuple(frames)


_REPLICA_PREFIX = "<replica "


def replica_frame(replica_id: int) -> tuple:
    """The frame that tells a replica's ops from another replica's (same lines)."""
    return (f"{_REPLICA_PREFIX}{replica_id}>", 0)


def replica_of(location: Location) -> int | None:
    """Which tf.distribute replica ran the code at `location`, if one did."""
    for filename, _ in location:
        if filename.startswith(_REPLICA_PREFIX):
            return int(filename[len(_REPLICA_PREFIX):-1])
    return None


class _ThreadBase(threading.local):
    location: Location = ()


_thread_base = _ThreadBase()


class located_below:
    """Within this thread, let every location end with `location`: the frames of a thread
    that runs user code for another one (a tf.distribute replica thread) stop at its own
    bottom, and the location of the call that started it (with the replica) completes them."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.previous = ()

    def __enter__(self):
        self.previous, _thread_base.location = _thread_base.location, self.location
        return self

    def __exit__(self, *exc) -> bool:
        _thread_base.location = self.previous
        return False


def user_frame_of(location: Location) -> UserFrame | None:
    """The innermost user frame of a location, with its source line, for reports."""
    if not location:
        return None
    return _frame(*location[0])


def _frame(filename: str, lineno: int) -> UserFrame:
    return UserFrame(filename, lineno, linecache.getline(filename, lineno).strip())


# ---- tracebacks ----


def _entries(tb: types.TracebackType | None) -> list[types.TracebackType]:
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    return entries


def innermost_user_frame(tb: types.TracebackType | None, *,
                         filename: str | None = None) -> UserFrame | None:
    """The innermost frame of a traceback in the user's code (or in the file `filename`)."""
    for entry in reversed(_entries(tb)):
        code = entry.tb_frame.f_code
        if (code.co_filename == filename) if filename is not None else is_user_code(code):
            return _frame(code.co_filename, entry.tb_lineno)
    return None


def lines_in(tb: types.TracebackType | None, prefixes: tuple[str, ...]) -> list[int]:
    """The line numbers of a traceback's frames in files whose names start with one of
    `prefixes` (a cell's own file names), outermost first."""
    return [entry.tb_lineno for entry in _entries(tb)
            if entry.tb_frame.f_code.co_filename.startswith(prefixes)]


_GATEWAYS: set = set()


def gateway(function):
    """Mark a terra_nb function through which the user's own TensorFlow work runs (an op
    executed now, a graph called): an error raised there is the user's, even though
    TensorFlow's traceback filter leaves our frame innermost."""
    _GATEWAYS.add(function.__code__)
    return function


def _is_ours(entry: types.TracebackType) -> bool:
    return entry.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR)


def user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback without terra_nb's own frames, so the user's lines are what is shown.

    If the error was raised by terra_nb itself (its innermost frame is ours and not a gateway
    into TensorFlow), it is terra_nb's bug: everything is kept, for the bug report.
    """
    entries = _entries(tb)
    if not entries:
        return None
    innermost = entries[-1]
    if _is_ours(innermost) and innermost.tb_frame.f_code not in _GATEWAYS:
        return entries[0]
    kept = None
    for entry in reversed(entries):
        if not _is_ours(entry):
            kept = types.TracebackType(kept, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return kept
