"""terra_nb: Terra-style imperative-symbolic co-execution for TensorFlow 2 in Jupyter.

Public API, kept small:
- `%load_ext terra_nb` then `%%terra` on a training-loop cell (see `%%terra?`).
- `terra_nb.function`: decorator for scripts; each call is one iteration.
- `terra_nb.report()`: the last `%%terra` run as data.
- `terra_nb.plot()`: the last run's timeline as a matplotlib Figure.

Importing this package does not import TensorFlow; the magic and the engine load it on use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "function", "load_ipython_extension", "plot", "report"]


def load_ipython_extension(ipython) -> None:
    """Register `%%terra`. TensorFlow is imported here, without its C++ start-up lines in the
    cell's output (terra_nb/notebook/startup.py), so a notebook that loads the extension first shows
    none of them, and so is the engine, which the first `%%terra` cell would otherwise load."""
    from terra_nb.notebook.startup import import_tensorflow

    import_tensorflow()
    from terra_nb.engine.session import load_engine
    from terra_nb.notebook.magic import TerraMagics

    load_engine()

    ipython.register_magics(TerraMagics)


def report():
    """The `Report` of the last `%%terra` cell run in this IPython session."""
    from terra_nb.notebook.magic import last_report

    return last_report()


def plot(report=None):
    """A matplotlib Figure of a run's timeline: per-iteration time stacked by breakdown,
    coloured by mode, fallbacks marked. Defaults to the last `%%terra` run."""
    from terra_nb.notebook.magic import last_report
    from terra_nb.notebook.timeline import plot_report

    return plot_report(report if report is not None else last_report())


def __getattr__(name: str):
    # `function` lives with the engine, which imports TensorFlow: load it on first use only.
    if name == "function":
        from terra_nb.engine.function import function

        return function
    raise AttributeError(f"module 'terra_nb' has no attribute {name!r}")
