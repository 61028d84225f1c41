"""Shared fixtures of the training tests."""

import pytest

import script_runner


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A corpus cache folder private to this test session."""
    return tmp_path_factory.mktemp("corpus_cache")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, corpus_cache):
    """The workdir of an uninterrupted single-device run of ``script_runner.RUN_FLAGS``."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    script_runner.run(workdir, corpus_cache)
    return workdir
