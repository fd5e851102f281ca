"""The source as newer Pythons read it."""
import pathlib
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_source_file_compiles_without_a_warning():
    """An invalid escape such as ``"\\("`` is a DeprecationWarning on CI's Python 3.11, shown to nobody, and
    a SyntaxWarning on 3.12+, printed at import (tests/test_group.py had one until 2026-11-28)."""
    files = [p for folder in ("pipeline", "stores", "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    files.append(ROOT / "cli.py")
    assert len(files) > 40
    warned = []
    for path in files:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        warned += [f"{path.relative_to(ROOT)}:{w.lineno}: {w.message}" for w in caught]
    assert not warned, warned
