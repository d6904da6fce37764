-- The span selector of an alert raised by a span rule (alert.raised's spans), kept with the alert so the
-- acknowledged and resolved states published later still say which spans it is about.
ALTER TABLE alert ADD COLUMN IF NOT EXISTS spans Nullable(String) COMMENT 'span rule''s selector as JSON (kind, name, service); NULL for a rule over inferences' AFTER message;
