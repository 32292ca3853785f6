"""The application API: settings, task declaration, sending, results."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from celeriac import Celeriac, group, states
from celeriac.config import Settings
from celeriac.exceptions import (
    ConfigurationError,
    NotRegistered,
    RemoteTaskError,
    ResultTimeout,
    UnknownSettingError,
)
from celeriac.protocol import Message, decode_body, fresh_ids, new_id, read_task_headers
from celeriac.result import exception_to_meta
from celeriac.results import make_meta

from .conftest import ping_and_add


@pytest.fixture
def app() -> Celeriac:
    return Celeriac("proj", broker="memory://", environ={})


def fetch_one(app: Celeriac, queue: str = "celery"):
    [delivery] = app.transport.fetch("test", [queue], 1, 0)
    return delivery


def test_guide_aliases_and_modern_names_are_one_setting():
    conf = Settings({"CELERYD_TASK_TIME_LIMIT": 30, "CELERYD_SOFT_TASK_TIME_LIMIT": 20})
    assert conf.task_time_limit == 30
    assert conf["task_soft_time_limit"] == 20
    conf.CELERYD_TASK_SOFT_TIME_LIMIT = 25
    assert conf.task_soft_time_limit == 25
    assert conf.CELERY_IMPORTS == ()
    conf.update(CELERYD_MAX_TASKS_PER_CHILD=5, CELERY_DISABLE_RATE_LIMITS=True)
    assert conf.worker_max_tasks_per_child == 5
    assert conf.worker_disable_rate_limits is True


def test_unknown_setting_is_reported_with_a_suggestion():
    with pytest.raises(UnknownSettingError, match="Did you mean 'task_time_limit'"):
        Settings({"task_time_limt": 3})
    with pytest.raises(UnknownSettingError):
        Celeriac("x", broker="memory://", worker_concurency=2)
    conf = Settings()
    with pytest.raises(AttributeError):
        _ = conf.no_such_setting


def test_config_from_object_loads_and_reports_unknown(app, caplog):
    class Config:
        CELERY_DEFAULT_QUEUE = "jobs"
        task_acks_late = True
        not_a_setting = 1

    app.config_from_object(Config)
    assert app.conf.task_default_queue == "jobs"
    assert app.conf.task_acks_late is True
    assert "not_a_setting" in caplog.text


def test_environment_chooses_broker_and_backend():
    app = Celeriac("p", environ={"CELERIAC_BROKER_URL": "memory://",
                                 "CELERIAC_RESULT_BACKEND": "memory://x"})
    assert app.broker_url == "memory://"
    assert app.result_backend_url == "memory://x"
    default = Celeriac("p", environ={})
    assert default.broker_url.startswith("sqlite:///")
    assert default.result_backend_url.startswith("sqlite:///")
    assert Celeriac("p", broker="sqlite:///b.db", environ={"CELERIAC_BROKER_URL": "memory://"}
                    ).broker_url == "sqlite:///b.db"


def test_unknown_task_option_fails_at_declaration(app):
    with pytest.raises(ConfigurationError, match="Unknown option"):
        @app.task(retries_max=3)
        def f():
            pass

    with pytest.raises(ConfigurationError, match="rate_limit"):
        @app.task(rate_limit="ten per second")
        def g():
            pass


def test_task_names_registry_and_direct_call(app):
    @app.task
    def add(x, y):
        return x + y

    @app.task(name="custom.name", bind=True)
    def bound(self):
        return self.request.called_directly

    assert add.name == "tests.test_app.add"
    assert add(2, 3) == 5
    assert bound() is True
    assert app.tasks["custom.name"] is bound
    with pytest.raises(NotRegistered, match="'missing' is not registered"):
        app.tasks["missing"]


def test_apply_async_writes_protocol_v2_headers(app):
    @app.task(time_limit=10, soft_time_limit=5, queue="q1")
    def work(a, b=1):
        return a

    now = dt.datetime.now(dt.UTC)
    result = work.apply_async((1,), {"b": 2}, countdown=30, expires=60, priority=7,
                              task_id="fixed-id")
    assert result.id == "fixed-id"
    delivery = fetch_one(app, "q1")
    assert delivery.priority == 7
    h = read_task_headers(delivery.message.headers)
    assert (h.id, h.task, h.retries) == ("fixed-id", work.name, 0)
    assert (h.time_limit, h.soft_time_limit) == (10.0, 5.0)
    assert h.eta is not None and 29 < (h.eta - now).total_seconds() < 31
    assert h.expires is not None and 59 < (h.expires - now).total_seconds() < 61
    assert h.root_id == "fixed-id" and h.argsrepr == "(1,)"
    assert delivery.message.headers["timelimit"] == [10, 5]
    args, kwargs, embed = decode_body(delivery.message, ["json"])
    assert (args, kwargs) == ([1], {"b": 2})
    assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}


def test_send_task_by_name_and_queue_option(app):
    app.send_task("other.task", [1, 2], queue="elsewhere")
    assert app.transport.queue_size("elsewhere") == 1
    with pytest.raises(ConfigurationError, match="args must be a list"):
        app.send_task("other.task", "12")


def test_group_sends_one_batch_and_shares_a_group_id(app):
    @app.task
    def add(x, y):
        return x + y

    result = group(add.s(i, i) for i in range(5)).apply_async()
    assert len(result) == 5
    deliveries = app.transport.fetch("t", ["celery"], 10, 0)
    assert {d.message.headers["group"] for d in deliveries} == {result.id}
    for delivery in deliveries:
        task_id = delivery.message.headers["id"]
        args, _, _ = decode_body(delivery.message, ["json"])
        app.backend.store(make_meta(task_id, states.SUCCESS, sum(args)))
    assert result.get(timeout=1) == [0, 2, 4, 6, 8]


def test_async_result_states_and_failures(app):
    result = app.AsyncResult("abc")
    assert result.state == states.PENDING and not result.ready()
    with pytest.raises(ResultTimeout):
        result.get(timeout=0.05)
    app.backend.store(make_meta("abc", states.FAILURE, exception_to_meta(KeyError("k")),
                                "Traceback...\nKeyError: 'k'"))
    assert result.state == states.FAILURE and result.failed()
    with pytest.raises(KeyError):
        result.get(timeout=1)
    assert isinstance(result.get(timeout=1, propagate=False), KeyError)
    assert result.traceback.startswith("Traceback")
    result.forget()
    assert result.state == states.PENDING


def test_unknown_exception_types_are_never_imported(app):
    meta = {"exc_type": "Exploder", "exc_module": "os.path", "exc_message": ["boom"]}
    app.backend.store(make_meta("x", states.FAILURE, meta, "tb"))
    with pytest.raises(RemoteTaskError) as info:
        app.AsyncResult("x").get(timeout=1)
    assert type(info.value).__name__ == "Exploder"
    assert info.value.exc_type == "Exploder"
    assert str(info.value) == "boom"
    assert info.value.remote_traceback == "tb"

    class MyError(Exception):
        pass

    app.known_exceptions.register(MyError)
    app.backend.store(make_meta("y", states.FAILURE, exception_to_meta(MyError("mine")), None))
    with pytest.raises(MyError, match="mine"):
        app.AsyncResult("y").get(timeout=1)


def test_success_is_never_overwritten(app):
    app.backend.store(make_meta("s", states.SUCCESS, 1))
    app.backend.store(make_meta("s", states.FAILURE, exception_to_meta(ValueError())))
    assert app.AsyncResult("s").get(timeout=1) == 1


def test_retry_keeps_the_original_callers_reply_to(app):
    from celeriac.exceptions import Retry
    from celeriac.task import Context

    @app.task(bind=True)
    def again(self):
        raise self.retry(countdown=0)

    context = Context(id="t1", task=again.name, reply_to="caller-queue", called_directly=False,
                      delivery_info={"routing_key": "celery"})
    with pytest.raises(Retry):
        again.run_with(context, (), {})
    delivery = fetch_one(app)
    assert delivery.message.properties["reply_to"] == "caller-queue"
    assert delivery.message.headers["retries"] == 1


def test_send_many_gives_each_identical_call_its_own_id(app):
    """A run of identical calls is built once and rebadged: every message still carries its
    own id everywhere (id, root_id, correlation_id, and the envelope stores keep)."""
    ping, add = ping_and_add(app)

    sigs = [ping.s() for _ in range(5)] + [add.s(1, 2), add.s(1, 2)] + [ping.s()] * 3
    group_result = app.send_many(sigs)
    got = app.transport.fetch("test", ["celery"], 20, 0)
    assert len(got) == 10
    ids = [d.message.headers["id"] for d in got]
    assert len(set(ids)) == 10
    assert ids == [r.id for r in group_result.results]
    for delivery in got:
        message = delivery.message
        task_id = message.headers["id"]
        assert message.headers["root_id"] == task_id
        assert message.properties["correlation_id"] == task_id
        assert read_task_headers(message.headers).id == task_id
        again = Message.from_envelope(message.to_envelope())
        assert dict(again.headers) == dict(message.headers)
    names = [d.message.headers["task"] for d in got]
    assert names == [ping.name] * 5 + [add.name] * 2 + [ping.name] * 3
    assert [decode_body(d.message, ["json"])[0] for d in got[5:7]] == [[1, 2], [1, 2]]


def test_send_many_long_runs_go_out_as_copies_in_order(app, monkeypatch):
    """Runs of identical calls long enough (bulk.COPIES_FROM) reach the transport as one
    message and its ids; shorter runs and other calls as messages; all in sending order."""
    from celeriac import bulk

    ping, add = ping_and_add(app)

    copies = []
    real = app.transport.publish_copies
    monkeypatch.setattr(app.transport, "publish_copies", lambda *a: copies.append(a[3]) or
                        real(*a))
    n = bulk.COPIES_FROM
    sigs = ([ping.s() for _ in range(n + 1)] + [add.s(1, 2)] + [ping.s() for _ in range(n - 1)]
            + [add.s(3, 4)] * (2 * n + 1))  # (arguments count as the same if the same objects)
    group_result = app.send_many(sigs)
    assert [len(ids) for ids in copies] == [n, 2 * n]  # the first of a run is the template
    got = app.transport.fetch("test", ["celery"], 1000, 0)
    assert [d.message.headers["id"] for d in got] == [r.id for r in group_result.results]
    assert [d.message.headers["task"] for d in got] == (
        [ping.name] * (n + 1) + [add.name] + [ping.name] * (n - 1) + [add.name] * (2 * n + 1))
    assert [decode_body(d.message, ["json"])[0] for d in got[-2:]] == [[3, 4], [3, 4]]


def test_a_bulk_send_with_a_call_that_cannot_be_built_sends_nothing(app):
    ping, add = ping_and_add(app)
    sigs = [ping.s() for _ in range(2500)] + [add.s(object(), 1)]  # not JSON
    with pytest.raises(TypeError):
        app.send_many(sigs)
    assert app.transport.fetch("test", ["celery"], 10, 0) == []


def test_a_bulk_send_hands_long_runs_to_the_transport_while_it_is_still_building():
    """Runs of copies go to the writer every FLUSH_EVERY ids, the calls before them first,
    so a pipelining transport stores them while the rest is built; ``send`` waits."""
    from celeriac.bulk import FLUSH_EVERY, BulkSend

    class Recorder:
        def __init__(self):
            self.steps = []

        def many(self, items):
            self.steps.append(("many", [m.headers["id"] for _, m, _ in items]))

        def copies(self, queue, message, priority, ids):
            self.steps.append(("copies", list(ids)))

        def finish(self):
            self.steps.append(("finish", []))

    single = Message(b"[[], {}, {}]", {"id": "single"})
    template = Message(b"[[], {}, {}]", {"id": "template"})
    writer = Recorder()
    bulk = BulkSend(writer)
    bulk.add("q", single, 0)
    bulk.add("q", template, 0)
    ids = [f"id-{n:05d}" for n in range(2 * FLUSH_EVERY + 5)]
    for n, task_id in enumerate(ids):
        bulk.add_copy("q", template, 0, task_id)
        if n == FLUSH_EVERY - 1:  # a full chunk: out before the next copy is even added
            assert writer.steps == [("many", ["single", "template"]),
                                    ("copies", ids[:FLUSH_EVERY])]
    assert [kind for kind, _ in writer.steps] == ["many", "copies", "copies"]
    bulk.send()
    assert writer.steps[3:] == [("many", ids[-5:]), ("finish", [])]  # (5 copies: singles)


@pytest.mark.parametrize("make", ["fresh_ids", "new_id"])
def test_ids_are_distinct_version_4_uuids(make):
    ids = fresh_ids(batch=8)
    seen = [next(ids) if make == "fresh_ids" else new_id() for _ in range(100)]
    assert len(set(seen)) == 100
    for text in seen:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
