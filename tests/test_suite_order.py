"""How `make test` spreads the suite over pytest-xdist workers (the root conftest.py): the
longest files first."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def root_conftest(request):
    """The root conftest.py as pytest loaded it (importing it again would rerun its setup)."""
    path = os.path.join(ROOT, "conftest.py")
    return next(plugin for plugin in request.config.pluginmanager.get_plugins()
                if os.path.abspath(getattr(plugin, "__file__", "") or "") == path)


def test_every_file_named_to_run_first_exists(root_conftest):
    """A renamed file would silently drop out of the order and could start last again."""
    assert root_conftest.LONGEST_FILES
    assert [path for path in root_conftest.LONGEST_FILES
            if not os.path.isfile(os.path.join(ROOT, path))] == []


def test_the_longest_files_come_first_and_the_rest_keep_their_order(root_conftest):
    first, second = root_conftest.LONGEST_FILES[:2]
    collected = ["tests/test_a.py::t1", f"{second}::t", "bench/bench_b.py::t", f"{first}::t1",
                 "tests/test_a.py::t2", f"{first}::t2"]
    ordered = sorted(collected, key=root_conftest.file_rank)
    assert ordered == [f"{first}::t1", f"{first}::t2", f"{second}::t", "tests/test_a.py::t1",
                       "bench/bench_b.py::t", "tests/test_a.py::t2"]
