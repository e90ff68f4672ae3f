"""The durable queue: the spool database (:mod:`gateway.queue.spool`), its records and states
(:mod:`gateway.queue.model`), its SQL (:mod:`gateway.queue.store`) and the group-commit writer
thread (:mod:`gateway.queue.writer`)."""
