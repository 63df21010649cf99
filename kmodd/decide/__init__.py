"""Deciding: may a build be reused for another kernel (`verdict`), what each source
needs for a kernel (`plan`), and the report of `kmodctl check` (`reuse`)."""
