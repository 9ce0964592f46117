"""The whole matrix, locally: ``nox`` (``pip install -e '.[dev,lint]'`` brings nox and uv).

Sessions: ``lint`` (ruff, mypy --strict, doctests), ``tests-3.11``, one ``tests-NAME`` per interpreter the
shared folder ships (``../shared/pythons/provide.sh``: 3.13, 3.13t, 3.14, 3.15) and ``lowest`` (the test
suite on the lowest dependency versions ``pyproject.toml`` admits). ``nox -s tests-3.14`` runs one of them;
``nox -l`` lists them. Each session keeps its venv under ``.nox/`` and makes it with uv from a shared cache.
This mirrors ``.ci/run``, which CI runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PROVIDE = ROOT.parent / "shared" / "pythons" / "provide.sh"
# The interpreters beyond this machine's own 3.11, as the shared folder names its builds.
EXTRA = sorted(p.name.split("-")[1] for p in PROVIDE.parent.glob("cpython-*-bookworm-*.tar.xz"))

WHEEL_ONLY = "pydantic-core,hypothesis"

nox.options.default_venv_backend = "none"  # uv makes the venvs (below), with the interpreters named here
nox.options.sessions = ["lint", "tests-3.11", *(f"tests-{name}" for name in EXTRA), "lowest"]


def _uv() -> list[str]:
    exe = shutil.which("uv")
    return [exe] if exe else [sys.executable, "-m", "uv"]


def _python_311() -> str:
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    return shutil.which("python3.11") or "3.11"  # uv finds (or fetches) one by version


def _venv(session: nox.Session, name: str, python: str, *install: str) -> dict[str, str]:
    """A fresh venv at .nox/NAME with ``install`` done; the environment that activates it."""
    where = ROOT / ".nox" / name
    session.run(*_uv(), "venv", "--quiet", "--python", python, str(where), external=True)
    session.run(*_uv(), "pip", "install", "--quiet", "--python", str(where / "bin" / "python"), *install,
                external=True)
    return {"VIRTUAL_ENV": str(where), "PATH": f"{where / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}


def _pytest(session: nox.Session, env: dict[str, str]) -> None:
    # The README's test command, unchanged; extra arguments after `--` go to pytest.
    session.run("python", "-m", "pytest", *session.posargs, env=env, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, mypy --strict and the doctests, on 3.11."""
    env = _venv(session, "lint", _python_311(), "-e", ".[dev,lint]")
    session.run("ruff", "check", ".", env=env, external=True)
    session.run("mypy", "--strict", "ctxprop", "tests/typing", env=env, external=True)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--doctest-modules", "ctxprop",
                env=env, external=True)


@nox.session(name="tests-3.11")
def tests_311(session: nox.Session) -> None:
    """The test suite on 3.11."""
    _pytest(session, _venv(session, "tests-3.11", _python_311(), "-e", ".[dev]"))


def _extra_session(name: str) -> None:
    @nox.session(name=f"tests-{name}")
    def tests(session: nox.Session) -> None:
        if not PROVIDE.is_file():
            session.skip(f"no {PROVIDE.parent}: interpreter {name} is not available here")
        found = session.run("bash", str(PROVIDE), name, silent=True, external=True)
        python = str(found).strip().splitlines()[-1]
        # Only the test extra: mypy cannot install on the free-threaded build; packages whose sdists
        # need Rust crates: their newest release with a wheel for this interpreter.
        _pytest(session, _venv(session, f"tests-{name}", python, "--only-binary", WHEEL_ONLY, "-e", ".[dev]"))

    tests.__doc__ = f"The test suite on {name} (from ../shared/pythons)."


for _name in EXTRA:
    _extra_session(_name)


@nox.session
def lowest(session: nox.Session) -> None:
    """The test suite on 3.11 with the lowest version of each direct dependency pyproject.toml admits."""
    env = _venv(session, "lowest", _python_311(), "--resolution", "lowest-direct", "-e", ".[dev]")
    _pytest(session, env)
