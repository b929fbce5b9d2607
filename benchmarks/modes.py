"""The modes every program is measured in, and when a mode counts as computing eager's results.

Kept apart from measure.py so the driver can name them without importing TensorFlow.
"""

from terra_nb.engine.tolerance import ATOL, ITERATION_RTOL, RUN_RTOL

MODES = ("eager", "tf.function", "tf.function+XLA", "terra_nb", "terra_nb+XLA")
# eager again, from weights moved one ulp (Variables.nudge): how long round-off alone keeps a
# run's losses within ITERATION_RTOL of eager's, the span over which a mode's are judged
ROUND_OFF = "eager, one ulp off"


def departs_at(losses: list, eager: list, round_off: list) -> tuple[int | None, int]:
    """Whether a mode computed eager's losses: the first step at which its loss left eager's
    by more than RUN_RTOL (tf.function's own drift) while eager's run from weights one ulp off
    was still within ITERATION_RTOL of eager's, so round-off alone cannot have carried it
    there (None if none did), and how many steps that judged. A mode that freezes a random
    draw leaves at once; past the judged steps, a chaotic program's round-off has grown (a
    one-ulp nudge moves sdpoint's losses 1e-4 from step 35 and by up to 23% by step 80)."""

    def within(value: float, reference: float, rtol: float) -> bool:
        return abs(value - reference) <= rtol * abs(reference) + ATOL

    judged = 0
    for loss, reference, nudged in zip(losses, eager, round_off):
        if not within(nudged, reference, ITERATION_RTOL):
            break
        if not within(loss, reference, RUN_RTOL):
            return judged, judged
        judged += 1
    return None, judged
