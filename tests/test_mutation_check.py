"""The logic of ``tools/mutation_check.py`` (no rebuild, no test-suite run)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool():
    path = os.path.join(ROOT, "tools", "mutation_check.py")
    spec = importlib.util.spec_from_file_location("mutation_check_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _load_tool()


def test_snippet_found_once_is_replaced():
    text = "a = 1\nb = a + 1\nc = 3\n"
    assert mc.apply_mutation(text, "b = a + 1\n", "b = a - 1\n") == "a = 1\nb = a - 1\nc = 3\n"


@pytest.mark.parametrize("text, count", [("x = 1\n", 0), ("y = 2\ny = 2\n", 2)])
def test_snippet_not_found_exactly_once_is_a_clear_error(text, count):
    with pytest.raises(mc.MutationError, match=f"occurs {count} times in ops/some.h") as info:
        mc.apply_mutation(text, "y = 2\n", "y = 3\n", where="ops/some.h")
    assert "out of date" in str(info.value)
    with pytest.raises(mc.MutationError, match="empty"):
        mc.apply_mutation(text, "", "z")


def test_apply_to_tree_edits_only_the_copy(tmp_path):
    (tmp_path / "ops").mkdir()
    target = tmp_path / "ops" / "kernel.h"
    target.write_text("int f() { return 1; }\n")
    mutation = mc.Mutation(name="m", file="ops/kernel.h", old="return 1;", new="return 2;",
                           tests=("tests/test_x.py",))
    mc.apply_to_tree(str(tmp_path), mutation)
    assert target.read_text() == "int f() { return 2; }\n"
    with pytest.raises(mc.MutationError, match="occurs 0 times"):  # already applied
        mc.apply_to_tree(str(tmp_path), mutation)
    missing = mc.Mutation(name="m", file="ops/none.h", old="a", new="b", tests=("t",))
    with pytest.raises(mc.MutationError, match="does not exist"):
        mc.apply_to_tree(str(tmp_path), missing)


@pytest.mark.parametrize("returncode, outcome", [
    (0, "MISSED"),   # every selected test passed
    (1, "CAUGHT"),   # some test failed
    (-11, "CAUGHT"),  # the run crashed (segfault in the mutated op)
    (2, "ERROR"),    # interrupted / collection error
    (3, "ERROR"),    # internal error
    (4, "ERROR"),    # usage error
    (5, "ERROR"),    # no tests collected
])
def test_outcome_from_pytest_returncode(returncode, outcome):
    assert mc.outcome_from_returncode(returncode) == outcome


def test_selection_and_commands():
    m = mc.Mutation(name="m", file="f", old="a", new="b",
                    tests=("tests/test_a.py", "tests/test_b.py::test_c"), keyword="x and not y")
    assert m.pytest_selection() == ["tests/test_a.py", "tests/test_b.py::test_c", "-k", "x and not y"]
    command = mc.pytest_command(m.pytest_selection())
    assert command[1:3] == ["-m", "pytest"] and command[-4:] == m.pytest_selection()
    assert mc.Mutation(name="m", file="f", old="a", new="b", tests=("t",)).pytest_selection() == ["t"]


def test_table_checks_and_selection():
    a = mc.Mutation(name="a", file="f", old="x", new="y", tests=("t",))
    b = mc.Mutation(name="b", file="f", old="x", new="z", tests=("t",))
    mc.validate_table([a, b])
    with pytest.raises(ValueError, match="duplicate"):
        mc.validate_table([a, a])
    with pytest.raises(ValueError, match="needs"):
        mc.validate_table([mc.Mutation(name="c", file="f", old="", new="y", tests=("t",))])
    with pytest.raises(ValueError, match="tuple"):
        mc.validate_table([mc.Mutation(name="c", file="f", old="x", new="y", tests="tests/t.py")])
    assert mc.select([a, b], []) == [a, b]
    assert mc.select([a, b], ["b"]) == [b]
    with pytest.raises(ValueError, match="unknown"):
        mc.select([a, b], ["nope"])


def test_shipped_table_applies_to_this_repository():
    """Every entry's snippet occurs exactly once in the current file; the selected
    test files exist; the kernel batch-split mutation comes first."""
    mc.validate_table(mc.MUTATIONS)
    assert mc.MUTATIONS[0].name == "cpu_backward_batch_split"
    for m in mc.MUTATIONS:
        with open(os.path.join(ROOT, m.file), encoding="utf-8") as f:
            mutated = mc.apply_mutation(f.read(), m.old, m.new, where=m.file)
        assert m.new in mutated
        for test in m.tests:
            assert os.path.exists(os.path.join(ROOT, test.split("::")[0])), test


def test_report_table_lists_every_result():
    results = [
        {"name": "first", "outcome": "CAUGHT", "pytest_status": 1, "build_seconds": 20.5,
         "test_seconds": 9.0, "detail": "the tests failed"},
        {"name": "second_longer_name", "outcome": "MISSED", "pytest_status": 0,
         "build_seconds": 0.0, "test_seconds": 3.2, "detail": "all selected tests passed"},
    ]
    lines = mc.format_table(results).splitlines()
    assert len(lines) == 4 and lines[0].startswith("mutation")
    assert "first" in lines[2] and "CAUGHT" in lines[2]
    assert "second_longer_name" in lines[3] and "MISSED" in lines[3]
