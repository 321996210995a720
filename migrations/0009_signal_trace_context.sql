-- The W3C trace context of the change a signal announces, so that the relay and the
-- worker continue the trace of the call that made the change (NULL when traces are off).
ALTER TABLE signal_outbox ADD COLUMN traceparent TEXT;
