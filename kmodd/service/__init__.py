"""The long-running service's core: the persistent job queue (`jobs`) and the scheduler
that performs each request in a job of its own kernel (`core`). Knows no transport."""
