"""bench/profile.py's arithmetic: py-spy stacks to stages, thread CPU split into core-ms per image."""

from __future__ import annotations

import pytest

from bench.profile import IDLE, MODEL_OPS, NATIVE, breakdown, classify, parse_raw

RAW = "\n".join([
    # a tf.data thread decoding (Pillow under our _decode), and the same thread in TF's map ops (no frames)
    "thread (11);FuncRegistry.__call__ (tensorflow/python/ops/script_ops.py:269);Inference._decode "
    "(pipeline/model/inference.py:410);decode_image (pipeline/model/decode.py:125);ImageFile.load (PIL/ImageFile.py:425) 60",
    "thread (11) 20",
    # the main thread: waiting in poll (not counted), parsing, sending
    "thread (12): MainThread;StreamWorker._poll_once (consumers/worker.py:251);KafkaConsumer.poll "
    "(kafka/consumer/group.py:827);Event.wait (threading.py:629) 500",
    "thread (12): MainThread;Featurizer._valid_records (consumers/featurizer.py:170);parse_image_message "
    "(schemas/messages.py:124) 10",
    "thread (12): MainThread;Featurizer._write (consumers/featurizer.py:150);encode_features (schemas/messages.py:170) 10",
    # the producer's network thread
    "thread (13): kafka-python-producer-1-network-thread;Sender.run (kafka/producer/sender.py:113);"
    "KafkaTCPTransport._sock_send (kafka/net/transport.py:223) 5",
])


def test_stacks_go_to_stages_innermost_known_frame_first():
    samples = parse_raw(RAW)
    assert dict(samples[11]) == {"decode (Pillow, tf.data threads)": 60,
                                 "in-graph JPEG decode + preprocess (TensorFlow ops, tf.data threads)": 20}
    assert dict(samples[12]) == {"record parsing (ours)": 10, "producing feature records": 10}  # the wait is gone
    assert dict(samples[13]) == {"producing feature records": 5}


def test_waiting_frames_are_not_work():
    assert classify("thread (1): MainThread;f (a.py:1);Condition.wait (threading.py:327)") == IDLE


def test_thread_cpu_is_split_by_samples_and_tensorflow_pools_by_the_model_alone():
    before = {11: ("python", 1.0), 12: ("python", 0.0), 13: ("python", 0.0), 14: ("python", 10.0)}
    after = {11: ("python", 2.0), 12: ("python", 0.3), 13: ("python", 0.05), 14: ("python", 13.0)}
    out = breakdown(before, after, parse_raw(RAW), rate=100.0, images=100, model_cpu_ms=25.0)
    ms = out["core_ms_per_image"]
    # thread 11 (tf.data): 0.8 s sampled, 1.0 s of CPU: 0.6 decode, 0.2 + the unsampled 0.2 TensorFlow ops
    assert ms["decode (Pillow, tf.data threads)"] == pytest.approx(6.0)
    assert ms["in-graph JPEG decode + preprocess (TensorFlow ops, tf.data threads)"] == pytest.approx(4.0)
    # thread 12: 0.2 s sampled, 0.3 s CPU: the rest is C code the sampler did not see under Python
    assert ms["record parsing (ours)"] == pytest.approx(1.0)
    assert ms["C code under Python frames (not sampled)"] == pytest.approx(1.0)
    # thread 13: 0.05 s sampled and used, plus thread 12's 0.1 s
    assert ms["producing feature records"] == pytest.approx(1.5)
    # thread 14 (never sampled: TensorFlow's pool) used 3 s: 2.5 s the model, 0.5 s the rest
    assert ms[MODEL_OPS] == pytest.approx(25.0)
    assert ms["preprocess + batching (TensorFlow native, the rest)"] == pytest.approx(5.0)
    assert NATIVE not in ms
    assert out["total_core_ms_per_image"] == pytest.approx(43.5)
    assert out["outside_model_core_ms_per_image"] == pytest.approx(18.5)
