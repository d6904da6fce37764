"""The feedback service: feedback intake, and the sink that stores inference logs and feedback in ClickHouse."""
