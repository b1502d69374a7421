"""Every command the README's ```bash blocks show runs as shown, in order, in one fresh folder, and exits as
documented (tests/doc_commands.py says how; docs/reproducibility.md how to add a command). The run is marked slow
(~35 commands, tiny stand-ins); the parser and the stand-in rule are checked fast."""

import pytest

from .doc_commands import ROOT, bash_commands, check_stand_in, run_page, skipped_by_name


@pytest.mark.slow
def test_readme_commands_run_as_documented(tmp_path):
    run_page(ROOT / "README.md", tmp_path)


def test_the_parser_reads_what_a_reader_sees(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\ntc-export a --r 1 \\\n  -o x.onnx   # note\n# only a comment\n```\n"
                    "```text\ntc-export output example\n```\n```bash\npip install x && pytest\n```\n")
    commands = bash_commands(page)
    assert [c.text for c in commands] == ["tc-export a --r 1 -o x.onnx", "pip install x && pytest"]
    assert [c.line for c in commands] == [2, 10]
    assert skipped_by_name(commands[1].words) and not skipped_by_name(commands[0].words)
    assert skipped_by_name("python -m pytest -n 2".split())


def test_a_stand_in_may_change_the_model_only():
    check_stand_in("tc-export vit_b --r 16 -o m.onnx", "tc-export vit_t --r 16 -o m.onnx")
    check_stand_in("tc-export bench vit_b --r 16", "tc-export bench vit_t --r 16")
    for changed in ("tc-export vit_t --r 8 -o m.onnx", "tc-export vit_t --r 16", "tc-export vit_t --r 16 -o m.onnx --x"):
        with pytest.raises(AssertionError, match="changes more than the model"):
            check_stand_in("tc-export vit_b --r 16 -o m.onnx", changed)
