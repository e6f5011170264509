"""Device tests: ``pytest device_tests --farm FARM.toml --bundle DIR [--bundle DIR2] [--farm-device NAME]``.

The farm runs once per session (every device in parallel, see ``exporter/farm/``); each device is
then one test, and each of its checks is reported in that test's failure message. Without
``--farm`` the device tests are skipped (they need real devices, or the private sshd of
tests/test_farm.py). Add ``--junitxml F`` for pytest's own JUnit file; ``--farm-report DIR`` also
writes the farm's JUnit / JSON / HTML reports there.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("slm-export device farm")
    group.addoption("--farm", default=None, help="farm file (TOML) listing the devices to test")
    group.addoption("--bundle", action="append", default=[], help="bundle folder to deploy (repeatable)")
    group.addoption("--farm-device", action="append", default=[], help="only this device (repeatable)")
    group.addoption("--farm-report", default=None, help="folder for farm.xml / farm.json / farm.html")


def _farm(config):
    path = config.getoption("--farm")
    if not path:
        return None
    from exporter.farm import load_farm

    return load_farm(path)


def pytest_generate_tests(metafunc):
    if "device_name" in metafunc.fixturenames:
        farm = _farm(metafunc.config)
        only = metafunc.config.getoption("--farm-device")
        names = [d.name for d in farm.devices if not only or d.name in only] if farm else []
        metafunc.parametrize("device_name", names or [pytest.param(None, marks=pytest.mark.skip(
            reason="no --farm FARM given (device tests need devices)"))])


@pytest.fixture(scope="session")
def farm_reports(pytestconfig):
    """Every device's report, from one parallel farm run."""
    from exporter.farm import run_farm, write_reports

    farm = _farm(pytestconfig)
    bundles = pytestconfig.getoption("--bundle")
    if not bundles:
        pytest.fail("--bundle DIR is required with --farm", pytrace=False)
    only = pytestconfig.getoption("--farm-device") or None
    reports = run_farm(farm, bundles, only=only)
    out = pytestconfig.getoption("--farm-report")
    if out:
        write_reports(reports, farm, junit=Path(out) / "farm.xml", json_path=Path(out) / "farm.json",
                      html_path=Path(out) / "farm.html")
    return {r.name: r for r in reports}
