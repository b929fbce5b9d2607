"""The modes every program is measured in, and when two runs count as the same results.

Kept apart from measure.py so the driver can name them without importing TensorFlow.
"""

from terra_nb.engine.tolerance import RUN_RTOL

MODES = ("eager", "tf.function", "tf.function+XLA", "terra_nb", "terra_nb+XLA")
# The run-drift bar (terra_nb/engine/tolerance.py): tf.function stays within it of eager.
# Later steps only widen round-off (losses near zero make relative differences large), so
# "different" is judged on the first SAME_STEPS steps; the whole run's maximum is reported too.
SAME_RTOL = RUN_RTOL
SAME_STEPS = 20
