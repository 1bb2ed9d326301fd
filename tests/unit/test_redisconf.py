"""REDIS_URL's three forms (redis://, rediss://, sentinel://) and what each Redis user gets from them."""

from __future__ import annotations

import ssl

import pytest
import redis
from pydantic import ValidationError
from redis.sentinel import SentinelConnectionPool

from worker.producer.publisher import Publisher
from worker.redisconf import RedisConfigError, RedisTarget, config_problem
from worker.settings import Settings

SENTINELS = "sentinel://10.0.0.1:26379,10.0.0.2,[fd00::3]:26380/2"


def test_a_plain_url_is_used_as_it_always_was():
    t = RedisTarget.parse("redis://:pw@127.0.0.1:6390/3")
    assert (t.is_sentinel, t.db, t.password, t.tls) == (False, 3, "pw", None)
    kwargs = t.client(socket_timeout=1).connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["socket_timeout"]) == ("127.0.0.1", 6390, 3, 1)
    assert t.celery() == {"broker_url": "redis://:pw@127.0.0.1:6390/3",
                          "broker_transport": "worker.broker.transport:Transport",
                          "transport_options": {}, "broker_use_ssl": None}
    assert "pw" not in t.describe() and "6390" in t.describe()


def test_a_tls_url_gives_celery_and_flower_its_certificate_options():
    t = RedisTarget.parse("rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem")
    assert t.tls == {"ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/ca.pem"}
    assert t.celery()["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert isinstance(t.client().connection_pool.make_connection(), redis.SSLConnection)
    # No options: certificates are still checked (against the system's CAs), by the broker as by redis-py.
    assert RedisTarget.parse("rediss://h:6380/0").celery()["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_a_sentinel_url_names_every_sentinel_and_the_master():
    t = RedisTarget.parse(SENTINELS.replace("://", "://:redispw@"), master=" mymaster ", sentinel_password="spw")
    assert t.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("fd00::3", 26380))
    assert (t.master, t.db, t.password, t.sentinel_password, t.tls) == ("mymaster", 2, "redispw", "spw", None)
    assert "redispw" not in t.describe() and "spw" not in t.describe() and "mymaster" in t.describe()

    client = t.client(socket_connect_timeout=0.3, socket_timeout=0.6)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (2, "redispw")
    # Finding the master costs at most one timeout: each Sentinel gets its share.
    manager = pool.sentinel_manager
    assert len(manager.sentinels) == 3
    sk = manager.sentinels[0].connection_pool.connection_kwargs
    assert (sk["socket_connect_timeout"], sk["socket_timeout"], sk["password"]) == (pytest.approx(0.1),
                                                                                     pytest.approx(0.2), "spw")

    celery = t.celery()
    # One URL (kombu would fail over to a second one with its own transport); every Sentinel in an option.
    assert celery["broker_url"] == "sentinel://:redispw@10.0.0.1:26379/2"
    assert celery["transport_options"]["sentinels"] == ["sentinel://10.0.0.1:26379", "sentinel://10.0.0.2:26379",
                                                        "sentinel://[fd00::3]:26380"]
    assert celery["broker_transport"] == "worker.broker.transport:SentinelTransport"
    assert celery["transport_options"]["master_name"] == "mymaster"
    assert celery["transport_options"]["sentinel_kwargs"]["password"] == "spw"
    assert celery["broker_use_ssl"] is None


def test_sentinels_with_tls():
    t = RedisTarget.parse("sentinels://h1,h2/0?ssl_ca_certs=/ca.pem&ssl_check_hostname=false", master="m")
    assert t.tls == {"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem", "ssl_check_hostname": False}
    assert t.celery()["transport_options"]["sentinel_kwargs"]["ssl"] is True
    assert t.celery()["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    sk = t.client().connection_pool.sentinel_manager.sentinels[0].connection_pool
    assert isinstance(sk.make_connection(), redis.SSLConnection)
    assert "(TLS)" in t.describe()


@pytest.mark.parametrize("url, master, message", [
    ("sentinel://h1:26379,h2:26379/0", None, "set REDIS_SENTINEL_MASTER"),
    ("sentinel://h1:26379,h2:26379/0", "  ", "set REDIS_SENTINEL_MASTER"),
    ("sentinel://h1:26379/0;sentinel://h2:26379/0", "m", "separated by commas"),
    ("sentinel://h1/0?ssl_ca_certs=/ca.pem", "m", "TLS options need the sentinels:// scheme"),
    ("sentinels://h1/0?socket_timeout=1", "m", "unknown option(s) socket_timeout"),
    ("sentinels://h1/0?ssl_cert_reqs=maybe", "m", "ssl_cert_reqs is none, optional or required"),
    ("sentinel://h1:notaport/0", "m", "'h1:notaport' is not host:port"),
    ("sentinel://h1:70000/0", "m", "is not host:port"),
    ("sentinel://h1,,h2/0", "m", "an empty Sentinel address"),
    ("sentinel://h1/zero", "m", "the database after the hosts must be a number"),
    ("redis://h:6379/0", "m", "REDIS_SENTINEL_MASTER is set but REDIS_URL"),
    ("127.0.0.1:6379", None, "must be a URL"),
    ("http://h/0", None, "is not a Redis URL"),
])
def test_bad_configuration_says_what_to_fix(url, master, message):
    with pytest.raises(RedisConfigError) as info:
        RedisTarget.parse(url, master=master)
    assert message in str(info.value)


def test_settings_refuse_a_bad_redis_configuration_at_startup(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "sentinel://10.0.0.1:26379/0")
    monkeypatch.delenv("REDIS_SENTINEL_MASTER", raising=False)
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)
    assert "set REDIS_SENTINEL_MASTER" in str(info.value)
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "mymaster")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "sentinel-secret")
    s = Settings(_env_file=None)
    assert s.redis_target().master == "mymaster"
    assert "sentinel-secret" in s.secrets() and "sentinel-secret" not in repr(s)


def test_the_redis_password_is_scrubbed_like_the_vendor_credentials():
    s = Settings(_env_file=None, redis_url="redis://:redis-secret@h:6379/0")
    assert "redis-secret" in s.secrets()
    assert Settings(_env_file=None, redis_url="redis://h:6379/0").secrets() == []


def test_what_an_error_says_about_the_configuration():
    def chained(outer: Exception, cause: BaseException) -> Exception:
        outer.__cause__ = cause
        return outer

    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert "TLS certificate was not accepted" in config_problem(chained(redis.ConnectionError("Error 1"), verify))
    assert "TLS certificate was not accepted" in config_problem(
        redis.ConnectionError("Error 1 connecting. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"))
    assert "password was refused" in config_problem(redis.AuthenticationError("invalid password"))
    assert "password was refused" in config_problem(redis.ResponseError("WRONGPASS invalid username-password pair"))
    assert "cannot be read" in config_problem(chained(redis.ConnectionError("x"), FileNotFoundError(2, "No such file")))
    assert config_problem(redis.ConnectionError("Error 111 connecting to h:6379. Connection refused.")) is None
    assert config_problem(redis.TimeoutError("Timeout reading from socket")) is None


def test_wait_replicas_spools_what_no_replica_confirmed(product_env, redis_server, tmp_path, monkeypatch):
    """The test Redis has no replica: with PUBLISH_WAIT_REPLICAS=1 the master takes the messages, the call
    counts them as not safe and spools them too, and the flusher does not publish the spool again while no
    replica confirms (it would only make another copy each round)."""
    from worker.settings import get_settings

    monkeypatch.setenv("PUBLISH_WAIT_REPLICAS", "1")
    monkeypatch.setenv("SPOOL_DIR", str(tmp_path))
    get_settings.cache_clear()
    client = redis.Redis.from_url(redis_server.url)
    client.delete("loops")
    publisher = Publisher(get_settings())
    try:
        payload = {"id": "f" * 32, "operation": "track", "event": "e", "identity": {"email": "a@b.co"}}
        assert publisher.publish(payload, ["loops"]) == "spooled"
        assert client.llen("loops") == 1 and publisher.spool.pending() == 1
        assert publisher.flush_once() is False
        assert client.llen("loops") == 1 and publisher.spool.pending() == 1
    finally:
        publisher.close()
        client.delete("loops")
        get_settings.cache_clear()


def test_a_sentinel_that_does_not_answer_is_passed_over_at_once():
    """redis-py retries a refused connection three times with backoff (seconds); a Sentinel client must not."""
    from worker.dev.localstack import free_port

    t = RedisTarget.parse(f"sentinel://127.0.0.1:{free_port()}/0", master="m")
    manager = t.client(socket_connect_timeout=1).connection_pool.sentinel_manager
    assert manager.sentinels[0].connection_pool.connection_kwargs["retry"] is None
    assert t.celery()["transport_options"]["sentinel_kwargs"]["retry"] is None
    with pytest.raises(redis.ConnectionError):
        manager.sentinels[0].ping()
    assert manager.sentinels[0].connection_pool.make_connection().retry.get_retries() == 0


def test_a_client_opens_as_many_connections_as_commands_run_at_once(redis_server):
    """redis-py 8 caps a pool at 100 and fails the 101st command at once ("Too many connections"): on
    ``-P gevent -c 200`` deliveries whose acknowledgement met a full pool were delivered a second time."""
    import threading

    from worker.dev.localstack import wait_until

    client = RedisTarget.parse(redis_server.url).client(socket_timeout=60)
    key, n = "test:many-at-once", 130
    client.delete(key)
    got: list[object] = []
    errors: list[BaseException] = []

    def wait_for_one() -> None:
        try:
            got.append(client.blpop([key], timeout=50))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wait_for_one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    # Every one of them holds a connection of the pool, blocked in BLPOP (or failed to get one).
    wait_until(lambda: errors or client.info("clients")["blocked_clients"] >= n, timeout=30,
               message=f"{n} clients blocked in BLPOP")
    assert not errors, errors[:1]
    client.rpush(key, *range(n))
    for t in threads:
        t.join(30)
    assert not errors and len(got) == n and all(item is not None for item in got)
    client.close()


def test_the_brokers_pool_is_not_capped_below_a_green_pools_concurrency():
    """kombu's own pool (acks, restores, task events) takes the same cap as the product's clients."""
    from kombu import Connection

    from worker.broker.app import app
    from worker.redisconf import MAX_CONNECTIONS

    with Connection(app.conf.broker_url, transport=app.conf.broker_transport,
                    transport_options=app.conf.broker_transport_options) as conn:
        assert conn.default_channel.pool.max_connections == MAX_CONNECTIONS >= 10_000
