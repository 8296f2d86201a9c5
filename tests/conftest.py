"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU")
    config.addinivalue_line("markers", "tpu: needs a TPU")
    config.addinivalue_line("markers", "slow: minutes of training (the test command runs them; -m 'not slow' skips)")


def pytest_collection_modifyitems(config, items):
    import jax
    platform = jax.default_backend()
    for item in items:
        for hw in ("gpu", "tpu"):
            if hw in item.keywords and platform != hw:
                item.add_marker(pytest.mark.skip(reason=f"needs a {hw.upper()}"))


def smoke_config(**overrides):
    """The seconds-long tiny config, with dotted overrides."""
    from configs import tiny
    return with_overrides(tiny.get_config("smoke"), **overrides)


def with_overrides(config, **overrides):
    """Sets dotted fields, e.g. with_overrides(c, **{"data.sides": (16,)}); returns the config."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def randomised_model(config):
    """The DiT of `config` with every weight perturbed, adaLN-Zero's zero-initialised ones included, so every
    path carries signal (a zero gate would hide a broken attention)."""
    import jax
    from flax import nnx

    from sora_jax.models import build_model
    model = build_model(config, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params)
    return nnx.merge(graphdef, params)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A work dir holding a smoke run's checkpoint (4 steps on the 8-device mesh)."""
    from sora_jax.train.loop import train_and_evaluate
    workdir = str(tmp_path_factory.mktemp("smoke"))
    train_and_evaluate(smoke_config(), workdir)
    return workdir


# --- no silent skips ---------------------------------------------------------------------------------------
# A skipped test is a test that did not run: only the hardware ones (marked gpu or tpu) may skip on a machine
# without that hardware. Any other skip (a missing dependency, a stray pytest.skip) makes the run fail, named
# with its reason, so a green run means every required test ran.
HARDWARE_MARKERS = ("gpu", "tpu")
_unexpected_skips: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr).strip()
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail") and not any(m in report.keywords for m in HARDWARE_MARKERS):
        _unexpected_skips.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped at import (e.g. a module-level pytest.importorskip)
        _unexpected_skips.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _unexpected_skips:
        terminalreporter.section("skipped tests that are not marked gpu or tpu (these fail the run)", red=True)
        for nodeid, reason in _unexpected_skips:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)


def check_config(config) -> None:
    """The trainer's config checks: sora_jax.config_validation.validate with config's task."""
    from sora_jax.config_validation import validate
    from sora_jax.tasks import build_task
    validate(config, build_task(config))
