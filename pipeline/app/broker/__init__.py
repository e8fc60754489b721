"""``deeper broker``: a local development broker, a feature of the app, not of the Kafka client.

* :mod:`~pipeline.app.broker.local`: start, stop and watch Tansu or Apache Kafka (one node or a
  cluster) on 127.0.0.1, managed through a state directory (``python -m pipeline.app.broker.local``);
* :mod:`~pipeline.app.broker.apache_kafka`: Apache Kafka's jars from Maven Central and a KRaft
  node's configuration (``python -m pipeline.app.broker.apache_kafka install``: what CI runs);
* :mod:`~pipeline.app.broker.local_s3`: localbucket plus ``If-Match`` writes, the S3 a durable Tansu
  keeps its data in (run as a script by :mod:`~pipeline.app.broker.local`);
* :mod:`~pipeline.app.broker.cli`: the ``deeper broker`` subcommand.

The stream never imports this package: it reaches any broker through ``pipeline.kafka``.
"""
