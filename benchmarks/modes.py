"""The modes every program is measured in, and when two runs count as the same results.

Kept apart from measure.py so the driver can name them without importing TensorFlow.
"""

MODES = ("eager", "tf.function", "tf.function+XLA", "terra_nb", "terra_nb+XLA")
# The run-drift bar (docs/architecture.md): tf.function stays within rtol 1e-3 of eager.
# Later steps only widen round-off (losses near zero make relative differences large), so
# "different" is judged on the first SAME_STEPS steps; the whole run's maximum is reported too.
SAME_RTOL = 1e-3
SAME_STEPS = 20
