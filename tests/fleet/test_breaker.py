from prefixlb.fleet.breaker import BreakerConfig, CircuitBreaker


def test_opens_after_consecutive_failures_and_probes_after_cooldown():
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, open_s=5.0, success_threshold=2))
    for t in range(3):
        assert b.allows(t)
        b.record(False, t)
    assert b.state == "open" and not b.allows(3.0) and not b.available(6.9)  # opened at t=2
    assert b.available(7.0) and b.allows(8.0) and b.state == "half_open"
    assert not b.allows(8.1)  # one probe at a time
    b.record(True, 8.2)
    assert b.state == "half_open" and b.allows(8.3)
    b.record(True, 8.4)
    assert b.state == "closed"


def test_half_open_failure_reopens_for_longer():
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, open_s=1.0, max_open_s=3.0))
    b.record(False, 0.0)
    assert b.allows(1.0)
    b.record(False, 1.0)  # probe failed: open for 2 s now
    assert b.state == "open" and not b.available(2.5) and b.available(3.0)


def test_failure_rate_in_window_trips_without_consecutive_failures():
    b = CircuitBreaker(BreakerConfig(failure_threshold=100, failure_rate=0.5, min_requests=10, window_s=10))
    for t in range(10):
        b.record(t % 2 == 0, t * 0.1)
    assert b.state == "open"


def test_successes_keep_it_closed():
    b = CircuitBreaker()
    for t in range(100):
        b.record(True, t)
    assert b.state == "closed" and b.transitions == 0
