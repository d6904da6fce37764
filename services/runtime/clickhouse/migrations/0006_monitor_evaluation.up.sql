-- Every rule evaluation of every monitor tick, so the console's drift and live-quality charts survive
-- a restart. An evaluation is a fact of its tick, never updated; replacing by `evaluation_id` (in the
-- sort key) only folds a retried insert of the same tick.
CREATE TABLE IF NOT EXISTS monitor_evaluation
(
    evaluation_id String,
    evaluated_at DateTime64(3, 'UTC'),
    rule_name LowCardinality(String),
    rule_version UInt32,
    metric LowCardinality(String),
    kind LowCardinality(String),
    model_name LowCardinality(String),
    adapter_version Nullable(UInt32),
    prompt_version Nullable(UInt32),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    value Nullable(Float64),
    samples UInt64,
    firing Bool,
    reason String
)
ENGINE = ReplacingMergeTree(evaluated_at)
ORDER BY (model_name, rule_name, window_end, evaluation_id)
TTL toDateTime(window_end) + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 1000;
