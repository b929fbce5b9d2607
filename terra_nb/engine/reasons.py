"""The one registry of reasons the engine gives: why an iteration left its trace
(`FallbackKind`, with what a user can do about it), what else it tells the user (`NoteKind`),
and why a library call keeps running its Python instead of being replayed (`Refusal`). Each is
a string enum, so events keep plain-string kinds and each kind's text lives here only."""

from __future__ import annotations

import enum


class _Reason(enum.StrEnum):
    """A fixed kind string with the sentence a user reads about it."""

    def __new__(cls, value: str, text: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.text = text
        return member


class FallbackKind(_Reason):
    """FallbackEvent.kind; `text` is the suggestion the summary and panel show."""

    NEW_OP = ("new-op", "the iteration ran ops the traced ones did not; if this happens every "
              "iteration (a loop whose trip count changes, work done only sometimes), expect "
              "one fallback per new path, then reuse")
    NEW_LOCATION = ("new-location", "the same op came from another line: Python took another "
                    "branch; each distinct path is traced once and reused")
    ATTRS_CHANGED = ("attrs-changed", "an op attribute changed (a Python number or object "
                     "passed to the op); pass a tensor instead (tf.constant) so it is fed rather "
                     "than baked in")
    SHAPE_CHANGED = ("shape-changed", "an input shape changed (e.g. the last, smaller batch); "
                     "pad batches to one size or drop the remainder (drop_remainder=True)")
    INPUT_CHANGED = ("input-changed", "an op's input came from a different source than while "
                     "tracing; keep the data flow of each iteration the same")


class NoteKind(_Reason):
    """Note.kind; `text` says what such a note is about."""

    OP_CALLBACKS = ("op-callbacks", "TensorFlow op callbacks (check numerics) see every op: "
                    "iterations run plainly eager while they are registered")
    BACKOFF = ("backoff", "the program diverged in several iterations in a row; some run "
               "plainly eager before co-execution is tried again")
    NOT_PAYING = ("not-paying", "co-executed iterations took longer than plain eager ones; "
                  "some run plainly eager before co-execution is tried again")
    REPLAYED = ("replayed", "library calls that no longer run their Python: they are replayed")
    NOT_REPLAYED = ("not-replayed", "a library call that keeps running its Python, and why")
    GUARD_MISS = ("guard-miss", "a replayed library call runs its Python again: something it "
                  "reads changed (a shape, a flag, a Python argument), and what")
    LIBRARY_REPLAY = ("library-replay", "the iteration traced the path replayed calls make")
    MADE_VARIABLES = ("made-variables", "the iteration traced again a path last traced while "
                      "the program created variables (a Keras optimizer makes its slots at its "
                      "first step): what it runs now differs from what it ran then")
    RECORDED_LIGHTLY = ("recorded-lightly", "the iteration traced again a path recorded after "
                        "a library call was made a function, only to write the calls on it: "
                        "that call ran its Python here instead of being replayed")
    NOT_BUILT = ("not-built", "a path's graph could not be built; its ops run eagerly")
    XLA_REFUSED = ("xla-refused", "a graph segment XLA could not compile runs without XLA")
    REPLICAS = ("replicas", "a tf.distribute strategy's replica functions co-execute, each "
                "on its own device")
    COMPILED_WORK = ("compiled-work", "a Keras method that runs its own compiled graph runs "
                     "as it is")


class Refusal(_Reason):
    """Why a library call is not replayed; `text` is a template of named details."""

    FORCED_VALUE = ("forced-value", "it forced a tensor value")
    NO_OPS = ("no-ops", "it ran no TensorFlow op")
    LEFT_PATH = ("left-path", "the program left the traced path")
    USER_CODE = ("user-code", "user code or a host op ran inside it")
    MADE_VARIABLES = ("made-variables", "it made variables")
    CUSTOM_GRADIENT = ("custom-gradient",
                       "user code (a custom gradient) or a host op ran inside it")
    KERAS_MASK = ("keras-mask", "it returned a Keras mask")
    LAYER_LOSSES = ("layer-losses", "it added layer losses")
    VALUE_DEPENDENT_SHAPES = ("value-dependent-shapes",
                              "its output shapes depend on input values")
    CHANGING_OUTSIDE_VALUE = ("changing-outside-value",
                              "it reads a value made outside it that may change")
    NOT_A_TRACED_VALUE = ("not-a-traced-value",
                          "a gradient ({type_name}) is not a TraceGraph value")
    SPLIT_OVER_SEGMENTS = ("split-over-segments",
                           "its ops were not all deferred in one segment")
    NUMPY_CONVERSIONS = ("numpy-conversions", "its Python converted a numpy argument "
                         "{conversions} times (once is replayable)")
    PYTHON_OP = ("python-op", "its {op_type} op must run from its Python")
    EARLIER_TENSOR = ("earlier-tensor", "it reads a tensor made before it that is not one of "
                      "its arguments")
    SHAPE_DECIDING_ARGUMENT = ("shape-deciding-argument",
                               "an argument's value decides a shape inside it")
    FOREIGN_RESULT = ("foreign-result", "it returned a {type_name} made outside its ops")
    MERGE_CALL = ("merge-call", "it handed work to the strategy's calling thread "
                  "(merge_call), where other replicas' ops ran in the middle of it")
    SPARSE_GRADIENT = ("sparse-gradient",
                       "its {op_type} has a sparse gradient that a traced call would densify")

    def say(self, **details) -> str:
        """The refusal as a sentence, its details filled in."""
        return self.text.format(**details)
