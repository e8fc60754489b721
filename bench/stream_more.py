"""Stream figures beyond throughput: the scorer alone, produce -> label latency, featurizer memory.

Same setup and timing points as :mod:`bench.stream` (whose rig and helpers these use).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from bench.common import Context, percentile, rss_mb, say
from bench.stream import Variant, _model_alone, rig
from devrig import LabelCollector


def scorer_alone(ctx: Context) -> dict[str, Any]:
    """Labels/s of the scorer process on feature records already waiting on its topic."""
    from pipeline.kafka.kafka_io import make_producer
    from schemas.messages import FeatureRecord, encode_features

    m = ctx.scale(5000, 1000)
    the_rig = rig(ctx)
    settings = the_rig.settings("scorer")
    producer = make_producer(settings)
    ids = []
    for i in range(m):
        image_id = hashlib.sha256(f"bench-scorer-{i}".encode()).hexdigest()
        record = FeatureRecord(image_id, the_rig.vectors[i % len(the_rig.vectors)], the_rig.meta.backbone,
                               the_rig.meta.weights_digest, the_rig.meta.layer, source=f"bench/{i}")
        producer.send(settings.features_topic, **_kv(encode_features(record)))
        ids.append(image_id)
    producer.flush()
    producer.close()
    labels = LabelCollector(settings)
    scorer = the_rig.worker("scorer", settings, [], "scorer-alone")
    try:
        labels.wait(ids, timeout=max(300.0, m / 20), check=scorer.check)
        last = max(labels.received[i] for i in ids)
        time.sleep(0.5)
        batches = scorer.current.batches()
    finally:
        labels.stop()
        scorer.stop()
    start = batches[0]["_t"] - batches[0]["seconds"]
    rate = m / (last - start)
    say(f"  scorer alone: {rate:.0f} labels/s over {len(batches)} batches")
    return {"what": "feature records (real cars vectors, distinct ids) produced first; then a scorer process "
                    "starts; rate = M / (its first batch -> last label received)",
            "records": m, "per_s": round(rate, 1), "batches": len(batches),
            "mean_batch": round(float(np.mean([b["scored"] for b in batches])), 1),
            "sum_score_s": round(sum(b["seconds"] for b in batches), 3)}


def _kv(encoded):
    key, value, headers = encoded
    return {"key": key, "value": value, "headers": headers}


def latency(ctx: Context) -> dict[str, Any]:
    """Produce -> label latency at a fixed rate: half the stream's measured capacity."""
    stream = ctx.results.get("stream", {})
    capacity = stream.get("featurizer_per_s") or stream.get("per_s")  # end to end is the commit cadence's
    note = "half the stream figure's featurizer rate"
    if not capacity:
        capacity = 0.6 * _model_alone(ctx)
        note = "half of 0.6 x the model alone (the stream figure did not run)"
    rate = 0.5 * capacity
    seconds = ctx.scale(60, 12)
    n = max(20, int(rate * seconds))
    the_rig = rig(ctx)
    pipe = the_rig.pipeline("latency", Variant())
    try:
        sent = pipe.produce(the_rig.photos(n), rate=rate)
        pipe.labels.wait([i for i, _ in sent], timeout=max(300.0, n / 2), check=pipe.check)
        time.sleep(0.5)
        feat = pipe.featurizer_summary(pipe.warm_until)
        ms = [1000 * (pipe.labels.received[i] - t) for i, t in sent]
        broker_ms = [1000 * (pipe.labels.kafka_ts[i] - t) for i, t in sent]
    finally:
        pipe.close()
    result = {"what": "photos produced at a fixed rate; latency = label received downstream - produced-at header",
              "rate_per_s": round(rate, 2), "rate_basis": note, "images": n,
              "p50_ms": round(percentile(ms, 50), 1), "p90_ms": round(percentile(ms, 90), 1),
              "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(max(ms), 1), "mean_ms": round(float(np.mean(ms)), 1),
              "to_label_record_timestamp_p50_ms": round(percentile(broker_ms, 50), 1),
              "featurizer": feat}
    say(f"  latency at {rate:.1f} img/s: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms; "
        f"mean featurizer batch {feat['mean_batch']}")
    return result


def memory(ctx: Context) -> dict[str, Any]:
    """The featurizer's RSS sampled over a long stream (backlog kept bounded); must stay flat."""
    n = ctx.scale(10_000, 600)
    backlog = 400
    the_rig = rig(ctx)
    pipe = the_rig.pipeline("memory", Variant())
    samples: list[tuple[float, int, float]] = []  # (time, featurized so far, RSS MiB)
    done = 0
    try:
        rss_start = rss_mb(pipe.featurizer.pid)
        since = pipe.warm_until
        sent_ids: list[str] = []
        next_sample = 0.0
        pending = the_rig.photos(n)
        while done < n:
            pipe.featurizer.check()
            done = sum(b["featurized"] for b in pipe.featurizer.current.batches(since))
            if pending and len(sent_ids) - done < backlog:
                chunk, pending = pending[:100], pending[100:]
                sent_ids += [i for i, _ in pipe.produce(chunk)]
            if time.monotonic() >= next_sample:
                samples.append((time.time(), done, rss_mb(pipe.featurizer.pid) or float("nan")))
                next_sample = time.monotonic() + 0.5
            time.sleep(0.05)
        samples.append((time.time(), done, rss_mb(pipe.featurizer.pid) or float("nan")))
        pipe.labels.wait(sent_ids, timeout=300, check=pipe.check)
    finally:
        pipe.close()
    at = {}
    for mark in (0.1, 0.5, 1.0):
        hit = next((s for s in samples if s[1] >= mark * n), samples[-1])
        at[f"{int(mark * 100)}%"] = round(hit[2], 1)
    rss = [s[2] for s in samples]
    growth = at["100%"] - at["10%"]
    result = {"what": f"featurizer process VmRSS every 0.5 s while {n} photos stream through (producer keeps "
                      f"<= {backlog} unfeaturized); Parquet parts roll at 5000 rows / 30 s (defaults)",
              "images": n, "rss_mb_after_warmup": round(rss_start or float("nan"), 1), "rss_mb_at": at,
              "rss_mb_max": round(float(np.nanmax(rss)), 1), "growth_10_to_100_mb": round(growth, 1),
              "flat": bool(growth <= 0.10 * at["10%"]),
              "samples": [[round(t - samples[0][0], 1), c, round(r, 1)] for t, c, r in samples]}
    say(f"  featurizer RSS: {at} MiB (max {result['rss_mb_max']}); flat: {result['flat']}")
    return result
