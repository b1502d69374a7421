"""``tc-export report RESULTS.json -o report.html``: the bench results as one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("results", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True,
              help="The HTML file to write.")
@click.option("--title", default=None, help="Page title (default: the models benchmarked).")
def report_command(results: Path, output: Path, title: str | None) -> None:
    """Write RESULTS.json (from tc-export bench --json) as one HTML page: tables, plots, machine, versions."""
    from ..report import load_results, write_report

    document = load_results(results)
    write_report(document, output, title)
    click.echo(f"wrote {output} ({len(document['rows'])} rows, {output.stat().st_size / 1024:.0f} KB)")
