"""Importing TensorFlow without its C++ start-up lines in the user's cell output.

TensorFlow's C++ runtime writes a few lines to the process's stderr (file descriptor 2, not
Python's `sys.stderr`) when it is imported and when it first lists devices: oneDNN's round-off
notice, the CPU-instruction notice, "Could not find cuda drivers", "failed call to cuInit" on
machines without a GPU. A kernel forwards descriptor 2 into the running cell as a red stderr
block above the panel. When `%load_ext terra_nb` is what brings TensorFlow in, descriptor 2 is
redirected to a temporary file around the import and the first device listing; afterwards the
known start-up lines are dropped and anything else written meanwhile still reaches the user.
A user who set TF_CPP_MIN_LOG_LEVEL chose what to see: then nothing is filtered.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# The start-up lines TensorFlow 2.21's C++ runtime writes on a machine without a GPU, matched
# by their message (the source file names and line numbers change between releases).
_STARTUP_LINES = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers on your machine"
    r"|failed call to cuInit"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|TF-TRT Warning: Could not find TensorRT"
    r"|computation placer already registered"
)


def is_startup_line(line: str) -> bool:
    return _STARTUP_LINES.search(line) is not None


def import_tensorflow():
    """Import TensorFlow and initialise its devices, dropping only its known start-up lines
    from descriptor 2 (unless TensorFlow is already in, or the user set its log level)."""
    if "tensorflow" in sys.modules or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        import tensorflow as tf

        return tf
    with startup_lines_dropped():
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


@contextlib.contextmanager
def startup_lines_dropped():
    """Send descriptor 2 to a file while the block runs; then pass on, through Python's
    `sys.stderr`, every line written to it that is not a known start-up line."""
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.__stderr__.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not is_startup_line(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
