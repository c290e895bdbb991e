"""Fixtures shared by test files (the Triton rule for the whole suite is the root conftest.py)."""
import pytest

import dataset_fixtures


@pytest.fixture(scope="session")
def roots(tmp_path_factory):
    """The real datasets' tiny fixtures, written once for every test that reads them (a test
    that damages one copies it first)."""
    return dataset_fixtures.write_all(tmp_path_factory.mktemp("datasets"))
