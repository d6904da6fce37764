-- The current state of each alert. Acknowledging or resolving publishes a later alert.raised with the
-- same alert_id, so the version is the event time: a late redelivery of `open` cannot undo `resolved`.
CREATE TABLE IF NOT EXISTS alert
(
    event_id UUID,
    occurred_at DateTime64(3, 'UTC'),
    producer LowCardinality(String),
    correlation_id String,
    alert_id String,
    rule_name LowCardinality(String),
    rule_version UInt32,
    severity LowCardinality(String),
    state LowCardinality(String),
    model_name LowCardinality(String),
    adapter_version Nullable(UInt32),
    prompt_version Nullable(UInt32),
    metric LowCardinality(String),
    value Float64,
    threshold Float64,
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    message String,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(occurred_at)
ORDER BY (model_name, alert_id)
SETTINGS non_replicated_deduplication_window = 1000;
