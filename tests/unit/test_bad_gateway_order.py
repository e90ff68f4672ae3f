"""The bad-gateway route's order: spread by queue id, a gateway that just failed goes last."""

from __future__ import annotations

import time

from gateway.delivery import routing
from gateway.delivery.routing import Router

GATEWAYS = [("198.51.100.13", 25), ("198.51.100.14", 25), ("198.51.100.15", 25)]


def router() -> Router:
    return Router(lambda: None, None, None, None, None)  # type: ignore[arg-type]


def test_each_message_starts_somewhere_and_tries_all_in_turn() -> None:
    r = router()
    firsts = set()
    for i in range(60):
        order = r.bad_gateway_order(f"Q{i:04d}", GATEWAYS)
        assert sorted(order) == sorted(GATEWAYS)
        start = GATEWAYS.index(order[0])
        assert order == GATEWAYS[start:] + GATEWAYS[:start]  # the next ones in turn
        firsts.add(order[0])
    assert firsts == set(GATEWAYS)  # spread over every gateway


def test_the_same_message_keeps_its_order() -> None:
    r = router()
    assert r.bad_gateway_order("ABC", GATEWAYS) == r.bad_gateway_order("ABC", GATEWAYS)


def test_a_failed_gateway_goes_last_for_a_while(monkeypatch) -> None:
    r = router()
    r._gateway_failed("Q1", "198.51.100.14", 25, "Error connecting: refused")
    for i in range(20):
        assert r.bad_gateway_order(f"Q{i}", GATEWAYS)[-1] == ("198.51.100.14", 25)
    later = time.monotonic() + routing.BAD_GATEWAY_DOWN_SECONDS + 1
    monkeypatch.setattr(routing.time, "monotonic", lambda: later)
    lasts = {r.bad_gateway_order(f"Q{i}", GATEWAYS)[-1] for i in range(60)}
    assert len(lasts) == 3  # forgotten: back in the rotation


def test_no_gateways_no_order() -> None:
    assert router().bad_gateway_order("Q", []) == []
