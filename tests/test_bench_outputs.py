"""Benchmarks write only where told, or into a fresh bench_out/ folder they name: never docs/."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from benchmarks import attention, variants
from gpt2_jax.errors import UserError

DOCS = Path(__file__).resolve().parents[1] / "docs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_ATTENTION = ["--seq-lens", "16,32", "--windows", "none", "--impls", "xla", "--n-head", "1",
                  "--head-dim", "8", "--repeats", "1", "--isolate", "off"]  # fmt: skip


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """Relative path → (mtime_ns, sha256) of every file under `root`."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def only_fresh_folder(cwd: Path, name: str, err: str) -> Path:
    """The cwd holds bench_out/<name>-<stamp>/ and nothing else, and stderr named it."""
    assert [p.name for p in cwd.iterdir()] == ["bench_out"]
    (folder,) = (cwd / "bench_out").iterdir()
    assert folder.name.startswith(f"{name}-") and folder.is_dir()
    assert f"writing into bench_out/{folder.name}/" in err
    return folder


def test_attention_plot_default_is_a_fresh_folder(tmp_path, monkeypatch, capsys):
    docs_before = tree_state(DOCS)
    monkeypatch.chdir(tmp_path)
    assert attention.main(TINY_ATTENTION) == 0
    err = capsys.readouterr().err
    folder = only_fresh_folder(tmp_path, "attention", err)
    assert [p.name for p in folder.iterdir()] == ["attention_scaling.png"]
    assert (folder / "attention_scaling.png").read_bytes().startswith(PNG_MAGIC)
    assert tree_state(DOCS) == docs_before

    # Told where: exactly there, and no new folder; 'none': nothing at all.
    assert attention.main([*TINY_ATTENTION, "--plot", str(tmp_path / "mine.png")]) == 0
    assert attention.main([*TINY_ATTENTION, "--plot", "none"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_out", "mine.png"]
    assert [p.name for p in (tmp_path / "bench_out").iterdir()] == [folder.name]


def test_variants_out_default_is_a_fresh_folder(tmp_path, monkeypatch, capsys):
    """The output folder is settled before any training, which is stopped here."""

    def stop(a, work):
        raise UserError("stopped before training")

    docs_before = tree_state(DOCS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(variants, "run_all", stop)
    with pytest.raises(SystemExit):
        variants.main(["--preset", "tiny", "--rows", "standard", "--peers", "none"])
    folder = only_fresh_folder(tmp_path, "variants", capsys.readouterr().err)
    assert list(folder.iterdir()) == []
    assert tree_state(DOCS) == docs_before


def test_benchmarks_help_lists_each_benchmark_with_its_summary(capsys):
    from benchmarks import __main__ as bench_main

    assert bench_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  startup    Wall time of whole CLI commands" in out
    assert "  comms      What the compiled train step moves" in out
    assert bench_main.main(["nope"]) == 2
    assert "no benchmark 'nope'" in capsys.readouterr().err
