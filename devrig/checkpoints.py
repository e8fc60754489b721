"""A stand-in for the official Inception v1 checkpoint: slim's ``inception_v1`` (1001 classes) with
the official variable names and seeded random values, saved in the V1 format as the official file is.

Used where the real ``inception_v1_2016_08_28.tar.gz`` can't be downloaded: the tests
(``tests/checkpoint_factory.py`` packs it like the official archive) and the benchmarks
(speed does not depend on the values). Values are drawn so activations stay O(1) through all
22 layers (slim's own initialisers shrink them to ~1e-13), which makes logit comparisons meaningful.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SEED = 20160828


def _random_value(name: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Plausible trained-looking values: He-scaled weights, BN statistics near identity."""
    if name.endswith("/weights"):
        fan_in = int(np.prod(shape[:-1]))
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    if name.endswith("/moving_variance"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("/moving_mean"):
        return rng.normal(0.0, 0.2, shape).astype(np.float32)
    return rng.normal(0.0, 0.1, shape).astype(np.float32)  # beta, biases


def save_v1(session, graph, path: Path) -> None:
    import tensorflow as tf

    with graph.as_default():
        saver = tf.compat.v1.train.Saver(write_version=tf.compat.v1.train.SaverDef.V1)
    saver.save(session, str(path), write_meta_graph=False, write_state=False)


def _assign_all(session, variables, values: dict[str, np.ndarray]) -> None:
    import tensorflow as tf

    feeds, assigns = {}, []
    for variable in variables:
        placeholder = tf.compat.v1.placeholder(variable.dtype.base_dtype, variable.shape)
        assigns.append(variable.assign(placeholder))
        feeds[placeholder] = values[variable.op.name]
    session.run(assigns, feeds)


def make_checkpoint(path: Path, seed: int = SEED) -> tuple[str, ...]:
    """Write an inception_v1 V1 checkpoint with the official variable names to ``path``."""
    import tensorflow as tf

    from pipeline.model.nets.slim_compat import slim
    from tf_slim.nets import inception

    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        with slim.arg_scope(inception.inception_v1_arg_scope()):
            inception.inception_v1(images, num_classes=1001, is_training=False)
        tf.compat.v1.train.get_or_create_global_step()  # extra variables must be tolerated
        variables = tf.compat.v1.global_variables()
        values = {v.op.name: _random_value(v.op.name, v.shape.as_list(), rng) for v in variables}
        values["global_step"] = np.int64(0)
        with tf.compat.v1.Session(graph=graph) as session:
            _assign_all(session, variables, values)
            save_v1(session, graph, path)
    return tuple(sorted(values))
