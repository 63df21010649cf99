"""What every layer stands on: the root prefix (`paths`), the error hierarchy, the one
subprocess chokepoint (`run`), durable file writes (`fsutil`) and structured logs."""
