"""One writer for every table the project publishes: CSV for machines, Markdown and LaTeX for people."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in running text (the same set pandas escapes in cells)."""
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def write_table(
    out_dir: str | Path,
    stem: str,
    data: pd.DataFrame,
    *,
    caption: str,
    note: str = "",
    shown: pd.DataFrame | None = None,
) -> list[Path]:
    """Write `stem.csv` (the raw numbers in `data`) and `stem.md`, `stem.tex` (the formatted `shown`,
    defaulting to `data`) into `out_dir`. LaTeX uses booktabs rules and escapes special characters."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = data if shown is None else shown
    paths = [out / f"{stem}.csv", out / f"{stem}.md", out / f"{stem}.tex"]

    data.to_csv(paths[0], index=False)

    markdown = f"**{caption}**\n\n" + shown.to_markdown(index=False, disable_numparse=True) + "\n"
    if note:
        markdown += f"\n{note}\n"
    paths[1].write_text(markdown)

    latex = shown.to_latex(
        index=False,
        escape=True,
        na_rep="",
        caption=latex_escape(caption),
        label=f"tab:{stem}",
        position="t",
    )
    if note:
        latex = latex.replace("\\end{table}", f"\\par\\footnotesize {latex_escape(note)}\n\\end{{table}}")
    paths[2].write_text(latex)
    return paths
