-- One row per feedback_id. Comments and corrections keep no TTL: corrections are the raw material of the
-- next training dataset.
CREATE TABLE IF NOT EXISTS feedback
(
    event_id UUID,
    occurred_at DateTime64(3, 'UTC'),
    producer LowCardinality(String),
    correlation_id String,
    feedback_id String,
    inference_id String,
    thumbs LowCardinality(Nullable(String)),
    rating Nullable(UInt8),
    comment Nullable(String),
    correction Nullable(String),
    tags Array(String),
    source LowCardinality(String),
    actor Nullable(String),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (inference_id, feedback_id)
SETTINGS non_replicated_deduplication_window = 1000;
