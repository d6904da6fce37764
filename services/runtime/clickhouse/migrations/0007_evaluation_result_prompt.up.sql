-- A prompt evaluation judges a prompt version (with or without an adapter): its rows say which, so
-- per-example results of two prompt versions on one adapter are not read as one target's.
ALTER TABLE evaluation_result ADD COLUMN IF NOT EXISTS prompt_name LowCardinality(String) DEFAULT '' AFTER adapter_version;
ALTER TABLE evaluation_result ADD COLUMN IF NOT EXISTS prompt_version Nullable(UInt32) AFTER prompt_name;
