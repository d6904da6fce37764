-- One row per (evaluation, target, metric, example); a retried evaluation with the same id replaces its
-- rows, the latest write winning.
CREATE TABLE IF NOT EXISTS evaluation_result
(
    evaluation_id String,
    example_id String,
    model_name LowCardinality(String),
    adapter_version Nullable(UInt32),
    target LowCardinality(String) COMMENT 'candidate or baseline',
    metric LowCardinality(String),
    score Nullable(Float64),
    error Nullable(String),
    prediction String TTL toDateTime(created_at) + INTERVAL 180 DAY,
    reference String TTL toDateTime(created_at) + INTERVAL 180 DAY,
    created_at DateTime64(3, 'UTC'),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(created_at)
ORDER BY (evaluation_id, target, metric, example_id)
SETTINGS non_replicated_deduplication_window = 1000;
