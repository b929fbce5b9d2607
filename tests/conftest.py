"""Suite-wide set-up that no single test module owns."""

from __future__ import annotations

import signal

# The interrupt tests press Ctrl-C with `_thread.interrupt_main()`, which does nothing when
# SIGINT is ignored, as it is for a process a non-interactive shell started in the background
# (`make test &`): give the suite Python's own handler, as an interactive run has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
