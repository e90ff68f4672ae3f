"""Delivery: the scheduler (:mod:`gateway.delivery.scheduler`), routes
(:mod:`gateway.delivery.routing`), the connection pool (:mod:`gateway.delivery.pool`), the SMTP
client (:mod:`gateway.delivery.client`) and what an attempt did
(:mod:`gateway.delivery.outcome`)."""
