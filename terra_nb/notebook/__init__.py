"""Everything Jupyter: the `%%terra` magic, its live panel, the graph inspector, the timeline
plot and the quiet TensorFlow start-up. It drives `terra_nb.engine` and reads its events."""
