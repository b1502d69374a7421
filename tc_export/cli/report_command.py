"""``tc-export report RESULTS.json -o report.html``: the bench results as one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("results", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("report.html"), show_default=True,
              help="The HTML file to write.")
@click.option("--title", default=None, help="Page title (default: the models benchmarked).")
@click.option("--tune", "tune_results", multiple=True, type=click.Path(path_type=Path),
              help="Add the section of a tc-export tune --json file (repeatable).")
def report_command(results: Path, output: Path, title: str | None, tune_results: tuple[Path, ...]) -> None:
    """Write RESULTS.json (from tc-export bench --json or tune --json) as one HTML page: tables, plots, machine."""
    from ..measure.report import TUNE_SCHEMA_ID, load_results, write_report

    document = load_results(results)
    tuned = [load_results(path) for path in tune_results]
    for path, extra in zip(tune_results, tuned):
        if extra.get("schema") != TUNE_SCHEMA_ID:
            raise click.UsageError(f"--tune {path} is not a tc-export tune --json file")
    write_report(document, output, title, tuned)
    click.echo(f"wrote {output} ({len(document['rows'])} rows, {output.stat().st_size / 1024:.0f} KB)")
