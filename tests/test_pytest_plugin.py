"""The pytest plugin: the ``ctxprop_spans`` fixture and its assertions, run inside pytester sessions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import REPO, child_env

pytest_plugins = ["pytester"]

# The code under test in the inner sessions: a job span and three step spans on a 2-thread pool.
_APP = '''
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace

import ctxprop


def step(i):
    with trace.get_tracer("app").start_as_current_span("step", attributes={"i": i}):
        ctxprop.set_tag("leak", i)


def job(pool_class, tenant="acme"):
    tracer = trace.get_tracer("app")
    with ctxprop.isolation_scope(), pool_class(max_workers=2) as pool:
        ctxprop.set_tag("tenant", tenant)
        with tracer.start_as_current_span("job"):
            list(pool.map(step, range(3)))
'''


@pytest.fixture
def app(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester dir holding the example application module."""
    pytester.makepyfile(app=_APP)
    pytester.syspathinsert()
    return pytester


def test_fixture_is_offered_by_the_entry_point(app: pytest.Pytester) -> None:
    """The fixture is available with no conftest: pytest loads the plugin through its pytest11 entry point."""
    result = app.runpytest_inprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*ctxprop_spans*"])


def test_passing_assertions_on_propagated_spans(app: pytest.Pytester) -> None:
    """With ctxprop's pool every assertion holds: no orphans, steps under the job, tags on the steps."""
    app.makepyfile(
        test_ok="""
        import ctxprop
        from app import job

        def test_job(ctxprop_spans):
            job(ctxprop.ContextAwareThreadPoolExecutor)
            assert [s.name for s in ctxprop_spans.spans].count("step") == 3
            assert len(ctxprop_spans.by_name("step")) == 3
            assert ctxprop_spans.one("job").name == "job"
            drawn = ctxprop_spans.tree().splitlines()
            assert drawn[0].startswith("job ")
            assert all(ln.startswith(("├─ step", "└─ step")) for ln in drawn[1:]), drawn
            ctxprop_spans.assert_no_orphans("job")
            ctxprop_spans.assert_parent("step", "job")
            ctxprop_spans.assert_tags("step", tenant="acme")
            ctxprop_spans.assert_tags("job", tenant="acme")
        """
    )
    result = app.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_no_orphans_fails_for_a_plain_pool_and_names_the_spans(app: pytest.Pytester) -> None:
    """With a plain pool the steps lose their parent: assert_no_orphans fails and says which and why."""
    app.makepyfile(
        test_plain="""
        from concurrent.futures import ThreadPoolExecutor
        from app import job

        def test_job(ctxprop_spans):
            job(ThreadPoolExecutor)
            ctxprop_spans.assert_no_orphans("job")
        """
    )
    result = app.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*3 orphaned span(s) (roots allowed: 'job')*",
            "*'step' (span *) has no parent: it started without its caller's context*",
            "*captured spans:*",
        ]
    )
    # The message draws the capture as trees: the steps stand alone instead of under the job.
    result.stdout.re_match_lines([r"E +job +\S.* tenant=acme$", r"E +step +\S.* i=\d$"])
    result.stdout.no_fnmatch_line("*└─ step*")


def test_assert_parent_and_assert_tags_failure_messages(app: pytest.Pytester) -> None:
    """assert_parent reports the actual parent; assert_tags reports missing and wrong values."""
    app.makepyfile(
        test_msgs="""
        import pytest
        import ctxprop
        from app import job

        def test_parent(ctxprop_spans):
            job(ctxprop.ContextAwareThreadPoolExecutor)
            ctxprop_spans.assert_parent("job", "step")

        def test_wrong_tag(ctxprop_spans):
            job(ctxprop.ContextAwareThreadPoolExecutor, tenant="other")
            ctxprop_spans.assert_tags("step", tenant="acme")

        def test_missing_tag(ctxprop_spans):
            job(ctxprop.ContextAwareThreadPoolExecutor)
            ctxprop_spans.assert_tags("job", region="eu")

        def test_unknown_name(ctxprop_spans):
            job(ctxprop.ContextAwareThreadPoolExecutor)
            ctxprop_spans.assert_tags("nope", region="eu")
        """
    )
    result = app.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        [
            "*expected every 'job' span under a 'step' span:*",
            "*'job' (span *) has no parent*",
        ]
    )
    result.stdout.fnmatch_lines(["*'step' (span *) has tenant='other', expected 'acme'*"])
    result.stdout.fnmatch_lines(["*'job' (span *) lacks tag 'region'*"])
    result.stdout.fnmatch_lines(["*no span named 'nope'; spans captured: 'job', 'step'*"])


def test_spans_never_cross_tests(app: pytest.Pytester) -> None:
    """Each test gets a fresh pipeline: spans of one test are not seen by the next, and clear() works."""
    app.makepyfile(
        test_iso="""
        from opentelemetry import trace

        def test_first(ctxprop_spans):
            with trace.get_tracer("t").start_as_current_span("first"):
                pass
            assert [s.name for s in ctxprop_spans.spans] == ["first"]
            ctxprop_spans.clear()
            assert ctxprop_spans.spans == []
            with trace.get_tracer("t").start_as_current_span("again"):
                pass
            assert [s.name for s in ctxprop_spans.spans] == ["again"]

        def test_second(ctxprop_spans):
            assert ctxprop_spans.spans == []
        """
    )
    result = app.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_a_tracer_made_at_import_time_is_captured_in_every_test(app: pytest.Pytester) -> None:
    """A module-level tracer (bound to the first provider it resolves, for good) is captured in every
    test, not only the first; and since the fixture closes its own pipeline after each test, a test's
    code can still set up a pipeline of its own without a second-init warning."""
    app.makepyfile(
        test_module_tracer="""
        import warnings
        from opentelemetry import trace
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import ctxprop

        tracer = trace.get_tracer("app")

        def test_first(ctxprop_spans):
            with tracer.start_as_current_span("first"):
                pass
            assert [s.name for s in ctxprop_spans.spans] == ["first"]

        def test_without_the_fixture_code_may_set_up_its_own_pipeline():
            exporter = InMemorySpanExporter()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "init() called twice" warning
                ctxprop.init(exporter=exporter, service_name="own", handle_signals=False)
            with trace.get_tracer("own").start_as_current_span("own span"):
                pass
            with tracer.start_as_current_span("unwatched"):
                pass
            ctxprop.close()
            assert [s.name for s in exporter.get_finished_spans()] == ["own span"]

        def test_second(ctxprop_spans):
            with tracer.start_as_current_span("second"):
                pass
            assert [s.name for s in ctxprop_spans.spans] == ["second"]
        """
    )
    result = app.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_spans_made_in_process_pool_workers_are_captured(app: pytest.Pytester) -> None:
    """Spans that ctxprop's process pool brings back from its workers are captured, under their parent."""
    app.makepyfile(
        tasks="""
        from opentelemetry import trace

        def square(x):
            with trace.get_tracer("worker").start_as_current_span("square"):
                return x * x
        """,
        test_pool="""
        from opentelemetry import trace
        import ctxprop
        from tasks import square

        def test_pool(ctxprop_spans):
            with ctxprop.ContextAwareProcessPoolExecutor(max_workers=1) as pool:
                with trace.get_tracer("t").start_as_current_span("batch"):
                    assert list(pool.map(square, [2, 3])) == [4, 9]
            ctxprop_spans.assert_parent("square", "batch")
            assert len(ctxprop_spans.by_name("square")) == 2
        """,
    )
    result = app.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_applications_own_pipeline_is_kept(app: pytest.Pytester) -> None:
    """A pipeline the application set up (here in conftest) is neither replaced nor torn down by the
    fixture: its exporter still gets every span, and the fixture sees the test's spans too."""
    app.makeconftest(
        """
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import ctxprop

        APP_EXPORTER = InMemorySpanExporter()
        PROVIDER = ctxprop.init(exporter=APP_EXPORTER, service_name="app", handle_signals=False)
        """
    )
    app.makepyfile(
        test_own="""
        import ctxprop
        from ctxprop import _pipeline
        from opentelemetry import trace
        from conftest import APP_EXPORTER, PROVIDER

        def test_captured(ctxprop_spans):
            with trace.get_tracer("t").start_as_current_span("in test"):
                pass
            assert [s.name for s in ctxprop_spans.spans] == ["in test"]

        def test_app_pipeline_still_there():
            assert _pipeline.current_provider() is PROVIDER
            with trace.get_tracer("t").start_as_current_span("after"):
                pass
            ctxprop.flush()
            assert [s.name for s in APP_EXPORTER.get_finished_spans()] == ["in test", "after"]
        """
    )
    result = app.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=2)


def test_importing_the_plugin_has_no_side_effects() -> None:
    """Loading the plugin (as every pytest run does) sets no tracer provider and starts no thread."""
    code = (
        "import json, threading\n"
        "import ctxprop.pytest_plugin\n"
        "from opentelemetry import trace\n"
        "print(json.dumps({'threads': threading.active_count(),"
        " 'provider': type(trace.get_tracer_provider()).__name__}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=str(REPO),
        timeout=60,
        check=True,
    )
    assert out.stderr == ""
    assert json.loads(out.stdout) == {"threads": 1, "provider": "ProxyTracerProvider"}
