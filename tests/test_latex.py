"""save_table's LaTeX: escaping, unicode, number formatting, and pdflatex compiling what it writes.

pdflatex missing is a skip on a workstation and a failure under CI (the environment variable CI set),
where .ci/run installs it.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gvr_lab import plots
from gvr_lab.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
# The preamble save_table documents, written out here rather than taken from the module.
MINIMAL_DOCUMENT = r"""\documentclass{article}
\usepackage[T1]{fontenc}
\usepackage[utf8]{inputenc}
\usepackage{booktabs}
\begin{document}
\input{table}
\end{document}
"""
SPECIALS = "% _ & # $ { } ~ ^ \\"
UNICODE_IN_OUR_TABLES = "± − — ≥ ≤ × λ ‖ → … \u00a0 – · Δ"
LATIN_1_LETTERS = "".join(chr(c) for c in range(0xC0, 0x100) if chr(c) not in "×÷")
COMMITTED_TABLES = sorted(REPO.glob("figures/**/*.tex"))


def pdflatex() -> str:
    path = shutil.which("pdflatex")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("pdflatex is missing with CI set; .ci/run installs texlive-latex-base and -recommended")
        pytest.skip("pdflatex is not installed (Debian: texlive-latex-base, texlive-latex-recommended)")
    return path


def compile_table(table_tex: Path, workdir: Path) -> None:
    """pdflatex on MINIMAL_DOCUMENT around `table_tex`: exit 0, a PDF, no character lost from a font."""
    command = pdflatex()
    workdir.mkdir(exist_ok=True)
    shutil.copyfile(table_tex, workdir / "table.tex")
    (workdir / "document.tex").write_text(MINIMAL_DOCUMENT, encoding="utf-8")
    done = subprocess.run(
        [command, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", "document.tex"],
        cwd=workdir,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert (workdir / "document.pdf").read_bytes().startswith(b"%PDF")
    log = (workdir / "document.log").read_text(errors="replace")
    assert "Missing character" not in log, log[-3000:]


# ---------------------------------------------------------------------- escaping


def test_latex_text_escapes_what_latex_reads_as_commands():
    assert plots.latex_text(r"50% a_b & #1 $2 {x} ~y ^z \w <<q>>", "here") == (
        r"50\% a\_b \& \#1 \$2 \{x\} \textasciitilde{}y \textasciicircum{}z \textbackslash{}w "
        r"\textless{}\textless{}q\textgreater{}\textgreater{}"
    )


def test_latex_text_maps_unicode_and_keeps_latin_1_letters():
    assert plots.latex_text("λ1 ± 0.5 − 2 × 3 ≥ 1 ≤ 2 ‖g‖ → … a\u00a0b 1–2 — Δλ · é ß", "here") == (
        r"$\lambda$1 $\pm$ 0.5 $-$ 2 $\times$ 3 $\geq$ 1 $\leq$ 2 $\|$g$\|$ $\rightarrow$ \dots{} a~b "
        r"1\textendash{}2 \textemdash{} $\Delta$$\lambda$ $\cdot$ é ß"
    )
    assert plots.latex_text("two\nlines\tand a tab", "here") == "two lines and a tab"
    assert set(UNICODE_IN_OUR_TABLES.replace(" ", "")) <= set(plots.LATEX_UNICODE)


@pytest.mark.parametrize(
    "where, table, caption",
    [
        ("cell table.loc[1, 'verdict']", pd.DataFrame({"verdict": ["no", "yes ✓"]}), ""),
        ("column name 'ok ✓'", pd.DataFrame({"ok ✓": [1]}), ""),
        ("the caption", pd.DataFrame({"ok": [1]}), "done ✓"),
    ],
)
def test_an_unmapped_character_is_refused_naming_it_and_where_it_is(tmp_path, where, table, caption):
    with pytest.raises(UsageError) as refused:
        plots.save_table(table, tmp_path / "out" / "t", caption)
    message = str(refused.value)
    assert message.startswith(f"{where} holds '✓' (U+2713 CHECK MARK), which save_table cannot write as LaTeX; valid: ")
    assert "\n" not in message
    assert not (tmp_path / "out").exists()  # neither the .tex nor the .md


# ---------------------------------------------------------------------- numbers


def test_column_decimals_fewest_exact_at_most_the_smallest_value_s_significant_digits():
    assert plots.column_decimals([7.2, 10.6, 15.9]) == 1
    assert plots.column_decimals([4.62, 11.57, 8.3]) == 2
    assert plots.column_decimals([4326.0, 1728.0, np.nan]) == 0
    assert plots.column_decimals([1 / 3, 12.5]) == 3  # 0.333: three significant digits
    assert plots.column_decimals([1234.5678, 0.001234], digits=2) == 4
    assert plots.column_decimals([0.0, 0.0]) == 0
    assert plots.column_decimals([]) == 0


def test_table_text_one_number_format_per_column():
    table = pd.DataFrame(
        {
            "seeds": [1, 2, 3],
            "s/epoch": [4.62, 11.57, 8.3],
            "images/s": [4326.0, 1728.0, np.nan],
            "ratio": [1 / 3, 2 / 3, 12.5],
            "mixed": ["x", 0.5, None],
        }
    )
    assert plots.table_text(table).to_dict("list") == {
        "seeds": ["1", "2", "3"],
        "s/epoch": ["4.62", "11.57", "8.30"],
        "images/s": ["4326", "1728", ""],
        "ratio": ["0.333", "0.667", "12.500"],
        "mixed": ["x", "0.5", ""],
    }


def test_save_table_writes_the_same_cells_to_markdown_and_latex(tmp_path):
    table = pd.DataFrame(
        {
            "label": ["SGD", "[LB]", "*SB"],
            "test accuracy (%)": ["80.08", "82.86 ± 1.60", "78.16"],
            "seeds": [1, 2, 1],
            "s/epoch": [7.2, 10.6, np.nan],
            "term on": ["—", "100% of steps", "33% of steps"],
        }
    )
    md, tex = plots.save_table(table, tmp_path / "summary", "Test accuracy, fashion_mnist · small_cnn")
    assert (md.name, tex.name) == ("summary.md", "summary.tex")
    assert md.read_text(encoding="utf-8") == (
        "Test accuracy, fashion_mnist · small_cnn\n"
        "\n"
        "| label   | test accuracy (%)   |   seeds |   s/epoch | term on       |\n"
        "|:--------|:--------------------|--------:|----------:|:--------------|\n"
        "| SGD     | 80.08               |       1 |       7.2 | —             |\n"
        "| [LB]    | 82.86 ± 1.60        |       2 |      10.6 | 100% of steps |\n"
        "| *SB     | 78.16               |       1 |           | 33% of steps  |\n"
    )
    # a leading [ or * gets {} so that \\ and \midrule do not take it for their optional argument
    assert tex.read_text(encoding="utf-8") == (
        "% written by gvr_lab.plots.save_table\n"
        "% For pdflatex: \\input it in the body of a document whose preamble has\n"
        "%   \\documentclass{article}\n"
        "%   \\usepackage[T1]{fontenc}\n"
        "%   \\usepackage[utf8]{inputenc}\n"
        "%   \\usepackage{booktabs}\n"
        "\\begin{table}\n"
        "\\centering\n"
        "\\caption{Test accuracy, fashion\\_mnist $\\cdot$ small\\_cnn}\n"
        "\\begin{tabular}{llrrl}\n"
        "\\toprule\n"
        "label & test accuracy (\\%) & seeds & s/epoch & term on \\\\\n"
        "\\midrule\n"
        "SGD & 80.08 & 1 & 7.2 & \\textemdash{} \\\\\n"
        "{}[LB] & 82.86 $\\pm$ 1.60 & 2 & 10.6 & 100\\% of steps \\\\\n"
        "{}*SB & 78.16 & 1 &  & 33\\% of steps \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
        "\\end{table}\n"
    )


def test_a_table_without_columns_is_refused(tmp_path):
    with pytest.raises(UsageError, match="^save_table needs a table with at least one column$"):
        plots.save_table(pd.DataFrame(index=[0, 1]), tmp_path / "t")


# ---------------------------------------------------------------------- intervals


def test_interval_text_as_bounds_or_half_width():
    assert plots.interval_text(2.0, -0.484, 4.484) == "2.00 [-0.48, 4.48]"
    assert plots.interval_text(2.0, -0.484, 4.484, ci_form="half_width") == "2.00 ± 2.48"
    assert plots.interval_text(75.6234, 74.8012, 76.4456, digits=4, ci_form="half_width") == "75.62 ± 0.82"
    assert plots.interval_text(5.0, np.nan, np.nan, ci_form="half_width") == "5.00"
    with pytest.raises(UsageError, match=r"^the interval \[1, 4\] is not symmetric about its mean 2: .* 'bounds'$"):
        plots.interval_text(2.0, 1.0, 4.0, ci_form="half_width")
    with pytest.raises(UsageError, match="^unknown ci_form 'pm'; valid: bounds, half_width$"):
        plots.interval_text(2.0, 1.0, 3.0, ci_form="pm")


def test_mean_ci_and_paired_difference_as_half_width():
    frame = pd.DataFrame(
        {
            "label": ["a"] * 3 + ["b"],
            "seed": [0, 1, 2, 0],
            "lambda_1": [1.0, 2.0, 3.0, 5.0],
            "test_acc": [0.5, 0.6, 0.7, 0.9],
        }
    )
    # t_{0.975, 2} = 4.303, sd 1, n 3: half-width 4.303 / sqrt(3) = 2.484; accuracies in percent: 24.84
    assert plots.mean_ci(frame, ["label"], ["lambda_1", "test_acc"], ci_form="half_width").to_dict("list") == {
        "label": ["a", "b"],
        "λ1": ["2.00 ± 2.48", "5.00"],
        "test accuracy (%)": ["60.0 ± 24.8", "90.0"],
        "seeds": [3, 1],
    }
    pairs = pd.DataFrame({"label": ["m"] * 3 + ["base"] * 3, "seed": [0, 1, 2] * 2, "x": [5.0, 7, 9, 4, 5, 6]})
    # differences 1, 2, 3: the same mean and sd as lambda_1 above
    assert plots.paired_difference(pairs, "x", {"m": "base"}, ci_form="half_width") == {
        "m": "2.00 ± 2.48 vs base",
        "base": "—",
    }


# ---------------------------------------------------------------------- pdflatex


def test_missing_pdflatex_skips_on_a_workstation_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pdflatex is not installed"):
        pdflatex()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="pdflatex is missing with CI set"):
        pdflatex()


def test_pdflatex_compiles_every_special_and_mapped_character(tmp_path):
    specials, mapped = SPECIALS + " < > | \" ' `", " ".join(plots.LATEX_UNICODE)
    adjacent = "Δλ1 ±±0.5 $±1 ‖g‖→0 {}"  # math next to math and to an escaped $
    table = pd.DataFrame(
        {
            f"escaped {specials}": [specials, "[leading bracket", 1.5],
            f"mapped {mapped}": [mapped, "*leading star", np.nan],
            f"letters {LATIN_1_LETTERS}": [LATIN_1_LETTERS, adjacent, 7],
        }
    )
    _, tex = plots.save_table(table, tmp_path / "table", f"Caption {specials} {mapped} {LATIN_1_LETTERS} {adjacent}")
    assert tex.read_text(encoding="utf-8").startswith(plots.TABLE_MARK + "\n")
    compile_table(tex, tmp_path / "build")


@pytest.mark.parametrize("table_tex", COMMITTED_TABLES, ids=[str(p.relative_to(REPO)) for p in COMMITTED_TABLES])
def test_pdflatex_compiles_every_committed_table(tmp_path, table_tex):
    """Every .tex under figures/ is a table save_table wrote (a hand-made or stale one fails here
    too), and compiles."""
    assert table_tex.read_text(encoding="utf-8").startswith(plots.TABLE_MARK + "\n")
    compile_table(table_tex, tmp_path)
