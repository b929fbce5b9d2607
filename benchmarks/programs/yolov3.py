"""YOLOv3 (one scale, small): multi-scale training picks the input resolution per step with
Python's `random`, and the targets for that resolution's grid are assigned in numpy.

Under tf.function the resolution is drawn once, while tracing, and `.numpy()` on the boxes
raises.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from benchmarks.programs._common import Program, Variables, apply, batches, seed_all

BATCHES, BATCH, FULL, STRIDE, CLASSES, BOXES = 4, 16, 64, 8, 4, 3
RESOLUTIONS = (32, 48, 64)
ANCHORS = np.array([[0.2, 0.2], [0.45, 0.45]], dtype="float32")  # width, height (fractions)


def assign_targets(boxes: np.ndarray, classes: np.ndarray, grid: int) -> tuple:
    """Each box goes to the cell holding its centre and the anchor whose shape fits it best."""
    anchors = len(ANCHORS)
    mask = np.zeros((len(boxes), grid, grid, anchors), dtype="float32")
    box_targets = np.zeros((len(boxes), grid, grid, anchors, 4), dtype="float32")
    class_targets = np.zeros((len(boxes), grid, grid, anchors), dtype="int32")
    for image, (image_boxes, image_classes) in enumerate(zip(boxes, classes)):
        for (cx, cy, w, h), label in zip(image_boxes, image_classes):
            inter = np.minimum(w, ANCHORS[:, 0]) * np.minimum(h, ANCHORS[:, 1])
            shape_iou = inter / (w * h + ANCHORS.prod(axis=1) - inter)
            anchor = int(shape_iou.argmax())
            col, row = min(int(cx * grid), grid - 1), min(int(cy * grid), grid - 1)
            mask[image, row, col, anchor] = 1.0
            box_targets[image, row, col, anchor] = (
                cx * grid - col, cy * grid - row,
                np.log(w / ANCHORS[anchor, 0]), np.log(h / ANCHORS[anchor, 1]))
            class_targets[image, row, col, anchor] = label
    return mask, box_targets, class_targets


def build(seed: int = 0) -> Program:
    py_random, rng = seed_all(seed)
    images = rng.normal(size=(BATCHES, BATCH, FULL, FULL, 3)).astype("float32")
    centres = rng.uniform(0.1, 0.9, size=(BATCHES, BATCH, BOXES, 2))
    sizes = rng.uniform(0.1, 0.6, size=(BATCHES, BATCH, BOXES, 2))
    boxes = np.concatenate([centres, sizes], axis=-1).astype("float32")
    classes = rng.integers(0, CLASSES, size=(BATCHES, BATCH, BOXES)).astype("int32")
    channels = len(ANCHORS) * (5 + CLASSES)
    model = keras.Sequential([
        keras.Input((None, None, 3)),
        keras.layers.Conv2D(16, 3, strides=2, padding="same"),
        keras.layers.LeakyReLU(0.1),
        keras.layers.Conv2D(32, 3, strides=2, padding="same"),
        keras.layers.LeakyReLU(0.1),
        keras.layers.Conv2D(32, 3, strides=2, padding="same"),
        keras.layers.LeakyReLU(0.1),
        keras.layers.Conv2D(channels, 1),
    ])
    optimizer = keras.optimizers.Adam(1e-3)

    def train_step(x, gt_boxes, gt_classes):
        size = py_random.choice(RESOLUTIONS)
        grid = size // STRIDE
        mask, box_targets, class_targets = assign_targets(gt_boxes.numpy(), gt_classes.numpy(),
                                                          grid)
        with tf.GradientTape() as tape:
            out = model(tf.image.resize(x, (size, size)), training=True)
            out = tf.reshape(out, (BATCH, grid, grid, len(ANCHORS), 5 + CLASSES))
            object_loss = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(mask, out[..., 4]))
            box = tf.concat([tf.sigmoid(out[..., :2]), out[..., 2:4]], axis=-1)
            found = max(mask.sum(), 1.0)
            box_loss = tf.reduce_sum(mask[..., None] * (box - box_targets) ** 2) / found
            class_loss = tf.reduce_sum(mask * tf.nn.sparse_softmax_cross_entropy_with_logits(
                class_targets, out[..., 5:])) / found
            loss = object_loss + box_loss + class_loss
        apply(tape, loss, optimizer, model.trainable_variables)
        return loss

    return Program("yolov3", train_step, batches([images, boxes, classes]),
                   Variables(model, optimizer),
                   "Python random resolution; numpy target assignment for that grid")
