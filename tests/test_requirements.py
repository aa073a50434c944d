"""requirements*.txt say what the code needs, and constraints.txt what the suite last passed with: the installed
versions meet the lower bounds, and make installed exactly the pinned ones (update them with `make constraints`)."""

from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from scripts import REPO


def _requirements() -> list[Requirement]:
    files = ("requirements.txt", "requirements-test.txt")
    lines = [line.split("#")[0].strip() for name in files for line in (REPO / name).read_text().splitlines()]
    return [r for r in map(Requirement, filter(None, lines)) if r.marker is None or r.marker.evaluate()]


def _pins() -> dict[str, str]:
    lines = [line.strip() for line in (REPO / "constraints.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {Requirement(line).name.lower().replace("_", "-"): line.split("==")[1] for line in lines}


@pytest.mark.parametrize("requirement", _requirements(), ids=str)
def test_installed_versions_meet_the_requirements_and_the_pins(requirement):
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        pytest.fail(f"{requirement.name} is not installed: make test installs requirements-test.txt")
    assert requirement.specifier.contains(installed, prereleases=True), f"{requirement.name} {installed} does not meet {requirement}"
    pins = _pins()
    name = requirement.name.lower().replace("_", "-")
    assert name in pins, f"constraints.txt has no pin for {requirement.name}: run make constraints after the suite passes"
    assert requirement.specifier.contains(pins[name], prereleases=True), f"constraints.txt pins {name} {pins[name]} outside {requirement}"
    assert Version(installed) == Version(pins[name]), f"{name} {installed} installed, {pins[name]} pinned: make installs the pins"
