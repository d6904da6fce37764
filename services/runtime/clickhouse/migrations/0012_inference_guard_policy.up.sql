-- The registry guard policy version (`name:vN`) that decided a call's guard verdicts; NULL when the
-- gateway's own settings did, or no guard checked.
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS guard_policy LowCardinality(Nullable(String)) AFTER guard_output_found;
