"""Program locations: where in the user's program an op ran.

Terra's node-equality criterion is op type + attributes + program location. Our location is the
user call-site stack (the user's own frames, innermost first, up to the iteration's entry frame).
The loop-trip part of the location is carried by the TraceGraph itself: nodes are a sequence per
path, so the same source op in another loop trip sits at another position and is another node.
"""

from __future__ import annotations

import linecache
import os
import site
import sys
import sysconfig

from terra_nb.events import UserFrame

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_prefixes() -> tuple[str, ...]:
    prefixes = {_PACKAGE_DIR}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            prefixes.add(os.path.abspath(path) + os.sep)
    for path in site.getsitepackages() + [site.getusersitepackages()]:
        prefixes.add(os.path.abspath(path) + os.sep)
    return tuple(sorted(prefixes))


_LIBRARY_PREFIXES = _library_prefixes()
_is_user_cache: dict[str, bool] = {}


def is_user_file(filename: str) -> bool:
    """User code is anything not installed as a library (notebook cells, scripts, tests)."""
    known = _is_user_cache.get(filename)
    if known is None:
        if filename.startswith("<frozen") or filename.startswith("<string"):
            known = False
        else:
            known = not os.path.abspath(filename).startswith(_LIBRARY_PREFIXES)
        _is_user_cache[filename] = known
    return known


Location = tuple  # ((filename, lineno), ...) innermost first


_is_user_code: dict = {}


def user_location(stop_frame, depth: int = 2) -> Location:
    """The user frames from the caller `depth` levels up to `stop_frame` (inclusive).

    Called for every op, so the user-or-library verdict is cached per code object.
    """
    frame = sys._getframe(depth)
    frames = []
    is_user_code = _is_user_code
    while frame is not None:
        code = frame.f_code
        user = is_user_code.get(code)
        if user is None:
            user = is_user_code[code] = is_user_file(code.co_filename)
        if user:
            frames.append((code.co_filename, frame.f_lineno))
        if frame is stop_frame:
            break
        frame = frame.f_back
    return tuple(frames)


def user_frame_of(location: Location) -> UserFrame | None:
    """The innermost user frame of a location, with its source line, for reports."""
    if not location:
        return None
    filename, lineno = location[0]
    return UserFrame(filename, lineno, linecache.getline(filename, lineno).strip())
