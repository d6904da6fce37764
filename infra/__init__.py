"""Local infrastructure without Docker: a one-node Apache Kafka and a PostgreSQL cluster under FLYWHEEL_HOME."""
