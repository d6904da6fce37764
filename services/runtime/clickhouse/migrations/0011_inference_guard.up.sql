-- What the gateway's input and output guards did to each call's model input and answer (NULL: the guard
-- did not check), and the labels of what each found; the monitor's guard_block_rate and
-- guard_finding_rate read them.
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS guard_input_outcome LowCardinality(Nullable(String)) AFTER session_id;
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS guard_input_found Array(LowCardinality(String)) AFTER guard_input_outcome;
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS guard_output_outcome LowCardinality(Nullable(String)) AFTER guard_input_found;
ALTER TABLE inference_log ADD COLUMN IF NOT EXISTS guard_output_found Array(LowCardinality(String)) AFTER guard_output_outcome;
