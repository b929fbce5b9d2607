"""Faster R-CNN (two stages, small): an RPN scores anchors and regresses boxes; the step fetches
the proposals and scores, matches anchors and the top proposals to the ground truth in numpy
(IoU), and feeds the labels, targets and chosen proposal indices back into the loss.

`.numpy()` on a symbolic tensor raises under tf.function.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from benchmarks.programs._common import Program, Variables, apply, batches, seed_all

BATCHES, BATCH, SIZE, STRIDE, SIZES, GT, TOP = 4, 8, 32, 4, (8.0, 16.0), 2, 16
CELLS = SIZE // STRIDE
ANCHORS_PER_CELL = len(SIZES)


def make_anchors() -> np.ndarray:
    """(CELLS * CELLS * len(SIZES), 4) boxes y1, x1, y2, x2, cell-major."""
    centres = (np.arange(CELLS) + 0.5) * STRIDE
    boxes = [(cy - s / 2, cx - s / 2, cy + s / 2, cx + s / 2)
             for cy in centres for cx in centres for s in SIZES]
    return np.array(boxes, dtype="float32")


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-6)


def encode(boxes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Box regression targets (dy, dx, dh, dw) of `targets` relative to `boxes`."""
    size = np.maximum(boxes[..., 2:] - boxes[..., :2], 1e-3)
    centre = (boxes[..., 2:] + boxes[..., :2]) / 2
    target_size = targets[..., 2:] - targets[..., :2]
    target_centre = (targets[..., 2:] + targets[..., :2]) / 2
    return np.concatenate([(target_centre - centre) / size, np.log(target_size / size)],
                          axis=-1).astype("float32")


def decode(anchors, deltas):
    size = anchors[:, 2:] - anchors[:, :2]
    centre = (anchors[:, 2:] + anchors[:, :2]) / 2
    new_centre = centre + deltas[..., :2] * size
    new_size = size * tf.exp(tf.clip_by_value(deltas[..., 2:], -3.0, 3.0))
    return tf.concat([new_centre - new_size / 2, new_centre + new_size / 2], axis=-1)


def match(anchors, proposals, scores, gt):
    """Numpy target assignment for one batch: RPN labels/targets, top proposals' labels/targets."""
    rpn_labels, rpn_targets, chosen, roi_labels, roi_targets = [], [], [], [], []
    for image in range(len(gt)):
        overlaps = iou(anchors, gt[image])
        labels = np.full(len(anchors), -1.0, dtype="float32")
        labels[overlaps.max(axis=1) < 0.3] = 0.0
        labels[overlaps.max(axis=1) >= 0.5] = 1.0
        labels[overlaps.argmax(axis=0)] = 1.0
        rpn_labels.append(labels)
        rpn_targets.append(encode(anchors, gt[image][overlaps.argmax(axis=1)]))
        top = np.argsort(-scores[image], kind="stable")[:TOP]
        boxes = proposals[image][top]
        proposal_overlaps = iou(boxes, gt[image])
        chosen.append(top.astype("int32"))
        roi_labels.append((proposal_overlaps.max(axis=1) >= 0.5).astype("int32"))
        roi_targets.append(encode(boxes, gt[image][proposal_overlaps.argmax(axis=1)]))
    return [np.stack(values) for values in
            (rpn_labels, rpn_targets, chosen, roi_labels, roi_targets)]


def random_boxes(rng: np.random.Generator) -> np.ndarray:
    corner = rng.uniform(0, SIZE - 14, size=(BATCHES, BATCH, GT, 2))
    size = rng.uniform(6, 14, size=(BATCHES, BATCH, GT, 2))
    return np.concatenate([corner, corner + size], axis=-1).astype("float32")


def build(seed: int = 0) -> Program:
    _, rng = seed_all(seed)
    images = rng.normal(size=(BATCHES, BATCH, SIZE, SIZE, 3)).astype("float32")
    gt_boxes = random_boxes(rng)
    anchors = make_anchors()
    backbone = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
    ])
    objectness = keras.layers.Conv2D(ANCHORS_PER_CELL, 1)
    regression = keras.layers.Conv2D(4 * ANCHORS_PER_CELL, 1)
    roi_head = keras.Sequential([keras.Input((32,)), keras.layers.Dense(32, activation="relu")])
    roi_class = keras.layers.Dense(2)
    roi_box = keras.layers.Dense(4)
    features = backbone(images[0])  # build weights now, from this seed (see _common)
    objectness(features), regression(features)
    roi_class.build((None, 32)), roi_box.build((None, 32))
    layers = [backbone, objectness, regression, roi_head, roi_class, roi_box]
    optimizer = keras.optimizers.Adam(1e-3)

    def train_step(x, gt):
        with tf.GradientTape() as tape:
            features = backbone(x, training=True)
            scores = tf.reshape(objectness(features), (BATCH, -1))
            deltas = tf.reshape(regression(features), (BATCH, -1, 4))
            proposals = decode(anchors, deltas)
            rpn_labels, rpn_targets, chosen, roi_labels, roi_targets = match(
                anchors, proposals.numpy(), scores.numpy(), gt.numpy())
            valid = (rpn_labels >= 0).astype("float32")
            positive = (rpn_labels > 0).astype("float32")
            rpn_class_loss = tf.reduce_sum(valid * tf.nn.sigmoid_cross_entropy_with_logits(
                np.maximum(rpn_labels, 0.0), scores)) / valid.sum()
            rpn_box_loss = tf.reduce_sum(positive[..., None] * tf.abs(deltas - rpn_targets))
            rpn_box_loss = rpn_box_loss / max(positive.sum(), 1.0)
            cells = tf.reshape(features, (BATCH, CELLS * CELLS, -1))
            roi_features = tf.gather(cells, chosen // ANCHORS_PER_CELL, batch_dims=1)
            hidden = roi_head(tf.reshape(roi_features, (BATCH * TOP, -1)))
            roi_logits = tf.reshape(roi_class(hidden), (BATCH, TOP, 2))
            roi_deltas = tf.reshape(roi_box(hidden), (BATCH, TOP, 4))
            roi_class_loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(roi_labels, roi_logits))
            roi_positive = roi_labels.astype("float32")[..., None]
            roi_box_loss = (tf.reduce_sum(roi_positive * tf.abs(roi_deltas - roi_targets))
                            / max(roi_positive.sum(), 1.0))
            loss = rpn_class_loss + rpn_box_loss + roi_class_loss + roi_box_loss
        apply(tape, loss, optimizer, [v for layer in layers for v in layer.trainable_variables])
        return loss

    return Program("faster_rcnn", train_step, batches([images, gt_boxes]),
                   Variables(*layers, optimizer),
                   "numpy IoU matching of fetched proposals, fed back into the loss")
