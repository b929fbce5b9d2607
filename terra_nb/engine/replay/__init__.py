"""Library replay: stable Keras and TensorFlow calls deferred again from their recorded spans,
without running their Python, guarded by what decides the ops they issue."""
