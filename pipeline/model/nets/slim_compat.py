"""Make tf-slim 1.1.0 build its networks on TensorFlow 2.21, fixed in ONE place.

Import this module instead of ``tf_slim`` (``from pipeline.model.nets.slim_compat import slim``);
every other module then gets a working slim without knowing about the breakage.

What is broken, and why each fix is the smallest one that holds
-----------------------------------------------------------------
1. ``tensorflow.python.framework.ops.Tensor`` no longer exists (TF moved the class to
   ``tensorflow.python.framework.tensor.Tensor`` and kept only the public ``tf.Tensor``).
   Slim uses ``ops.Tensor`` in ``isinstance`` checks, e.g. ``layers.utils.constant_value``,
   which the fused batch norm calls to see whether ``is_training`` is a constant. We alias
   the attribute back to the very same class, so every ``isinstance`` check keeps its exact
   old meaning; nothing else in TF reads the alias.

2. ``slim.batch_norm`` with the default ``updates_collections=tf.GraphKeys.UPDATE_OPS``
   (which every slim ``*_arg_scope`` uses) builds a *Keras* legacy layer, and
   ``tensorflow.python.layers.normalization`` lazily imports ``tf_keras.legacy_tf_layers``
   for it. tf-keras 2.21 no longer ships that module, and we do not want tf-keras at all.
   Slim already has a second, self-contained implementation, ``_fused_batch_norm``, built
   on ``tf.compat.v1.nn.fused_batch_norm`` with slim's own variables. It creates the same
   variables under the same names (``<scope>/BatchNorm/{beta,gamma,moving_mean,
   moving_variance}``, so official checkpoints restore unchanged), computes the same
   function (in inference: ``gamma * (x - moving_mean) / sqrt(moving_variance + eps) +
   beta``) and supports ``UPDATE_OPS`` itself (it adds the moving-average updates to that
   collection when training). Slim only avoids it for ``UPDATE_OPS`` for a historical
   reason (see the comment in ``tf_slim/layers/layers.py::batch_norm``). So we route every
   call that slim *could* fuse (no ``batch_weights``/``renorm``/``adjustment``, rank 2 or 4,
   ``fused`` not ``False``) to ``_fused_batch_norm``; any other call still goes to slim's
   original code (and would need tf-keras, as before).

   The replacement keeps the original's arg-scope key (``_key_op``), so
   ``arg_scope([slim.batch_norm], ...)`` and ``inception_v1_arg_scope()`` apply to it exactly
   as before, and it is swapped in for every alias (``tf_slim.batch_norm``,
   ``tf_slim.layers.batch_norm``, ``tf_slim.layers.layers.batch_norm``).

Rejected alternatives: pinning/installing tf-keras (the module is gone from 2.21 and it
drags a second Keras in); faking a ``tf_keras`` package in ``sys.modules`` (TF itself probes
for ``tf_keras`` to decide what ``tf.keras`` is, so a fake would change unrelated code);
passing ``updates_collections=None`` at each call site (every network's arg scope would
need the same edit, i.e. the fix would not live in one place).

3. Not a bug but a trap: built eagerly, or inside a plain ``tf.function``, slim creates new,
   randomly initialised variables on every call. Build slim networks once inside a
   ``tf.compat.v1.Graph`` and run them with a ``tf.compat.v1.Session`` (see
   :func:`new_session`).
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from typing import Any, Callable

import tensorflow as tf
from tensorflow.python.framework import ops as _tf_ops
from tensorflow.python.framework import tensor as _tf_tensor

#: set on our batch_norm so :func:`apply` is idempotent (re-imports, reloads in tests).
_MARKER = "_deeper_fused_batch_norm"


def _restore_ops_tensor() -> None:
    """Fix 1: alias ``ops.Tensor`` back to the real Tensor class (only if it is missing)."""
    if not hasattr(_tf_ops, "Tensor"):
        _tf_ops.Tensor = _tf_tensor.Tensor


def _can_fuse(arguments: dict[str, Any]) -> bool:
    """The conditions under which slim itself would use ``_fused_batch_norm``, minus the
    ``updates_collections is not UPDATE_OPS`` one that sends it to Keras."""
    if arguments["fused"] is False:
        return False
    if arguments["batch_weights"] is not None or arguments["renorm"] or arguments["adjustment"] is not None:
        return False
    rank = tf.convert_to_tensor(arguments["inputs"]).shape.ndims
    return rank in (2, 4)


def _fused_batch_norm_router(slim_layers: Any, original: Callable[..., Any]) -> Callable[..., Any]:
    """Fix 2: a drop-in ``batch_norm`` that prefers slim's own fused implementation.

    ``original`` is slim's arg-scope-decorated ``batch_norm``. We apply the arg scope
    ourselves (as ``add_arg_scope`` does) *before* deciding, because ``updates_collections``
    and ``is_training`` usually arrive through ``arg_scope``.
    """
    from tf_slim.ops import arg_scope as arg_scope_lib

    undecorated = original.__wrapped__
    key = arg_scope_lib.arg_scope_func_key(original)
    signature = inspect.signature(undecorated)
    fused_parameters = set(inspect.signature(slim_layers._fused_batch_norm).parameters)

    @functools.wraps(undecorated)
    def batch_norm(*args: Any, **kwargs: Any) -> Any:
        merged = {**arg_scope_lib.current_arg_scope().get(key, {}), **kwargs}
        bound = signature.bind(*args, **merged)
        bound.apply_defaults()
        if _can_fuse(bound.arguments):
            fused_args = {k: v for k, v in bound.arguments.items() if k in fused_parameters}
            return slim_layers._fused_batch_norm(**fused_args)
        return undecorated(*args, **merged)

    batch_norm._key_op = key  # same arg-scope key: existing arg scopes keep applying
    setattr(batch_norm, _MARKER, True)
    return batch_norm


def _route_batch_norm() -> None:
    """Swap the router in for every alias of slim's ``batch_norm`` in loaded slim modules."""
    from tf_slim.layers import layers as slim_layers

    original = slim_layers.batch_norm
    if getattr(original, _MARKER, False):
        return
    router = _fused_batch_norm_router(slim_layers, original)
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "tf_slim" or name.startswith("tf_slim.")):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, router)


def _quiet_layer_apply_warning() -> None:
    """Slim calls the legacy layers' ``layer.apply``, which warns once per layer built;
    the call is correct for these v1 layers, so the warning is only noise (57 per network)."""
    warnings.filterwarnings("ignore", message=r"`layer\.apply` is deprecated", category=UserWarning)


def apply() -> None:
    """Apply both fixes; safe to call any number of times."""
    _restore_ops_tensor()
    _quiet_layer_apply_warning()
    import tf_slim  # noqa: F401  (imports tf_slim.layers.layers and its aliases)

    _route_batch_norm()


def new_session(graph: tf.Graph, intra_op_threads: int = 0, inter_op_threads: int = 0) -> tf.compat.v1.Session:
    """A v1 Session on ``graph``; 0 threads means TensorFlow's default (one per core)."""
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=intra_op_threads,
        inter_op_parallelism_threads=inter_op_threads,
        allow_soft_placement=True,
    )
    return tf.compat.v1.Session(graph=graph, config=config)


apply()

import tf_slim as slim  # noqa: E402  (must come after apply(); re-exported for callers)

__all__ = ["slim", "apply", "new_session"]
