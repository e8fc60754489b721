"""Kafka: clients with safe defaults, the local brokers (Tansu, Apache Kafka), the local S3 server, claim checks."""
